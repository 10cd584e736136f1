"""Our forward equals `transformers` (PyTorch, CPU) on tiny random checkpoints of every family, in
float32 and in bfloat16, and with the position features the six families leave off (a Mistral
sliding window shorter than the sequence, linear RoPE scaling).

transformers' logits and greedy ids are golden entries (tests/golden.py: written with torch, read here
without it); the parity run recomputes them live (tests/test_golden.py)."""

from __future__ import annotations

import numpy as np
import pytest

import golden
from mirage_jax import generate as gen
from mirage_jax.model.checkpoint import load_hf_checkpoint
from mirage_jax.model.transformer import forward, init_cache
from tiny import FAMILIES, tiny_tokenizer

# name -> (family, hf_tiny_config overrides). Built with attn_gain=5 (see `save_tiny`): attention
# is sharp, so ignoring the window or the factor moves logits by ~0.2-0.5 (measured), 1000x the
# float32 tolerance. Every test sequence is longer than the window.
VARIANTS = {
    "mistral-window4": ("mistral", {"sliding_window": 4}),
    "llama-linear4": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
}
VARIANT_NEW = 16  # new tokens of the greedy comparison

# bfloat16: max |our logits - transformers' logits|, both in bf16, measured in the test below on
# the `far_along` checkpoints of seeds 0-2: llama 0.0049, llama3 0.0039, mistral 0.0049, qwen2
# 0.0049, gpt2 0.0039, gptj 0.0046, about one bf16 ulp of logits of magnitude ~0.6 (the two sides
# round activations in different places); the same at positions 0..15 with attn_gain=1. Rotary
# angles computed in bf16 instead of float32 (a bug float32 cannot show) measured 0.14-0.18.
BF16_TOL = 0.01
FAR = 2048  # context of the bf16 checkpoints; the test runs at its end, where angle errors are largest


def left_padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of the float32 logits comparison: 3 rows of 11, two of them left-padded."""
    ids = np.random.default_rng(0).integers(0, 128, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids, mask


def variant_prompts() -> list[list[int]]:
    rng = np.random.default_rng(2)
    return [[int(t) for t in rng.integers(2, 128, size=n)] for n in (3, 9, 17, 5)]


def far_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, positions): a left-padded bf16 batch at positions ~2040."""
    t = 16
    ids = np.random.default_rng(3).integers(0, 128, size=(3, t))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask, np.maximum(np.cumsum(mask, -1) - 1, 0) + FAR - t


def _build(key: str, tmp_path_factory, dtype: str = "float32"):
    """(name, our cfg, our params) of golden checkpoint `key` (golden.tiny_specs), in `dtype`."""
    path = golden.save_tiny(key, tmp_path_factory.mktemp(key))
    cfg, params, _ = load_hf_checkpoint(path, dtype=dtype)
    return key.split(".", 1)[1], cfg, params


@pytest.fixture(scope="module", params=FAMILIES + tuple(VARIANTS))
def tiny(request, tmp_path_factory):
    return _build(f"parity.{request.param}", tmp_path_factory)


@pytest.fixture(scope="module", params=tuple(VARIANTS))
def variant(request, tmp_path_factory):
    return _build(f"parity.{request.param}", tmp_path_factory)


@pytest.fixture(scope="module", params=FAMILIES)
def far_along(request, tmp_path_factory):
    """bf16 checkpoints with sharp attention and a 2048-token context."""
    return _build(f"far.{request.param}", tmp_path_factory, "bfloat16")


def test_logits_match_left_padded_batch(tiny):
    name, cfg, params = tiny
    ids, mask = left_padded_batch()
    ours = np.asarray(forward(params, cfg, ids, attn_mask=mask).logits)
    golden.check_close("tiny", f"parity.{name}.logits", ours, 1e-4, where=mask.astype(bool))


def test_kv_cache_decoding_matches_full_forward(tiny):
    _, cfg, params = tiny
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 12))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    full = np.asarray(forward(params, cfg, ids, attn_mask=mask).logits)
    p = 8  # prefill 8 slots, then decode the remaining 4 one token at a time (past any window)
    cache = init_cache(cfg, 2, 12, params["embed"]["embedding"].dtype)
    cmask = np.zeros((2, 12), np.int32)
    cmask[:, :p] = mask[:, :p]
    out = forward(params, cfg, ids[:, :p], attn_mask=cmask, cache=cache, cache_index=0)
    steps = [np.asarray(out.logits)[:, -1]]
    cache = out.cache
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    for t in range(p, 12):
        cmask[:, t] = 1
        out = forward(params, cfg, ids[:, t:t + 1], attn_mask=cmask, positions=pos[:, t:t + 1],
                      cache=cache, cache_index=t)
        cache = out.cache
        steps.append(np.asarray(out.logits)[:, -1])
    got = np.stack(steps, 1)  # logits at positions p-1 .. 11
    assert np.abs(got - full[:, p - 1:]).max() <= 1e-4


@pytest.mark.parametrize("packed", [False, True])
def test_last_layer_at_some_tokens_equals_the_full_forward_there(tiny, packed):
    """`forward(last_at=)` (the top layer's queries, MLP and logits at some tokens only, as FT's loss
    reads them) gives the full forward's logits at those tokens: a left-padded batch, or rows packed
    with two sequences each (a [B, T, T] mask, positions restarting) -- every family, past the
    sliding window, under linear RoPE scaling. Planted bugs caught: the queries' RoPE at their slot
    instead of their position (packed), the row's keys not causal (later keys seen), the residual
    taken at the wrong token (row-major slip)."""
    _, cfg, params = tiny
    ids, mask = left_padded_batch()
    b, t = ids.shape
    positions, attn = None, mask
    if packed:  # row r: a sequence of 5 then one of 6, each attending to itself only
        seg = np.repeat([[0] * 5 + [1] * 6], b, 0)
        attn = seg[:, :, None] == seg[:, None, :]
        positions = np.concatenate([np.arange(5), np.arange(6)])[None].repeat(b, 0)
    full = np.asarray(forward(params, cfg, ids, attn_mask=attn, positions=positions).logits).reshape(b * t, -1)
    at = np.array([t - 1, 4, 2 * t - 1, t + 6, 2 * t + 9, 3, 2 * t + 10])
    got = np.asarray(forward(params, cfg, ids, attn_mask=attn, positions=positions, last_at=at).logits)
    assert got.shape == (len(at), 1, full.shape[-1])
    real = np.ones(b * t, bool) if packed else mask.reshape(-1).astype(bool)
    np.testing.assert_allclose(got[:, 0][real[at]], full[at][real[at]], atol=2e-5, rtol=0)


def test_variant_is_in_force_and_greedy_decoding_matches_hf_generate(variant):
    """Our jitted greedy loop (KV cache, left-padded batch) against HF `generate` (its own cache):
    prompts and continuations run well past the window. Planted bugs this catches (seen failing,
    as does the left-padded logits test): the sliding window ignored in the attention mask, the
    linear RoPE factor ignored in `rope_inv_freq`."""
    name, cfg, params = variant
    _, overrides = VARIANTS[name]
    assert cfg.sliding_window == overrides.get("sliding_window")
    scaling = overrides.get("rope_scaling")
    got = None if cfg.rope_scaling is None else (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor)
    assert got == (None if scaling is None else (scaling["rope_type"], scaling["factor"]))
    cfg = cfg.replace(eos_token_ids=(1,))
    prompts = variant_prompts()
    ours = gen.generate_ids(params, cfg, tiny_tokenizer(cfg.vocab_size), prompts, max_new_tokens=VARIANT_NEW,
                            batch_size=4)
    golden.check_equal("tiny", f"parity.{name}.greedy", [[int(t) for t in g.ids] for g in ours])
    assert any(len(g.ids) >= 8 for g in ours)  # decoding itself ran past the window


def test_bfloat16_logits_match_transformers_far_along_the_sequence(far_along):
    """bf16 weights on both sides, a left-padded batch at positions ~2040. Planted bug this
    catches (seen failing in every RoPE family while the float32 tests pass): `_rope` computing
    the angles position * inv_freq in bf16 (x.dtype) instead of float32, an error of up to ~2 rad
    per angle here."""
    name, cfg, params = far_along
    ids, mask, pos = far_batch()
    ours = np.asarray(forward(params, cfg, ids, attn_mask=mask, positions=pos).logits)
    golden.check_close("tiny", f"far.{name}.logits", ours, BF16_TOL, where=mask.astype(bool))
