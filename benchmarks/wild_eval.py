"""Time to WILD-evaluate N QAEdit records, pre- and post-edit: our batched pipeline vs the paper's
per-sample loop (HF `generate`, batch 1, `use_cache=False`, stop strings "." / "\\n" / EOS).

Both sides answer the same questions (edit prompt, rephrase, every locality prompt) with the same
model weights -- the original ones, then the ones after one FT-M edit -- under `question-only`
context and the paper's stop rule, and score rewrite/rephrase by exact match. The HF loop also
runs with `use_cache=True` as a fairer baseline. Prints seconds and the ratios.

    python benchmarks/wild_eval.py --n_records=8
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from absl import app, flags

import common  # makes the checkout importable; REPO
from mirage_jax import cli

cli.define_model_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_integer("n_records", 8, "QAEdit records (each: prompt, rephrase, 5 locality prompts)")
flags.DEFINE_integer("max_new_tokens", 50, "generation budget (the paper's)")
flags.DEFINE_bool("hf_no_cache", True, "also time HF with use_cache=False (the paper's setting; slow)")
FLAGS = flags.FLAGS

DATA = common.REPO / "data" / "QAEdit_inter_1k.json"


def hf_loop(hf, tok, reqs, max_new, use_cache):
    """The seed's evaluation loop: one generate call per question, batch 1."""
    import torch

    from mirage_jax.evaluation.answers import StopRule, clean_answer, exact_match

    rule = StopRule.seed((tok.eos_token,))
    scores = []
    for r in reqs:
        for q in [r.prompt, r.rephrase] + [p.prompt for p in r.locality]:
            ids = tok(q, return_tensors="pt")
            with torch.no_grad():
                out = hf.generate(**ids, max_new_tokens=max_new, do_sample=False, use_cache=use_cache,
                                  stop_strings=[".", "\n", tok.eos_token], tokenizer=tok,
                                  pad_token_id=tok.eos_token_id)
            text = tok.decode(out[0, ids["input_ids"].shape[1]:])
            scores.append(exact_match(clean_answer(text, rule), r.target_new))
    return scores


def main(argv):
    import torch
    import transformers

    from configs import get_hparams
    from mirage_jax.datasets import load_qaedit
    from mirage_jax.editing import METHODS
    from mirage_jax.evaluation.judge import ExactMatchJudge
    from mirage_jax.evaluation.wild import WildConfig
    from mirage_jax.runner import RunConfig, evaluate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    reqs = list(load_qaedit(DATA, ds_size=FLAGS.n_records).requests)
    n_q = sum(2 + len(r.locality) for r in reqs)
    model = cli.load_model_from_flags()
    edited, _ = METHODS["FT-M"].apply(model.params, model.cfg, model.tokenizer, reqs[:1],
                                      get_hparams("FT-M", model.name))
    rc = RunConfig(method="FT-M", model_name=model.name, dataset="qaedit", data_path=str(DATA),
                   evaluation="wild", eval_batch=len(reqs),
                   wild=WildConfig(context_type="question-only", max_new_tokens=FLAGS.max_new_tokens,
                                   stop_rule="seed"))
    judge = ExactMatchJudge()
    t0 = time.perf_counter()
    pre = evaluate(model, model.params, reqs, rc, judge)  # includes compilation
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(model, model.params, reqs, rc, judge)
    evaluate(model, edited, reqs, rc, judge, pre)
    ours = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as d:  # the same weights for HF: export ours
        rows = {}
        for tag, params in (("pre", model.params), ("post", edited)):
            model.with_params(params).save(Path(d) / tag)
            rows[tag] = transformers.AutoModelForCausalLM.from_pretrained(str(Path(d) / tag),
                                                                         dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(Path(d) / "pre"))
        timings = {}
        for use_cache in ([True, False] if FLAGS.hf_no_cache else [True]):
            t0 = time.perf_counter()
            for tag in ("pre", "post"):
                hf_loop(rows[tag], tok, reqs, FLAGS.max_new_tokens, use_cache)
            timings[use_cache] = time.perf_counter() - t0

    print(f"WILD evaluation, {len(reqs)} QAEdit records x (pre + post) = {2 * n_q} generations, "
          f"max_new_tokens={FLAGS.max_new_tokens}, model={model.name}, "
          f"device={__import__('jax').devices()[0].platform}")
    print(f"{'pipeline':44s} {'seconds':>9s} {'speed-up':>9s}")
    print(f"{'mirage_jax batched (steady state)':44s} {ours:9.2f} {'1.00x':>9s}")
    print(f"{'mirage_jax first call (incl. compile, pre)':44s} {t_first:9.2f}")
    for use_cache, t in timings.items():
        name = f"HF generate per sample, use_cache={use_cache}"
        print(f"{name:44s} {t:9.2f} {t / ours:8.2f}x")
    print(json.dumps({"ours_s": ours, "ours_first_s": t_first, **{f"hf_cache_{k}_s": v for k, v in timings.items()}}))


if __name__ == "__main__":
    app.run(main)
