"""Synthetic (teacher-forced) evaluation, as the editing literature reports it (spec section 2).

Every target token is predicted from the *gold* prefix; the score is the fraction of target
tokens whose argmax equals the gold token. Locality compares post-edit argmax tokens with the
pre-edit ones over the locality answer span. One jitted forward per (batch, length) bucket.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import make_batch


@functools.partial(jax.jit, static_argnums=(1,))
def _argmax_tokens(params, cfg: ModelConfig, tokens, attn_mask):
    return jnp.argmax(forward(params, cfg, tokens, attn_mask=attn_mask).logits, axis=-1).astype(jnp.int32)


def predicted_target_tokens(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample: (argmax predictions over the target span, gold target ids)."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for s in range(0, len(prompts), batch_size):
        b = make_batch(tokenizer, prompts[s : s + batch_size], targets[s : s + batch_size])
        pred = np.asarray(_argmax_tokens(params, cfg, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask)))
        for r in range(b.n_rows):
            pos = np.nonzero(b.target_mask[r])[0]
            out.append((pred[r, pos - 1], b.tokens[r, pos]))
    return out


def token_accuracy(params, cfg, tokenizer, prompts, targets, batch_size: int = 32) -> list[float]:
    """Reliability / generalisation: teacher-forced target-token accuracy per sample."""
    pairs = predicted_target_tokens(params, cfg, tokenizer, prompts, targets, batch_size)
    return [float(np.mean(p == g)) for p, g in pairs]


def locality_agreement(pre: Sequence[np.ndarray], post: Sequence[np.ndarray]) -> list[float]:
    """Fraction of answer positions where post-edit argmax equals pre-edit argmax."""
    return [float(np.mean(np.asarray(a) == np.asarray(b))) for a, b in zip(pre, post)]
