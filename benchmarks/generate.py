"""Greedy generation throughput: mirage_jax's jitted KV-cached loop vs `transformers.generate`.

Both sides decode the same token ids (left-padded batches) for exactly `--max_new_tokens` new
tokens: ours with EOS disabled (`cfg.replace(eos_token_ids=())`), HF with
`min_new_tokens=max_new_tokens`. Throughput = new tokens generated / wall time of a call, measured
after a warm-up call (for us that call compiles; its time is reported separately).

    python benchmarks/generate.py                                    # default model, CPU or GPU
    python benchmarks/generate.py --batch_sizes=1,8 --max_new_tokens=32
    python benchmarks/generate.py --random_llama7b                   # 7B-shaped, bf16, GPU

`--random_llama7b` builds a Llama-2-7B-shaped parameter pytree with `jax.random` directly in
bfloat16 (no checkpoint) and borrows the default model's tokenizer (ids are taken modulo the
32000-token vocabulary: with random weights only the shapes matter). Its HF baseline is a
randomly initialised `LlamaForCausalLM` in bfloat16 on CUDA; without CUDA the baseline is skipped
(a 7B model on CPU in PyTorch would take hours for the table).
"""

from __future__ import annotations

import os

# Both frameworks share one GPU: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import functools
import json
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

from common import LLAMA2_7B, REPO, benchmark_tokenizer, define_subject_flags, llama7b_hf_config, random_llama_params
from mirage_jax import cli

FLAGS = flags.FLAGS
define_subject_flags(dtype_default=None)  # None: float32, or bfloat16 with --random_llama7b
flags.adopt_module_key_flags(cli)
flags.DEFINE_list("batch_sizes", ["1", "32"], "batch sizes to measure")
flags.DEFINE_integer("max_new_tokens", 64, "new tokens per prompt (forced: EOS is disabled)")
flags.DEFINE_integer("n_prompts", 0, "prompts per measured run, in batches of the batch size "
                     "(0: one full batch)")
flags.DEFINE_integer("repeats", 3, "timed runs per batch size after the warm-up; the median is reported")
flags.DEFINE_bool("hf", True, "also run the transformers (PyTorch) baseline")

QAEDIT = REPO / "data" / "QAEdit_inter_1k.json"
FALLBACK_QUESTIONS = [
    "What is the capital of France?", "Who wrote the novel Pride and Prejudice?",
    "When did the first man land on the moon?", "What is the largest planet in the solar system?",
    "Who painted the Mona Lisa?", "What language is spoken in Brazil?",
    "How many bones are in the adult human body?", "Which element has the chemical symbol Fe?",
]

@functools.cache
def _question_pool() -> tuple[str, ...]:
    if QAEDIT.exists():
        qs = [r["prompt"].strip() for r in json.loads(QAEDIT.read_text())]
    else:
        print(f"note: {QAEDIT} not found, using {len(FALLBACK_QUESTIONS)} built-in questions", file=sys.stderr)
        qs = FALLBACK_QUESTIONS
    return tuple(q[0].upper() + q[1:] + ("" if q.endswith("?") else "?") for q in qs)


def questions(n: int) -> list[str]:
    """`n` realistic prompts: QAEdit questions (NQ/TQA/SQA) from data/."""
    qs = _question_pool()
    return [f"Question: {qs[i % len(qs)]}\nAnswer:" for i in range(n)]


def load_ours(dtype: str):
    """(cfg, params, tokenizer, description) of the model under test."""
    import jax
    import jax.numpy as jnp

    from mirage_jax.model import ModelConfig

    if FLAGS.random_llama7b:
        tok = benchmark_tokenizer(FLAGS.tokenizer)
        cfg = ModelConfig(model_type="llama", **LLAMA2_7B)
        t0 = time.perf_counter()
        params = jax.block_until_ready(random_llama_params(cfg, dtype=getattr(jnp, dtype)))
        print(f"random Llama-2-7B-shaped params ({dtype}) built in {time.perf_counter() - t0:.1f}s")
        return cfg, params, tok, f"random Llama-2-7B shape, {dtype}"
    m = cli.load_model_from_flags(dtype=dtype)
    return m.cfg, m.params, m.tokenizer, f"{m.name}, {dtype}"


def prompt_ids(tok, cfg, n: int) -> list[list[int]]:
    from mirage_jax.generate import encode_prompts

    ids = encode_prompts(tok, questions(n))
    return [[t % cfg.vocab_size for t in row] for row in ids]  # only changes anything for the random 7B


def batches(rows, b):
    return [rows[i : i + b] for i in range(0, len(rows), b)]


def time_ours(cfg, params, tok, rows, b: int, new: int) -> tuple[float, list[float]]:
    """(first call seconds, timed runs' seconds); every row must get exactly `new` tokens."""
    from mirage_jax.generate import generate_ids

    fixed = cfg.replace(eos_token_ids=())  # no stop: every row decodes `new` tokens

    def run():
        t0 = time.perf_counter()
        out = generate_ids(params, fixed, tok, rows, max_new_tokens=new, batch_size=b, chunk=new)  # syncs
        dt = time.perf_counter() - t0
        assert all(len(g.ids) == new for g in out), [len(g.ids) for g in out]
        return dt

    first = run()
    return first, [run() for _ in range(FLAGS.repeats)]


def load_hf(dtype: str, device: str):
    import torch
    import transformers

    tdtype = getattr(torch, dtype)
    if FLAGS.random_llama7b:
        hf_cfg = transformers.AutoConfig.for_model(**llama7b_hf_config(LLAMA2_7B["vocab_size"]))
        with torch.device(device):  # initialise on the GPU directly, in bf16
            model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=tdtype)
        return model.eval()
    if FLAGS.model == "default" or FLAGS.model.endswith(".gguf"):
        from mirage_jax.model.gguf import default_gguf_path

        path = default_gguf_path() if FLAGS.model == "default" else Path(FLAGS.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=tdtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(FLAGS.model, dtype=tdtype)
    return model.to(device).eval()


def time_hf(model, device: str, rows, b: int, new: int, pad: int) -> list[float]:
    """Timed runs of HF greedy generate over the same left-padded batches (after one warm-up)."""
    import torch

    tensors = []
    for chunk in batches(rows, b):
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        tensors.append((ids.to(device), mask.to(device)))

    def run():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in tensors:
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=pad)
                assert out.shape[1] == ids.shape[1] + new, out.shape
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()  # warm-up (CUDA kernels, caches)
    return [run() for _ in range(FLAGS.repeats)]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    dtype = FLAGS.dtype or ("bfloat16" if FLAGS.random_llama7b else "float32")
    sizes = [int(s) for s in FLAGS.batch_sizes]
    new = FLAGS.max_new_tokens
    cfg, params, tok, what = load_ours(dtype)
    print(f"model: {what}; jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"max_new_tokens={new}, repeats={FLAGS.repeats} (median)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    work = {b: prompt_ids(tok, cfg, FLAGS.n_prompts or b) for b in sizes}

    ours = {}
    for b in sizes:
        first, runs = time_ours(cfg, params, tok, work[b], b, new)
        ours[b] = (first, statistics.median(runs))
        n_tok = len(work[b]) * new
        print(f"  ours  batch {b:>3}: first call {first:7.2f}s (compile + run), "
              f"then {ours[b][1]:.3f}s = {n_tok / ours[b][1]:.1f} tok/s")

    theirs: dict[int, float] = {}
    baseline_note = ""
    if FLAGS.hf:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if FLAGS.random_llama7b and device != "cuda":
            baseline_note = "HF baseline skipped: a random 7B model needs torch with CUDA, which is not available"
        else:
            if FLAGS.random_llama7b:  # free our 13 GB before PyTorch allocates its own copy
                del params
                jax.clear_caches()
            model = load_hf(dtype, device)
            baseline_note = (f"HF: transformers {__import__('transformers').__version__}, "
                             f"torch {torch.__version__} on {device}")
            for b in sizes:
                theirs[b] = statistics.median(time_hf(model, device, work[b], b, new, pad))
                print(f"  HF    batch {b:>3}: {theirs[b]:.3f}s = {len(work[b]) * new / theirs[b]:.1f} tok/s")
    else:
        baseline_note = "HF baseline not run (--nohf)"

    print()
    print(baseline_note)
    print(f"{'batch':>5} {'prompts':>7} {'compile s':>9} {'ours tok/s':>10} {'HF tok/s':>10} {'ours/HF':>8}")
    for b in sizes:
        n_tok = len(work[b]) * new
        first, steady = ours[b]
        mine = n_tok / steady
        hf = f"{n_tok / theirs[b]:10.1f}" if b in theirs else f"{'-':>10}"
        ratio = f"{mine / (n_tok / theirs[b]):8.2f}" if b in theirs else f"{'-':>8}"
        print(f"{b:>5} {len(work[b]):>7} {max(first - steady, 0.0):9.2f} {mine:10.1f} {hf} {ratio}")
    print("compile s = first call - steady-state call (the warm-up's compilation overhead)")


if __name__ == "__main__":
    app.run(main)
