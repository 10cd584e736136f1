"""Context templates for ROME / R-ROME / MEMIT: short model-sampled prefixes "<text>. {}".

The seed (spec 4.2 step 2) builds ``["{}"]`` plus, for each ``(length, n)`` of
``context_template_length_params``, ``n / 5`` top-k (k = 5) samples from each of the prompts
"The", "Therefore", "Because", "I", "You", each ``length`` tokens long in total (special tokens
and the seed word included), decoded (NFKD-normalised, "\\n\\n" -> " "), braces replaced by spaces
and ``". {}"`` appended. It draws them from torch's global RNG once per process (spec 7.3 #27);
here they come from ``jax.random.PRNGKey(seed)``, so a seed reproduces them, and callers store
the tuple with their results.

Sampling runs as one jitted prefill + ``fori_loop`` over the KV cache, all rows at once.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax import distributed
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward, init_cache, params_dtype
from mirage_jax.tokens import bucket

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
TOP_K = 5
DEFAULT_LENGTH_PARAMS = ((5, 10), (10, 10))

@functools.partial(jax.jit, static_argnums=(1, 5))
def _sample_top_k(params, cfg: ModelConfig, tokens, mask, key, max_new: int):
    """Top-k sampling of `max_new` tokens after left-padded prompts; returns [B, max_new] ids."""
    b, p = tokens.shape
    cache = init_cache(cfg, b, p + max_new, params_dtype(params))
    out = forward(params, cfg, tokens, attn_mask=mask, cache=cache, cache_index=0)
    prompt_len = mask[:, :p].sum(-1)

    def sample(logits, i):
        vals, idx = jax.lax.top_k(logits, TOP_K)
        choice = jax.random.categorical(jax.random.fold_in(key, i), vals, axis=-1)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def body(i, carry):
        cache, logits, mask, out_ids = carry
        tok = sample(logits, i)
        out_ids = out_ids.at[:, i].set(tok)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((b, 1), mask.dtype), p + i, 1)
        step = forward(params, cfg, tok[:, None], attn_mask=mask, positions=(prompt_len + i)[:, None],
                       cache=cache, cache_index=p + i)
        return step.cache, step.logits[:, -1], mask, out_ids

    init = (out.cache, out.logits[:, -1], mask, jnp.zeros((b, max_new), jnp.int32))
    return jax.lax.fori_loop(0, max_new, body, init)[3]


def sample_texts(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], lengths: Sequence[int],
                 key: jax.Array) -> list[str]:
    """One top-k sample per prompt, `lengths[i]` tokens in total (prompt tokens included)."""
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    max_new = max(1, max(n - len(i) for n, i in zip(lengths, ids)))
    p = bucket(max(len(i) for i in ids), 4)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(ids), p), pad, np.int32)
    mask = np.zeros((len(ids), p + max_new), np.int32)
    for r, row in enumerate(ids):
        tokens[r, p - len(row):] = row
        mask[r, p - len(row):p] = 1
    new = distributed.fetch(_sample_top_k(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), key, max_new))
    texts = []
    for row, gen, n in zip(ids, new, lengths):
        full = row + [int(t) for t in gen[: max(0, n - len(row))]]
        text = tokenizer.decode(full, skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


def context_templates(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Any,
    seed: int = 0,
    length_params: Sequence[Sequence[int]] = DEFAULT_LENGTH_PARAMS,
) -> tuple[str, ...]:
    """``("{}", "<sample>. {}", ...)``: 1 + sum(n) templates sampled from this model.

    The seed samples them once per process, before any edit: a run does the same by sampling
    them once from the unedited model (`EditMethod.prepare`) and passing them to every edit,
    instead of a hidden cache. A call is a pure function of (model, seed, length_params)."""
    length_params = tuple((int(length), int(n)) for length, n in length_params)
    prompts, lengths = [], []
    for length, n in length_params:
        for word in SEED_WORDS:
            prompts += [word] * (n // len(SEED_WORDS))
            lengths += [length] * (n // len(SEED_WORDS))
    texts = sample_texts(params, cfg, tokenizer, prompts, lengths, jax.random.PRNGKey(seed)) if prompts else []
    return ("{}",) + tuple(t.replace("{", " ").replace("}", " ") + ". {}" for t in texts)


def templates_for(params: Any, cfg: ModelConfig, tokenizer: Any, hp: Any,
                  templates: Sequence[str] | None = None) -> tuple[str, ...]:
    """`templates` when the caller sampled them already (once per run), else those `hp` asks for
    (`template_seed`, `context_template_length_params`) sampled from `params` now."""
    if templates is not None:
        return tuple(templates)
    return context_templates(params, cfg, tokenizer, hp.template_seed, hp.context_template_length_params)


def template_prefix(template: str) -> str:
    """The text a template puts before the prompt ("<sample>. " for "<sample>. {}")."""
    if not template.endswith("{}") or "{}" in template[:-2]:
        raise ValueError(f"context template must end with a single '{{}}': {template!r}")
    return template[:-2]
