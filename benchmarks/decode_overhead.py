"""Where a greedy decode step's time goes, against the weight-read bound -- the diagnosis the
batch-1 generation figure needs (an H200 measured 154 tok/s for the 7B shape, 44% of its HBM bound).

    python benchmarks/decode_overhead.py                                   # default model, CPU
    python benchmarks/decode_overhead.py --random_llama7b --tokenizer=DIR  # 7B shape, bf16, GPU

Three ways to take the same steps, on one model and batch:
- `generate_ids` (the library: prefill, the chunked `while_loop` with its stop checks, the host's
  text checks), per step from two runs that differ only in the number of new tokens (the prefill
  and the per-run host work cancel);
- a bare `lax.fori_loop` of forward steps in one program (no stop checks, no state beyond the
  cache and the token): what the loop costs without our bookkeeping;
- one jitted step per Python call (the cache donated): the dispatch-bound way.
The bound: the parameter bytes read once per step at the device's measured read bandwidth (one
large sum: every byte read once, nothing written), so the ratio is against what this device does,
not a datasheet.
"""

from __future__ import annotations

import functools
import time

from absl import app, flags

from common import define_subject_flags, load_edit_subject

FLAGS = flags.FLAGS
define_subject_flags()
flags.DEFINE_integer("batch", 1, "rows decoded together")
flags.DEFINE_integer("steps", 64, "decode steps timed")
flags.DEFINE_integer("prompt_len", 32, "prompt tokens (the bare loops start after them in the cache)")


def _best(f, repeats: int = 3) -> float:
    """Fastest of `repeats` timed calls of `f` (after one warm-up call)."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def _bandwidth() -> float:
    """Bytes/s of one large reduction (each byte read once): a decode step's weight reads."""
    import jax
    import jax.numpy as jnp

    n = (1 << 30) if jax.devices()[0].platform != "cpu" else (1 << 27)  # 4 GB / 512 MB of float32
    x = jnp.zeros((n,), jnp.float32)
    f = jax.jit(jnp.sum)
    return 4 * n / _best(lambda: f(x).block_until_ready())


def main(argv):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mirage_jax.generate import generate_ids
    from mirage_jax.model.transformer import forward, init_cache, params_dtype

    cfg, params, tok, name, _ = load_edit_subject(FLAGS.random_llama7b, FLAGS.tokenizer)
    b, n, p = FLAGS.batch, FLAGS.steps, FLAGS.prompt_len
    dtype = params_dtype(params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    print(f"{name} on {jax.devices()[0].device_kind}: batch {b}, {n} steps after {p} prompt tokens, "
          f"{weight_bytes / 1e9:.2f} GB of parameters")

    # 1. the library, per step: two runs differing only in new tokens.
    fixed = cfg.replace(eos_token_ids=())
    rows = [[int(t) for t in np.random.default_rng(r).integers(3, cfg.vocab_size, p)] for r in range(b)]

    def library(new: int) -> float:
        def run():
            out = generate_ids(params, fixed, tok, rows, max_new_tokens=new, batch_size=b, chunk=new)
            assert all(len(g.ids) == new for g in out)
        return _best(run)

    short, long = library(n // 4), library(n)
    lib = (long - short) / (n - n // 4)

    # 2. a bare fori_loop of forward steps; 3. one jitted step per call.
    slots = p + n + 1
    ones = jnp.ones((b, slots), jnp.int32)

    def step(params, cache, token, slot):
        out = forward(params, cfg, token[:, None], attn_mask=ones, positions=jnp.full((b, 1), slot),
                      cache=cache, cache_index=slot)
        return out.cache, jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def loop(params, cache, token):
        return jax.lax.fori_loop(p, p + n, lambda i, c: step(params, *c, i), (cache, token))

    one = jax.jit(step, donate_argnums=(1,))
    token0 = jnp.zeros((b,), jnp.int32)

    def run_loop():
        jax.block_until_ready(loop(params, init_cache(cfg, b, slots, dtype), token0))

    def run_steps():
        cache, token = init_cache(cfg, b, slots, dtype), token0
        for i in range(p, p + n):
            cache, token = one(params, cache, token, jnp.int32(i))
        jax.block_until_ready(token)

    bare, each = _best(run_loop) / n, _best(run_steps) / n
    bw = _bandwidth()
    bound = weight_bytes / bw
    print(f"device read bandwidth {bw / 1e9:,.0f} GB/s -> weight-read bound {1e3 * bound:.2f} ms a step "
          f"({b / bound:,.0f} tok/s)")
    for label, s in (("generate_ids (library)", lib), ("bare fori_loop", bare), ("one jitted step per call", each)):
        print(f"  {label:26s} {1e3 * s:8.2f} ms a step = {b / s:9,.1f} tok/s, {100 * bound / s:5.1f}% of the bound")


if __name__ == "__main__":
    app.run(main)
