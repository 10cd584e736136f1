"""Our forward equals `transformers` (PyTorch, CPU) on tiny random checkpoints of every family."""

from __future__ import annotations

import numpy as np
import pytest

from mirage_jax.model.checkpoint import load_hf_checkpoint
from mirage_jax.model.transformer import forward, init_cache
from tiny import FAMILIES, save_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    cfg, params, _ = load_hf_checkpoint(path)
    return request.param, ref, cfg, params


def _hf_logits(ref, ids, mask):
    with torch.no_grad():
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos))
    return out.logits.numpy()


def test_logits_match_left_padded_batch(tiny):
    _, ref, cfg, params = tiny
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    ours = np.asarray(forward(params, cfg, ids, attn_mask=mask).logits)
    theirs = _hf_logits(ref, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4


def test_kv_cache_decoding_matches_full_forward(tiny):
    _, _, cfg, params = tiny
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 12))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    full = np.asarray(forward(params, cfg, ids, attn_mask=mask).logits)
    p = 8  # prefill 8 slots, then decode the remaining 4 one token at a time
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
