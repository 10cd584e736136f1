"""Should the forward scan over stacked layers instead of unrolling them? Compile time vs run time.

    python benchmarks/scan_layers.py                                   # default model, CPU
    python benchmarks/scan_layers.py --random_llama7b --tokenizer=DIR  # 7B shape, bf16, GPU

Why this exists: compilation dominated every GPU run of issue 13 (10-60 s a program) and ~22 s of a
warm 20-sample CPU run is per-process program setup. `model/transformer.py` unrolls its layers (a
Python list of per-layer pytrees, so that an edit replaces one leaf). A `lax.scan` over the same
layers stacked on a leading axis traces and compiles one layer -- but every iteration then takes
its layer's weights out of the stack (a dynamic slice), which a backend may copy. This measures
both sides on the same weights before anyone changes the parameter layout:

- a decode step (batch `--batch`, one token, a KV cache of `--slots`), the cache updated in place
  in the scan's carry (the scan's best case: no per-layer cache copies in or out);
- a prompt-shaped forward (`--prefill_batch` x `--prefill_len` tokens, no cache), compute-bound.

For each: tracing + lowering time, compile time, and the median time of a call. The stacked copy
of the layers is built once, outside the timings (it doubles the parameter memory here; a real
change would hold only the stacked layout).
"""

from __future__ import annotations

import time

from absl import app, flags

from common import define_subject_flags, load_edit_subject

FLAGS = flags.FLAGS
define_subject_flags()
flags.DEFINE_integer("batch", 8, "rows of the decode step")
flags.DEFINE_integer("slots", 192, "KV cache slots of the decode step")
flags.DEFINE_integer("prefill_batch", 8, "rows of the prompt-shaped forward")
flags.DEFINE_integer("prefill_len", 64, "tokens per row of the prompt-shaped forward")
flags.DEFINE_integer("repeats", 5, "timed calls per program (median)")


def _scan_forward(cfg, params, tokens, positions, mask, cache=None, index=0):
    """The decoder with its layers in one `lax.scan` (no hooks, adapters or edit stacks): logits of
    the last position, and the stacked cache ``(k, v)`` ``[L, B, S, Hk, hd]`` when given."""
    import jax

    from mirage_jax.model import transformer as T

    where = T.Placement(positions, mask, index)

    def body(carry, xs):
        x, ck, cv, layer = carry
        kv = None if cache is None else (ck[layer], cv[layer])
        x, new_kv, _, _ = T._layer(cfg=cfg, p=xs, x=x, where=where, cache_kv=kv, layer=0, reads=(), adds={})
        if new_kv is not None:  # written back into the carried stack: updated in place, not copied out
            ck = jax.lax.dynamic_update_index_in_dim(ck, new_kv[0], layer, 0)
            cv = jax.lax.dynamic_update_index_in_dim(cv, new_kv[1], layer, 0)
        return (x, ck, cv, layer + 1), None

    ck, cv = cache if cache is not None else (0, 0)
    x = T.embed(params, cfg, tokens, positions)
    (x, ck, cv, _), _ = jax.lax.scan(body, (x, ck, cv, 0), params["layers"])
    return T.unembed(params, cfg, x[:, -1:])[:, 0], (ck, cv)


def _measure(fn, args, repeats: int, donate: tuple[int, ...]) -> tuple[float, float, float]:
    """(trace + lower s, compile s, median s a call) of `jax.jit(fn)` on `args`. A donated cache
    (`donate`: its argument index; the function returns it last) is threaded from call to call, as
    the decode loop does, so that its in-place update is what is timed, not a copy of the cache."""
    import jax
    import numpy as np

    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).trace(*args).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    args = list(args)

    def call():
        out = compiled(*args)
        if donate:
            args[donate[0]] = out[-1]
        jax.block_until_ready(out)

    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return t1 - t0, t2 - t1, float(np.median(times))


def main(argv):
    import jax
    import jax.numpy as jnp

    from mirage_jax.model.transformer import forward, init_cache, params_dtype, unembed

    cfg, params, _, name, _ = load_edit_subject(FLAGS.random_llama7b, FLAGS.tokenizer)
    dtype = params_dtype(params)
    stacked = {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}
    b, s, pb, pt = FLAGS.batch, FLAGS.slots, FLAGS.prefill_batch, FLAGS.prefill_len
    print(f"{name} on {jax.devices()[0].device_kind}, {cfg.num_layers} layers, {dtype}: decode step "
          f"{b} rows x {s} slots, prompt forward {pb} x {pt}, median of {FLAGS.repeats}")

    tok1, pos1, mask1 = jnp.zeros((b, 1), jnp.int32), jnp.full((b, 1), s // 2), jnp.ones((b, s), jnp.int32)
    toks, pos, mask = jnp.zeros((pb, pt), jnp.int32), jnp.tile(jnp.arange(pt), (pb, 1)), jnp.ones((pb, pt), jnp.int32)

    def unrolled_step(p, cache):
        out = forward(p, cfg, tok1, attn_mask=mask1, positions=pos1, cache=cache, cache_index=s // 2)
        return out.logits[:, -1], out.cache

    def scan_step(p, cache):
        return _scan_forward(cfg, p, tok1, pos1, mask1, cache, s // 2)

    def unrolled_prompt(p):  # the LM head on the last position only, as the scan's
        hidden = forward(p, cfg, toks, attn_mask=mask, positions=pos, return_logits=False).hidden
        return unembed(p, cfg, hidden[:, -1:])[:, 0]

    def scan_prompt(p):
        return _scan_forward(cfg, p, toks, pos, mask)[0]

    shape = (cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
    stacked_cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    cases = [("decode step", "unrolled", unrolled_step, (params, init_cache(cfg, b, s, dtype))),
             ("decode step", "scan", scan_step, (stacked, stacked_cache)),
             ("prompt forward", "unrolled", unrolled_prompt, (params,)),
             ("prompt forward", "scan", scan_prompt, (stacked,))]
    results = {}
    for what, how, fn, args in cases:
        tr, co, run = _measure(fn, args, FLAGS.repeats, (1,) if what == "decode step" else ())
        results[(what, how)] = (tr, co, run)
        print(f"  {what:15s} {how:9s} trace+lower {tr:6.2f} s  compile {co:6.2f} s  call {1e3 * run:9.2f} ms",
              flush=True)
    for what in ("decode step", "prompt forward"):
        (tu, cu, ru), (ts, cs, rs) = results[(what, "unrolled")], results[(what, "scan")]
        print(f"  {what:15s} scan vs unrolled: setup {(tu + cu) / (ts + cs):5.2f}x faster, "
              f"call {ru / rs:5.2f}x as fast")


if __name__ == "__main__":
    app.run(main)
