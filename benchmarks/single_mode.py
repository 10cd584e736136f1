"""Samples per second of a single-editing run (the paper's protocol: edit, then synthetic and WILD
evaluation of that sample on its own edited model), evaluating edits one by one vs in stacks.

The same `runner.run` as `launch.py`, on the same records, twice: `stack_edits=1` (every edited
model evaluated alone: WILD generation at batch ~3-8) and `stack_edits=K` (K edited models answer
their questions in one batched pass, `mirage_jax.model.stack`). The pre-edit evaluation is done
once beforehand and shared (both runs read it from the cache), so the figures are the per-sample
work: the edit plus its post-edit evaluation. Both runs are warmed up first on other records, so
compilation is mostly outside the timing. Prints seconds per sample (edit / evaluation apart),
samples per second, the ratio, and how many result rows differ between the two runs (the stacked
evaluation is the same computation in another batch layout: rows should agree).

    python benchmarks/single_mode.py --method=FT-M --dataset=qaedit --n_records=20 --stack_edits=16

`--random_llama7b` is a GPU's figure: its answers are noise that runs to the token budget (the timing's
worst case), and its near-tied bfloat16 logits flip under another batch layout, so rows may differ.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from absl import app, flags

from common import REPO, define_subject_flags, random_llama7b_model
from mirage_jax import cli

FLAGS = flags.FLAGS
define_subject_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_string("method", "FT-M", "editing method (one without extra files: FT-M, ROME, GRACE, WISE...)")
flags.DEFINE_enum("dataset", "qaedit", ["qaedit", "counterfact"], "shipped dataset (data/)")
flags.DEFINE_integer("n_records", 20, "records timed")
flags.DEFINE_integer("warmup", 4, "records edited and evaluated before timing, by both variants (compilation)")
flags.DEFINE_integer("stack_edits", 16, "edited models evaluated together in the stacked run")
flags.DEFINE_bool("one_by_one", True, "also time the one-by-one run (off: the stacked run only, where a short "
                  "device lease has measured the other before)")
flags.DEFINE_enum("evaluation", "both", ["wild", "synthetic", "both"], "evaluation type(s)")
flags.DEFINE_enum("context_type", "chat_temp", ["question-only", "qa_inst", "chat_temp"], "WILD input wrapping")
flags.DEFINE_enum("stop_rule", "improved", ["seed", "improved"], "WILD answer end (issue 13's setting: seed)")

DATA = {"qaedit": REPO / "data" / "QAEdit_inter_1k.json", "counterfact": REPO / "data" / "counterfact-edit.json"}


def _rows(out: Path) -> list[dict]:
    [path] = [p for p in out.glob("*.jsonl") if not p.name.endswith("_curve.jsonl")]
    return [json.loads(x) for x in path.read_text().splitlines()]


def main(argv):
    from configs import get_hparams
    from mirage_jax import datasets
    from mirage_jax.editing import get_method
    from mirage_jax.evaluation.judge import ExactMatchJudge
    from mirage_jax.evaluation.wild import WildConfig
    from mirage_jax.runner import RunConfig, pre_edit, run

    method = get_method(FLAGS.method)
    if FLAGS.random_llama7b:
        model = random_llama7b_model(FLAGS.tokenizer)
        hp = get_hparams(method.name, model.name, key="llama-2-7b")
    else:
        model = cli.load_model_from_flags()
        hp = get_hparams(method.name, model.name)
    n, w = FLAGS.n_records, FLAGS.warmup
    data = datasets.load_dataset(FLAGS.dataset, str(DATA[FLAGS.dataset]), n + w)
    timed, warm = list(data.requests[:n]), list(data.requests[n : n + w])
    judge = ExactMatchJudge()
    root = Path(tempfile.mkdtemp(prefix="single_mode_"))
    base = RunConfig(method=method.name, model_name=model.name, dataset=FLAGS.dataset, data_path=data.path,
                     evaluation=FLAGS.evaluation,
                     wild=WildConfig(context_type=FLAGS.context_type, stop_rule=FLAGS.stop_rule),
                     output_dir=str(root / "pre"))
    t0 = time.perf_counter()
    pre_edit(model, timed + warm, base, judge)
    pre_s = time.perf_counter() - t0
    print(f"pre-edit evaluation of {n + w} records (shared, batched {base.eval_batch}): {pre_s:.1f} s")
    results = {}
    for k in (1, FLAGS.stack_edits) if FLAGS.one_by_one else (FLAGS.stack_edits,):
        rc = dataclasses.replace(base, stack_edits=k)
        for name, reqs in (("warm", warm), ("timed", timed)):
            out = root / f"{name}{k}"
            shutil.copytree(root / "pre" / ".pre_cache", out / ".pre_cache")
            t0 = time.perf_counter()
            run(model, reqs, method, hp, dataclasses.replace(rc, output_dir=str(out)), judge, stats=None)
            seconds = time.perf_counter() - t0
            print(f"stack_edits={k:>3}, {name} run of {len(reqs)} records: {seconds:.1f} s", flush=True)
        rows = _rows(out)
        edit_s = sum(r["edit"].get("seconds", 0.0) for r in rows)
        results[k] = {"seconds": seconds, "edit_s": edit_s, "rows": rows}
        print(f"stack_edits={k:>3}: {seconds / n:6.2f} s/sample (edit {edit_s / n:5.2f}, evaluation "
              f"{(seconds - edit_s) / n:5.2f}), {n / seconds:.3f} samples/s")
    if not FLAGS.one_by_one:
        return
    one, many = results[1], results[FLAGS.stack_edits]
    strip = lambda rows: [{**r, "edit": {k: v for k, v in r["edit"].items() if k != "seconds"}} for r in rows]  # noqa: E731
    differ = sum(a != b for a, b in zip(strip(one["rows"]), strip(many["rows"])))
    print(f"speed-up {one['seconds'] / many['seconds']:.2f}x samples/s; evaluation alone "
          f"{(one['seconds'] - one['edit_s']) / max(many['seconds'] - many['edit_s'], 1e-9):.2f}x; "
          f"rows that differ: {differ} of {n}")
    print(f"({model.name}, {method.name}, {FLAGS.dataset}, {FLAGS.evaluation}, {FLAGS.context_type}; files in {root})")


if __name__ == "__main__":
    app.run(main)
