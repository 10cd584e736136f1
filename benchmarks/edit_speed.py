"""Seconds per ROME edit and per MEMIT batch, compile time reported apart from steady state.

    python benchmarks/edit_speed.py                         # default model (CPU ok)
    python benchmarks/edit_speed.py --random_llama7b --memit_batches=100 --tokenizer=DIR   # GPU

Requests come from CounterFact (data/counterfact-edit.json, shipped) when present, else from a
synthetic "The mother tongue of <name> is" family. MEMIT's covariance is a synthetic positive
definite matrix unless key statistics are cached for the model (timing does not depend on its
values). With `--random_llama7b` the model is a Llama-2-7B-shaped random pytree in bfloat16
whose vocabulary is widened to the borrowed tokenizer's (49,152 for SmolLM2's): random weights
never reach the early-stop loss, so every value optimisation runs its full 25 steps -- a worst
case for the optimisation time.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from absl import app, flags

from common import REPO, load_edit_subject
from mirage_jax import cli

FLAGS = flags.FLAGS
cli.define_model_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_bool("random_llama7b", False, "7B-shaped random bfloat16 Llama instead of --model")
flags.DEFINE_string("tokenizer", None, "tokenizer directory for --random_llama7b (default: the default model's)")
flags.DEFINE_integer("rome_edits", 3, "ROME edits timed after the compiling one")
flags.DEFINE_list("memit_batches", ["8"], "MEMIT batch sizes (requests edited at once)")
flags.DEFINE_string("data_path", str(REPO / "data" / "counterfact-edit.json"),
                    "CounterFact file for the requests")

NAMES = ["Danielle Darrieux", "Edwin of Northumbria", "Toko Yasuda", "Autonomous University of Madrid",
         "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Apple A5", "Honus Wagner", "Paul Tweed", "Kiril Pejchinovich"]


def requests(n: int):
    from mirage_jax.datasets import EditRequest, load_counterfact

    if Path(FLAGS.data_path).exists():
        reqs = list(load_counterfact(FLAGS.data_path, ds_size=n).requests)
        if len(reqs) >= n:
            return reqs
    return [EditRequest(i, f"The mother tongue of {NAMES[i % 10]} {i} is", f"{NAMES[i % 10]} {i}", "English",
                        None, None, (), None) for i in range(n)]


def load():
    return load_edit_subject(FLAGS.random_llama7b, FLAGS.tokenizer)


def timed(fn):
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out[0])
    return time.perf_counter() - t0, out


def main(argv):
    import numpy as np

    from configs import get_hparams
    from mirage_jax.editing.memit import MEMITConfig, memit_edit
    from mirage_jax.editing.rome import rome_edit
    from mirage_jax.editing.stats import KeyStats

    cfg, params, tok, name, _ = load()
    key = "llama-2-7b" if FLAGS.random_llama7b else None
    results = {"model": name, "device": __import__("jax").devices()[0].device_kind}

    hp = get_hparams("ROME", name, key=key)
    reqs = requests(1 + FLAGS.rome_edits)
    # The first edit samples the context templates; a run samples them once and reuses them (as here).
    first, (_, info) = timed(lambda: rome_edit(params, cfg, tok, reqs[:1], hp))
    templates = info["templates"]
    steady = [timed(lambda r=r: rome_edit(params, cfg, tok, [r], hp, templates=templates))[0] for r in reqs[1:]]
    results["rome"] = {"first_s": first, "steady_s_per_edit": float(np.mean(steady)),
                       "compile_s": first - float(np.mean(steady)), "layer": hp.layers[0]}
    print(f"ROME  {name}: first edit {first:.2f} s, steady {np.mean(steady):.3f} s/edit "
          f"(compile ~{first - np.mean(steady):.1f} s, {len(steady)} edits)", flush=True)

    layers = MEMITConfig().layers if FLAGS.random_llama7b else get_hparams("ROME", name).layers
    f = cfg.intermediate_size
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(f, f)).astype(np.float32) / np.sqrt(f)
    cov = basis @ basis.T + np.eye(f, dtype=np.float32)
    stats = KeyStats(dict.fromkeys(range(cfg.num_layers), (cov, 1)))
    mhp = MEMITConfig(layers=tuple(range(max(0, layers[0] - 2), layers[0] + 3)) if not FLAGS.random_llama7b
                      else MEMITConfig().layers, chunk_size=128)
    results["memit"] = {}
    for n in (int(b) for b in FLAGS.memit_batches):
        batch = requests(n)
        first, (_, info) = timed(functools.partial(memit_edit, params, cfg, tok, batch, mhp, stats))
        again, _ = timed(functools.partial(memit_edit, params, cfg, tok, batch, mhp, stats,
                                           templates=info["templates"]))
        results["memit"][n] = {"first_s": first, "steady_s": again, "compile_s": first - again}
        print(f"MEMIT {name}: batch of {n}: first {first:.2f} s, steady {again:.2f} s "
              f"({again / n * 1000:.1f} ms/edit; compile ~{first - again:.1f} s), layers {list(mhp.layers)}",
              flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
