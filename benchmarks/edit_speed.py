"""Seconds per ROME edit, per MEMIT batch and per FT-M edit, ours beside the reference's way in
eager PyTorch (`torch_rome.py`) on the same weights, records and machine, with the ratio.

    python benchmarks/edit_speed.py                         # default model (CPU ok), ours vs PyTorch
    python benchmarks/edit_speed.py --random_llama7b --memit_batches=100 --tokenizer=DIR --notorch  # GPU

Ours: the first call (compilation) is reported apart from the steady state. PyTorch: the same
requests, templates (sampled once by ours) and rows, edits undone between requests. Each ROME /
FT-M edit starts from the unedited model. Beside the times: how far the two δ (ROME) or the two
new kernels (MEMIT, FT-M) are apart, so a speed-up that changed the edit would show.

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

from common import REPO, define_subject_flags, load_edit_subject
from mirage_jax import cli

FLAGS = flags.FLAGS
define_subject_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_integer("rome_edits", 3, "ROME edits timed after the compiling one")
flags.DEFINE_list("memit_batches", ["10"], "MEMIT batch sizes (requests edited at once)")
flags.DEFINE_integer("ft_edits", 5, "FT-M edits timed after the compiling one")
flags.DEFINE_list("methods", ["ROME", "FT-M", "MEMIT"], "what to time (in this order)")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference (torch_rome.py) on the same weights")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: torch's default). On a CPU shared with other "
                     "jobs, 2 spinning OpenMP threads can be 10x slower than 1: pin both sides to 1 there "
                     "(XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')")
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


def _torch_twin(cfg, params, hf_config):
    import torch

    from common import torch_twin

    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)

    return torch_twin(cfg, params, hf_config)


def _line(what: str, ours: float, theirs: float | None, extra: str = "") -> str:
    if theirs is None:
        return f"{what}: ours {ours:.2f} s {extra}"
    return f"{what}: ours {ours:.2f} s | PyTorch {theirs:.2f} s | {theirs / ours:.2f}x {extra}"


def bench_rome(cfg, params, tok, name, hf_config, key, results):
    import numpy as np

    from configs import get_hparams
    from mirage_jax.editing.rome import rome_edit
    from mirage_jax.editing.values import ValueSettings, build_problem

    hp = get_hparams("ROME", name, key=key)
    reqs = requests(1 + FLAGS.rome_edits)
    # The first edit samples the context templates; a run samples them once and reuses them (as here).
    first, (_, info) = timed(lambda: rome_edit(params, cfg, tok, reqs[:1], hp))
    templates = info["templates"]
    vs = ValueSettings.from_hparams(hp, hp.layers[0], "mlp_out")
    if FLAGS.torch:
        import torch_rome

        model = _torch_twin(cfg, params, hf_config)
        w0 = model.model.layers[hp.layers[0]].mlp.down_proj.weight.detach().clone()
    ours, infos, times, diffs, steps = [], [], [], [], []
    for r in reqs[1:]:  # interleaved, so that a change in the machine's load hits both sides alike
        dt, (_, i) = timed(lambda r=r: rome_edit(params, cfg, tok, [r], hp, templates=templates))
        ours.append(dt)
        e = i["edits"][0]
        infos.append(e)
        msg = f"  ROME case {r.case_id}: ours {dt:.2f} s ({e['steps']} steps)"
        if FLAGS.torch:
            problem = build_problem(tok, [r.prompt], [r.subject], [r.target_new], templates)
            t0 = time.perf_counter()
            _, val = torch_rome.rome_edit(model, problem, vs, len(templates))
            times.append(time.perf_counter() - t0)
            model.model.layers[hp.layers[0]].mlp.down_proj.weight.data.copy_(w0)  # undo
            steps.append(val["steps"])
            diffs.append(abs(float(np.linalg.norm(val["delta"])) - e["delta_norm"]) / e["delta_norm"])
            msg += f", PyTorch {times[-1]:.2f} s ({steps[-1]} steps), |δ| differs by {diffs[-1]:.1e}"
        print(msg, flush=True)
    res = {"first_s": first, "steady_s_per_edit": float(np.mean(ours)), "per_edit_s": ours,
           "compile_s": first - float(np.mean(ours)), "layer": hp.layers[0], "steps": [e["steps"] for e in infos]}
    theirs = None
    if FLAGS.torch:
        theirs = float(np.mean(times))
        res.update(torch_s_per_edit=theirs, torch_per_edit_s=times, torch_steps=steps, speedup=theirs / res[
            "steady_s_per_edit"], delta_norm_rel_diff=diffs)
    results["rome"] = res
    print(_line(f"ROME  {name} s/edit ({len(ours)} edits, steps ours {res['steps']}"
                + (f" / torch {res['torch_steps']})" if theirs else ")"), res["steady_s_per_edit"], theirs,
                f"(ours: first edit {first:.1f} s incl. compilation)"), flush=True)


def _synthetic_stats(cfg):
    import numpy as np

    from mirage_jax.editing.stats import KeyStats

    f = cfg.intermediate_size
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(f, f)).astype(np.float32) / np.sqrt(f)
    cov = basis @ basis.T + np.eye(f, dtype=np.float32)
    return KeyStats(dict.fromkeys(range(cfg.num_layers), (cov, 1))), cov


def bench_memit(cfg, params, tok, name, hf_config, results):
    import dataclasses

    import numpy as np

    from configs import get_hparams
    from mirage_jax.editing.common import down_kernel
    from mirage_jax.editing.memit import MEMITConfig, memit_edit
    from mirage_jax.editing.values import ValueSettings, build_problem

    # Timing does not depend on C's values: a synthetic positive definite one, the same for both.
    stats, cov = _synthetic_stats(cfg)
    mhp = (dataclasses.replace(MEMITConfig(), chunk_size=128) if FLAGS.random_llama7b
           else dataclasses.replace(get_hparams("MEMIT", name), chunk_size=128))
    results["memit"] = {}
    for n in (int(b) for b in FLAGS.memit_batches):
        batch = requests(n)
        first, (_, info) = timed(functools.partial(memit_edit, params, cfg, tok, batch, mhp, stats))
        again, (new, info) = timed(functools.partial(memit_edit, params, cfg, tok, batch, mhp, stats,
                                                     templates=info["templates"]))
        res = {"first_s": first, "steady_s": again, "compile_s": first - again, "layers": list(mhp.layers)}
        theirs, extra = None, f"(ours: first call {first:.1f} s incl. compilation)"
        if FLAGS.torch:
            import torch
            import torch_rome

            templates = info["templates"]
            model = _torch_twin(cfg, params, hf_config)
            vs = ValueSettings.from_hparams(mhp, max(mhp.layers), "residual")
            args = lambda rs, t=templates: (tok, [r.prompt for r in rs], [r.subject for r in rs],  # noqa: E731
                                            [r.target_new for r in rs], t)
            t0 = time.perf_counter()
            kernels = torch_rome.memit_edit(model, [build_problem(*args([r])) for r in batch],
                                            build_problem(*args(batch)), len(templates), vs, sorted(mhp.layers),
                                            dict.fromkeys(mhp.layers, torch.from_numpy(cov)),
                                            mhp.mom2_update_weight)
            theirs = time.perf_counter() - t0
            rel = max(float(np.abs(kernels[l] - np.asarray(down_kernel(new, l))).max()
                            / np.abs(np.asarray(down_kernel(new, l)) - np.asarray(down_kernel(params, l))).max())
                      for l in mhp.layers)
            res.update(torch_s=theirs, speedup=theirs / again, kernel_change_rel_diff=rel)
            extra += f"; new kernels differ by {rel:.1e} of the update"
        results["memit"][n] = res
        print(_line(f"MEMIT {name} batch of {n} s/batch, layers {list(mhp.layers)}", again, theirs, extra),
              flush=True)


def bench_ft(cfg, params, tok, name, hf_config, key, results):
    import numpy as np

    from configs import get_hparams
    from mirage_jax.editing.common import down_kernel
    from mirage_jax.editing.ft import ft_edit, ft_edit_each
    from mirage_jax.tokens import make_batch

    hp = get_hparams("FT-M", name, key=key)
    layer = hp.layers[0]
    reqs = requests(1 + FLAGS.ft_edits)
    first, _ = timed(lambda: ft_edit(params, cfg, tok, [reqs[0].prompt], [reqs[0].target_new], hp))
    if FLAGS.torch:
        import torch_rome

        model = _torch_twin(cfg, params, hf_config)
        w = model.model.layers[layer].mlp.down_proj.weight
        w0 = w.detach().clone()
    old = np.asarray(down_kernel(params, layer))
    ours, steps, times, rel, tsteps = [], [], [], [], []
    for r in reqs[1:]:  # interleaved, as for ROME
        dt, (new, info) = timed(lambda r=r: ft_edit(params, cfg, tok, [r.prompt], [r.target_new], hp))
        ours.append(dt)
        steps.append(info["steps"])
        if FLAGS.torch:
            t0 = time.perf_counter()
            out = torch_rome.ft_m_edit(model, make_batch(tok, [r.prompt], [r.target_new]), layer, hp)
            times.append(time.perf_counter() - t0)
            w.data.copy_(w0)  # undo
            tsteps.append(out["steps"])
            ours_new = np.asarray(down_kernel(new, layer))
            rel.append(float(np.abs(out["kernel"] - ours_new).max() / max(np.abs(ours_new - old).max(), 1e-12)))
    res = {"first_s": first, "steady_s_per_edit": float(np.mean(ours)), "steps": steps}
    theirs, extra = None, f"(ours: first edit {first:.1f} s incl. compilation)"
    if FLAGS.torch:
        theirs = float(np.mean(times))
        res.update(torch_s_per_edit=theirs, torch_steps=tsteps, speedup=theirs / res["steady_s_per_edit"],
                   kernel_change_rel_diff=rel)
        extra += f"; steps ours {steps} / torch {tsteps}; kernels differ by <= {max(rel):.1e} of the update"
    results["ft_m"] = res
    print(_line(f"FT-M  {name} s/edit ({len(ours)} edits, layer {layer})", res["steady_s_per_edit"], theirs, extra),
          flush=True)
    # Single mode's way (runner: `EditMethod.apply_each`): the same requests, each its own edit of the
    # original model, computed together (`ft_edit_each`); timed after one compiling call.
    prompts, targets = [r.prompt for r in reqs[1:]], [r.target_new for r in reqs[1:]]
    timed(lambda: [p for p, _ in ft_edit_each(params, cfg, tok, prompts, targets, hp)])
    dt, each = timed(lambda: ft_edit_each(params, cfg, tok, prompts, targets, hp))
    alone = [ft_edit(params, cfg, tok, [p], [t], hp)[1] for p, t in zip(prompts, targets)]
    res_each = {"s_per_edit": dt / len(prompts),
                "steps_equal": [i["steps"] for _, i in each] == [a["steps"] for a in alone],
                "loss_max_abs_diff": max(abs(i["loss"] - a["loss"]) for (_, i), a in zip(each, alone))}
    if FLAGS.torch:
        res_each["speedup_vs_torch"] = theirs / res_each["s_per_edit"]
    results["ft_m_together"] = res_each
    print(_line(f"FT-M  {name} s/edit, {len(prompts)} single edits together (PyTorch: one at a time, as above)",
                res_each["s_per_edit"], theirs, f"(steps as alone: {res_each['steps_equal']}; final losses within "
                f"{res_each['loss_max_abs_diff']:.1e})"), flush=True)


def main(argv):
    import jax

    cfg, params, tok, name, hf_config = load()
    key = "llama-2-7b" if FLAGS.random_llama7b else None
    results = {"model": name, "device": jax.devices()[0].device_kind}
    if "ROME" in FLAGS.methods:
        bench_rome(cfg, params, tok, name, hf_config, key, results)
    if "FT-M" in FLAGS.methods:
        bench_ft(cfg, params, tok, name, hf_config, key, results)
    if "MEMIT" in FLAGS.methods:  # last: the longest
        bench_memit(cfg, params, tok, name, hf_config, results)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
