"""Jitted, batched, KV-cached greedy decoding with static shapes, and the quick-look command.

Shapes are bucketed so that XLA compiles a handful of programs, not one per prompt: prompt length
to a power of two (>= 16), batch to a power of two (<= `batch_size`). The decode loop is a
`lax.while_loop` that stops early when every row has finished; it runs in chunks of `chunk`
steps so that, between chunks, the host can check stop *strings* (and any stop rule) on the
decoded text -- something token ids alone cannot express ("." inside ".\\n", "Robert C. Newton").

    python -m mirage_jax.generate --model=default --prompt='The capital of France is' --max_new_tokens=12
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward, init_cache
from mirage_jax.tokens import bucket

StopFn = Callable[[str], bool]


class GenerationError(ValueError):
    """Bad generation input (empty prompt, prompt longer than the model's context...)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's output: new token ids (up to and including the stop) and their text."""

    ids: tuple[int, ...]
    text: str  # decoded with special tokens skipped
    raw_text: str  # decoded with special tokens kept (what stop strings see)
    stopped_by: str  # 'eos', 'stop' (string / stop rule) or 'length'


@functools.partial(jax.jit, static_argnums=(1,))
def _prefill(params, cfg: ModelConfig, tokens, mask, cache):
    out = forward(params, cfg, tokens, attn_mask=mask, cache=cache, cache_index=0)
    return out.cache, jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)


def _decode_impl(params, cfg: ModelConfig, cache, state, limit, stop_ids):
    """Greedy steps from `state['step']` until `limit` or until every row is done."""

    def cond(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def body(s):
        c, step = s["cache"], s["step"]
        tok = s["next"]
        out_tokens = s["out"].at[:, step].set(jnp.where(s["done"], -1, tok))
        done = s["done"] | jnp.isin(tok, stop_ids)
        slot = s["prompt_slots"] + step
        mask = jax.lax.dynamic_update_slice_in_dim(s["mask"], jnp.ones((tok.shape[0], 1), jnp.int32), slot, 1)
        pos = (s["prompt_len"] + step)[:, None]
        out = forward(params, cfg, tok[:, None], attn_mask=mask, positions=pos, cache=c, cache_index=slot)
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        return dict(s, cache=out.cache, step=step + 1, next=nxt, out=out_tokens, done=done, mask=mask)

    s = jax.lax.while_loop(cond, body, dict(state, cache=cache))
    return s["cache"], {k: v for k, v in s.items() if k != "cache"}


_decode = jax.jit(_decode_impl, static_argnums=(1,))
# Donating the cache lets XLA update it in place on GPU/TPU; the CPU backend ignores donation
# with a warning, so the donating variant is only used off-CPU.
_decode_donating = jax.jit(_decode_impl, static_argnums=(1,), donate_argnums=(2,))


def _decode_fn():
    return _decode if jax.default_backend() == "cpu" else _decode_donating


def _first_stop(tokenizer, ids: list[int], stop_strings: Sequence[str], stop_fn: StopFn | None) -> int | None:
    """Smallest n such that the text of ids[:n] hits a stop string or the stop rule."""
    if not stop_strings and stop_fn is None:
        return None
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if not any(s in text for s in stop_strings) and not (stop_fn and stop_fn(text)):
        return None
    for n in range(1, len(ids) + 1):
        t = tokenizer.decode(ids[:n], skip_special_tokens=False)
        if any(s in t for s in stop_strings) or (stop_fn and stop_fn(t)):
            return n
    return None


def encode_prompts(tokenizer, prompts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Tokenise; an empty prompt is an error naming its index (nothing to condition on)."""
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise GenerationError(f"prompt {i} is empty; give at least one character")
        ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise GenerationError(f"prompt {i} tokenises to nothing: {p!r}")
        out.append(list(ids))
    return out


def generate_ids(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 50,
    stop_strings: Sequence[str] = (),
    stop_fn: StopFn | None = None,
    batch_size: int = 32,
    chunk: int = 16,
) -> list[Generation]:
    """Greedy-decode every prompt (token ids); results in input order."""
    if max_new_tokens < 1:
        raise GenerationError("max_new_tokens must be >= 1")
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths together
    results: list[Generation | None] = [None] * len(prompt_ids)
    stop_ids = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
    new_bucket = bucket(max_new_tokens, 16)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [list(prompt_ids[i]) for i in idx]
        gens = _generate_batch(params, cfg, tokenizer, rows, max_new_tokens, new_bucket, stop_ids,
                               stop_strings, stop_fn, batch_size, chunk)
        for i, g in zip(idx, gens):
            results[i] = g
    return results  # type: ignore[return-value]


def _generate_batch(params, cfg, tokenizer, rows, max_new, new_bucket, stop_ids, stop_strings, stop_fn,
                    batch_size, chunk) -> list[Generation]:
    n = len(rows)
    longest = max(len(r) for r in rows)
    p = bucket(longest)
    # RoPE models extrapolate past their trained context (badly, but it is the user's call); a
    # learned position table simply has no rows there.
    if cfg.learned_positions and longest + max_new > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt of {longest} tokens + {max_new} new exceeds the model's {cfg.max_position_embeddings} positions"
        )
    b = min(bucket(n, 1), bucket(batch_size, 1))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((b, p), pad, np.int32)
    mask = np.zeros((b, p + new_bucket), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, p - len(ids):] = ids
        mask[r, p - len(ids):p] = 1
    mask[n:, p - 1] = 1  # filler rows: one visible token keeps softmax finite
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    cache = init_cache(cfg, b, p + new_bucket, dtype)
    cache, nxt = _prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), cache)
    prompt_len = mask[:, :p].sum(-1).astype(np.int32)
    done = np.arange(b) >= n
    state = dict(step=jnp.int32(0), next=nxt, out=jnp.full((b, new_bucket), -1, jnp.int32),
                 done=jnp.asarray(done), mask=jnp.asarray(mask), prompt_len=jnp.asarray(prompt_len),
                 prompt_slots=jnp.int32(p))
    decode = _decode_fn()
    stopped = [None] * n  # per row: number of kept tokens when a stop string / rule fired
    step = 0
    while step < max_new:
        limit = min(step + chunk, max_new)
        cache, state = decode(params, cfg, cache, state, jnp.int32(limit), stop_ids)
        step = int(state["step"])
        out = np.asarray(state["out"])
        done = np.asarray(state["done"]).copy()
        for r in range(n):
            if stopped[r] is None and (stop_strings or stop_fn):
                ids = [int(t) for t in out[r, :step] if t >= 0]
                hit = _first_stop(tokenizer, ids, stop_strings, stop_fn)
                if hit is not None:
                    stopped[r] = hit
                    done[r] = True
        state["done"] = jnp.asarray(done)
        if done.all():
            break
    out = np.asarray(state["out"])
    eos = set(cfg.eos_token_ids)
    gens = []
    for r in range(n):
        ids = [int(t) for t in out[r, :max_new] if t >= 0]
        if stopped[r] is not None:
            ids, why = ids[: stopped[r]], "stop"
        elif ids and ids[-1] in eos:
            why = "eos"
        else:
            why = "length"
        gens.append(Generation(tuple(ids), tokenizer.decode(ids, skip_special_tokens=True),
                               tokenizer.decode(ids, skip_special_tokens=False), why))
    return gens


def generate(
    model: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 50,
    stop_strings: Sequence[str] = (),
    stop_fn: StopFn | None = None,
    add_special_tokens: bool = True,
    batch_size: int = 32,
    chunk: int = 16,
) -> list[Generation]:
    """Greedy continuation of each prompt string with a loaded `Model`."""
    ids = encode_prompts(model.tokenizer, prompts, add_special_tokens)
    return generate_ids(model.params, model.cfg, model.tokenizer, ids, max_new_tokens=max_new_tokens,
                        stop_strings=stop_strings, stop_fn=stop_fn, batch_size=batch_size, chunk=chunk)


def chat_prompt(tokenizer: Any, question: str) -> str:
    """One user turn in the tokenizer's own chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("this tokenizer has no chat template; drop --chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from mirage_jax.model import load_model

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    model = load_model(f.model, dtype=f.dtype)
    prompt = f.prompt
    add_special = True
    if f.chat:
        prompt = chat_prompt(model.tokenizer, prompt)
        add_special = False  # the template already carries its own special tokens
    [g] = generate(model, [prompt], max_new_tokens=f.max_new_tokens, add_special_tokens=add_special)
    print(g.text)


def _flags() -> None:
    from absl import flags

    flags.DEFINE_string("model", "default", "'default', an HF checkpoint directory or a .gguf file")
    flags.DEFINE_string("prompt", None, "text to continue", required=True)
    flags.DEFINE_integer("max_new_tokens", 50, "number of tokens to generate at most")
    flags.DEFINE_bool("chat", False, "wrap the prompt in the model's chat template as one user turn")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype")


if __name__ == "__main__":
    from absl import app

    _flags()
    app.run(main)
