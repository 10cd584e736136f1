"""Key-statistics throughput (`mirage_jax.editing.stats.compute_key_stats`, the C = E[k kᵀ] that
ROME/MEMIT/AlphaEdit read) in real tokens per second, against the machine's own FLOP bound, and
the time a full statistics run would take at that rate.

    python benchmarks/key_stats_speed.py                                    # default model, CPU
    python benchmarks/key_stats_speed.py --random_llama7b --tokenizer=DIR   # 7B shape, layers 4-8, GPU

Why: the reference stack needs ~36-40 h for Llama-2-7B's statistics (its users ask for the files
instead); the issue asks for under 30 minutes on a GPU. The run goes through the real code path
(tokenise, pack into static widths, one forward up to the top edited layer, float32 Xᵀ X per layer)
on a synthetic corpus of documents that fill `--max_len` tokens, so every batch is full width:
the worst case of the real corpus, whose documents are often shorter.

The bound: the forward's matmul FLOPs (layers 0..max(layers), 2 x parameters + attention per
token) at the device's measured bfloat16/parameter-dtype matmul rate, plus the Xᵀ X FLOPs
(2 F² per token per layer) at the rate of the dtype `stats._gram` sums in (the keys' own for a
16-bit model, float32 HIGHEST otherwise: the sums stay exact). Both rates are measured here with
one large matmul each, so the ratio says how close the pipeline gets to what this device does,
not to a datasheet.

Two rates are printed: end to end (tokenising, packing, one chunk's L x F² float32 sums sent to
the host and added in float64 -- a fixed cost a full run pays once per `checkpoint_every`=1000
documents, here once per `--docs`), and the device step alone (`stats._key_moments` on one full
batch, repeated), which is what a full run approaches between its chunk ends.
"""

from __future__ import annotations

import functools
import random
import time

from absl import app, flags

from common import define_subject_flags, random_llama7b_model
from mirage_jax import cli

FLAGS = flags.FLAGS
define_subject_flags()
flags.DEFINE_list("layers", None, "layers whose statistics are gathered (default: MEMIT's for the model)")
flags.DEFINE_integer("docs", 64, "documents in the timed run (after one warm-up run of the same shapes)")
flags.DEFINE_integer("max_len", 1024, "tokens per document (the cap `compute_key_stats` uses)")
flags.DEFINE_integer("batch_tokens", 8192, "rows x width of one batch")
flags.DEFINE_integer("full_docs", 100_000, "documents of a full statistics run (the seed's mom2_n_samples)")


def _matmul_rate(dtype, precision, n: int) -> float:
    """FLOP/s of one n x n x n matmul in `dtype` at `precision`, median of 3 after a warm-up."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[1]


def _step_rate(model, layers: list[int], width: int, repeats: int = 5) -> float:
    """Tokens/s of the jitted accumulation step alone on one full batch of random ids."""
    import jax.numpy as jnp
    import numpy as np

    from mirage_jax.editing import stats

    rows = max(1, FLAGS.batch_tokens // width)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (rows, width)), jnp.int32)
    mask = jnp.ones_like(tokens)
    f = model.cfg.intermediate_size
    acc = jnp.zeros((len(layers), f, f), jnp.float32)
    step = functools.partial(stats._key_moments, cfg=model.cfg, layers=tuple(layers))
    acc = step(model.params, acc, tokens, mask).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        acc = step(model.params, acc, tokens, mask)
    acc.block_until_ready()
    return repeats * rows * width / (time.perf_counter() - t0)


def _documents(tokenizer, n: int, max_len: int, seed: int) -> list[str]:
    """`n` texts of random vocabulary words, each at least `max_len` tokens long."""
    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii()][:20000] or ["word"]
    return [" ".join(rng.choice(words) for _ in range(2 * max_len)) for _ in range(n)]


def main(argv):
    import jax
    import jax.numpy as jnp

    from mirage_jax.editing import stats

    if FLAGS.random_llama7b:
        layers = [int(x) for x in FLAGS.layers or (4, 5, 6, 7, 8)]
        model = random_llama7b_model(FLAGS.tokenizer, num_layers=max(layers) + 1)
    else:
        from configs import get_hparams

        model = cli.load_model_from_flags()
        layers = [int(x) for x in FLAGS.layers or get_hparams("MEMIT", model.name).layers]
    cfg, w = model.cfg, FLAGS.max_len
    print(f"{model.name} on {jax.devices()[0].device_kind}: layers {layers}, F={cfg.intermediate_size}, "
          f"{FLAGS.docs} documents x {w} tokens, {FLAGS.batch_tokens} tokens a batch")

    def run(seed: int) -> float:
        corpus = stats.corpus_from_texts(f"synthetic{seed}", _documents(model.tokenizer, FLAGS.docs, w, seed))
        t0 = time.perf_counter()
        out = stats.compute_key_stats(model, layers, corpus, n_samples=FLAGS.docs, max_len=w,
                                      batch_tokens=FLAGS.batch_tokens, cache_dir=None, progress=False)
        seconds = time.perf_counter() - t0
        assert out.count(layers[0]) == FLAGS.docs * w, (out.count(layers[0]), FLAGS.docs * w)
        return seconds

    first = run(0)
    seconds = run(1)
    tokens = FLAGS.docs * w
    rate = tokens / seconds
    step_rate = _step_rate(model, layers, w)
    print(f"first run (compiles) {first:.1f} s; steady {seconds:.2f} s = {rate:,.0f} tokens/s end to end; "
          f"device step alone {step_rate:,.0f} tokens/s")

    # FLOPs per token: matmuls of layers 0..max(layers) (attention scores and values at the mean
    # causal length w/2, as a dense kernel computes them at full w: count w), and Xᵀ X per layer.
    d, f, depth = cfg.hidden_size, cfg.intermediate_size, max(layers) + 1
    hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * (d * hq + 2 * d * hk + hq * d + 3 * d * f) + 2 * 2 * w * hq
    fwd, xtx = depth * per_layer, len(layers) * 2 * f * f
    pdtype = jax.tree_util.tree_leaves(model.params)[0].dtype
    n = 8192 if jax.devices()[0].platform != "cpu" else 1024
    fwd_rate = _matmul_rate(pdtype, jax.lax.Precision.DEFAULT, n)
    sixteen = pdtype in stats.GRAM_OWN_DTYPES  # the keys' dtype: how `stats._gram` multiplies them
    xtx_rate = fwd_rate if sixteen else _matmul_rate(jnp.float32, jax.lax.Precision.HIGHEST, n)
    bound = 1.0 / (fwd / fwd_rate + xtx / xtx_rate)
    print(f"per token: forward {fwd / 1e9:.2f} GFLOP ({pdtype}, device matmul {fwd_rate / 1e12:.1f} TFLOP/s), "
          f"Xᵀ X {xtx / 1e9:.2f} GFLOP ({f'{pdtype}, float32 sums' if sixteen else 'float32 HIGHEST'}, "
          f"{xtx_rate / 1e12:.1f} TFLOP/s)")
    print(f"FLOP bound {bound:,.0f} tokens/s; end to end {100 * rate / bound:.0f}% of it, device step "
          f"{100 * step_rate / bound:.0f}%")
    full = FLAGS.full_docs * w
    print(f"full statistics, {FLAGS.full_docs:,} documents x {w} tokens ({full / 1e6:.0f}M tokens, every "
          f"document full): {full / rate / 60:.1f} min at the end-to-end rate, {full / step_rate / 60:.1f} at the "
          f"device step's")


if __name__ == "__main__":
    app.run(main)
