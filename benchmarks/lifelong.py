"""Lifelong (sequential) editing cost: seconds per edit along a sequence of N CounterFact edits.

    python benchmarks/lifelong.py --methods=GRACE --n=100            # default model, CPU ok
    python benchmarks/lifelong.py --methods=GRACE,FT-M,MEMIT,AlphaEdit --n=1000   # accelerator

Each edit is applied to the params the previous one returned (the runner's sequential mode,
method state carried), and timed to `block_until_ready`. Reported per method: the first edit
(compilation included), the median over edits 10-19 ("start") and over the last 10 ("end"), and
their ratio: the goal is a flat cost per edit (end / start <= 1.5) -- GRACE's codebook grows by
doubling, so only its distance search and a copy grow with N, and a compile happens at each
doubling (those edits are listed apart). MEMIT / AlphaEdit get a synthetic positive definite key
covariance unless statistics are cached (timing does not depend on its values).

    python benchmarks/lifelong.py --from_results=out/WISE_..._sequential_....jsonl

summarises the same figures from a finished `launch.py --edit_mode=sequential` run instead of
editing again: the runner times each edit the same way (to `block_until_ready`, its
`edit.seconds`), so a long sequence run for its evaluation gives its cost curve for free.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from common import REPO
from mirage_jax import cli

FLAGS = flags.FLAGS
cli.define_model_flags()
cli.define_hparam_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_list("methods", ["GRACE"], "methods to run, each on its own sequence")
flags.DEFINE_integer("n", 100, "edits per sequence")
flags.DEFINE_string("data_path", str(REPO / "data" / "counterfact-edit.json"), "CounterFact file")
flags.DEFINE_multi_string("from_results", [], "summarise the edit seconds of finished sequential runs (results "
                          ".jsonl of launch.py) instead of editing")


def cost_summary(name: str, seconds: list[float], failed: int = 0) -> dict:
    """First edit, start (median of edits 10-19) and end (median of the last 10) seconds per edit."""
    import numpy as np

    window = "edits 10-19" if len(seconds) >= 20 else "edits 1-"  # short runs: all but the compiling one
    start = float(np.median(seconds[10:20])) if len(seconds) >= 20 else float(np.median(seconds[1:]))
    end = float(np.median(seconds[-10:]))
    print(f"{name}: {len(seconds)} edits, first {seconds[0]:.2f} s, {window} {start:.3f} s/edit, last 10 "
          f"{end:.3f} s/edit (x{end / start:.2f})", flush=True)
    return {"n": len(seconds), "first_s": seconds[0], "start_s_per_edit": start, "end_s_per_edit": end,
            "end_over_start": end / start, "failed": failed,
            "slowest": sorted(((round(s, 3), i) for i, s in enumerate(seconds)), reverse=True)[:5]}


def from_results(paths: list[str]) -> dict:
    """`cost_summary` of each sequential results file, its rows in edit order (the runner edits in
    request order and writes rows in that order; a resumed run's rows keep their first timing)."""
    out = {}
    for path in paths:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        if any(r.get("edit", {}).get("seconds") is None and "error" not in r.get("edit", {}) for r in rows):
            raise SystemExit(f"{path}: rows without edit seconds; not a results file of launch.py")
        seconds = [r["edit"]["seconds"] for r in rows if "error" not in r["edit"]]
        out[path] = cost_summary(path.rsplit("/", 1)[-1], seconds, len(rows) - len(seconds))
    return out


def main(argv):
    if FLAGS.from_results:
        print(json.dumps(from_results(FLAGS.from_results)))
        return
    import jax
    import numpy as np

    from configs import get_hparams
    from mirage_jax.cli import load_model_from_flags
    from mirage_jax.datasets import load_counterfact
    from mirage_jax.editing import get_method
    from mirage_jax.editing.stats import KeyStats

    model = load_model_from_flags()
    reqs = list(load_counterfact(FLAGS.data_path, ds_size=FLAGS.n).requests)
    out = {"model": model.name, "device": jax.devices()[0].device_kind, "n": len(reqs)}
    for name in FLAGS.methods:
        method = get_method(name)
        hp = get_hparams(name, model.name, FLAGS.hp, key=FLAGS.hparams_for)
        stats = None
        if method.needs_stats(hp):
            f = model.cfg.intermediate_size
            basis = np.random.default_rng(0).normal(size=(f, f)).astype(np.float32) / np.sqrt(f)
            stats = KeyStats(dict.fromkeys(range(model.cfg.num_layers), (basis @ basis.T + np.eye(f, dtype=np.float32),
                                                                         1)))
        ctx = method.prepare(model.params, model.cfg, model.tokenizer, hp)
        params, state, seconds, failed = model.params, None, [], 0
        for r in reqs:
            t0 = time.perf_counter()
            kw = {k: v for k, v in dict(ctx, stats=stats, state=state).items() if v is not None}
            try:
                params, info = method.apply(params, model.cfg, model.tokenizer, [r], hp, **kw)
            except ValueError as err:  # a bad record: skipped, as the runner does
                failed += 1
                print(f"{name}: case {r.case_id}: {str(err).splitlines()[0]}", flush=True)
                continue
            jax.block_until_ready(params)
            seconds.append(time.perf_counter() - t0)
            state = info.pop("state", state)
            if len(seconds) % 10 == 0:
                print(f"{name}: {len(seconds)} edits, last {seconds[-1]:.3f} s", flush=True)
        out[name] = cost_summary(name, seconds, failed)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
