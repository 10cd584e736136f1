"""MEND throughput: meta-training steps/s and edits/s (steady state, compilation reported apart).

    python benchmarks/mend.py --steps=20 --edits=10                    # default model, CPU ok
    python benchmarks/mend.py --random_llama7b --tokenizer=DIR         # 7B shape, bf16, GPU

Meta-training uses one edit + one locality pair per step (the paper's batch size 1); edits are
single-request `mend_edit` calls with an untrained editor (the cost does not depend on training).
Requests: CounterFact records 5000+ for training, the first ones for editing, when
../shared/data/counterfact-edit.json exists; a synthetic family otherwise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from common import load_edit_subject

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "model to edit")
flags.DEFINE_bool("random_llama7b", False, "7B-shaped random bfloat16 Llama instead of --model")
flags.DEFINE_string("tokenizer", None, "tokenizer directory for --random_llama7b")
flags.DEFINE_integer("steps", 20, "meta-training steps timed after the compiling one")
flags.DEFINE_integer("edits", 10, "edits timed after the compiling one")
CF = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-edit.json"


def load():
    return load_edit_subject(FLAGS.model, FLAGS.random_llama7b, FLAGS.tokenizer)


def pairs(n: int, start: int):
    if CF.exists():
        rows = json.loads(CF.read_text())[start : start + n]
        return ([(r["prompt"], r["target_new"]) for r in rows],
                [(r["locality_prompt"], r["locality_ground_truth"]) for r in rows])
    edits = [(f"The mother tongue of person {i} is", "English") for i in range(n)]
    return edits, [(f"The capital of country {i} is", "Paris") for i in range(n)]


def main(argv):
    import jax

    from configs import get_hparams
    from mirage_jax.datasets import EditRequest
    from mirage_jax.editing.mend import mend_edit, train_mend

    cfg, params, tok, name = load()
    hp = get_hparams("MEND", name, key="llama-2-7b" if FLAGS.random_llama7b else None)
    edits, loc = pairs(FLAGS.steps + 1, 5000)
    t0 = time.perf_counter()
    editor, _ = train_mend(params, cfg, tok, edits[:1], loc[:1], hp, steps=1)
    jax.block_until_ready(editor)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    editor, _ = train_mend(params, cfg, tok, edits[1:], loc[1:], hp, steps=FLAGS.steps, editor=editor)
    jax.block_until_ready(editor)
    train_s = time.perf_counter() - t0
    reqs = [EditRequest(i, p, "", t, None, None, (), None) for i, (p, t) in enumerate(pairs(FLAGS.edits + 1, 0)[0])]
    t0 = time.perf_counter()
    jax.block_until_ready(mend_edit(params, cfg, tok, reqs[:1], hp)[0])
    edit_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in reqs[1:]:
        jax.block_until_ready(mend_edit(params, cfg, tok, [r], hp)[0])
    edit_s = time.perf_counter() - t0
    out = {"model": name, "device": jax.devices()[0].device_kind,
           "meta_steps_per_s": FLAGS.steps / train_s, "meta_first_step_s": first,
           "edits_per_s": FLAGS.edits / edit_s, "edit_first_s": edit_first}
    print(f"MEND {name} on {out['device']}: meta-training {out['meta_steps_per_s']:.2f} steps/s "
          f"(first step incl. compile {first:.1f} s); editing {out['edits_per_s']:.2f} edits/s "
          f"(first edit incl. compile {edit_first:.1f} s)")
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
