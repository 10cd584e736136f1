"""MEND throughput, ours (JAX) beside the seed's way (eager PyTorch, hooks): meta-training steps/s
and edits/s, steady state, compilation / warm-up reported apart.

    python benchmarks/mend.py                                          # default model, CPU ok
    python benchmarks/mend.py --random_llama7b --tokenizer=DIR         # 7B shape, bf16, GPU
    python benchmarks/mend.py --random_llama7b --layers=4 --steps=3 --edits=3   # 7B widths on a CPU

Both sides run the same weights (the PyTorch model is filled from our pytree), the same token
batches and the same editor size (the config's rank, 1920 for the 7B shape); meta-training uses
one edit + one locality pair per step (the paper's batch size 1) with the config's gradient
accumulation. Edits are single-request edits with an untrained editor (the cost does not depend
on training); with it both sides must produce the same new weights, printed as a max |diff|.
Requests: CounterFact records 5000+ for training, the first ones for editing, when
data/counterfact-edit.json (shipped) exists; a synthetic family otherwise.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from common import REPO, define_subject_flags, load_edit_subject, torch_twin
from mirage_jax import cli

FLAGS = flags.FLAGS
define_subject_flags()
flags.adopt_module_key_flags(cli)
flags.DEFINE_integer("layers", None, "with --random_llama7b: this many layers (7B widths, less depth)")
flags.DEFINE_integer("steps", 20, "meta-training steps timed after the compiling / warm-up one")
flags.DEFINE_integer("edits", 10, "edits timed after the compiling / warm-up one")
flags.DEFINE_bool("torch", True, "also run the PyTorch baseline")
CF = REPO / "data" / "counterfact-edit.json"


def pairs(n: int, start: int):
    if CF.exists():
        rows = json.loads(CF.read_text())[start: start + n]
        return ([(r["prompt"], r["target_new"]) for r in rows],
                [(r["locality_prompt"], r["locality_ground_truth"]) for r in rows])
    edits = [(f"The mother tongue of person {i} is", "English") for i in range(n)]
    return edits, [(f"The capital of country {i} is", "Paris") for i in range(n)]


def hparams(name: str, cfg):
    import dataclasses

    from configs import get_hparams
    from mirage_jax.editing.mend import MATRICES

    hp = get_hparams("MEND", name, key="llama-2-7b" if FLAGS.random_llama7b else None)
    if FLAGS.random_llama7b and FLAGS.layers:  # the paper's last three layers of a shorter stack
        last = range(cfg.num_layers - 3, cfg.num_layers)
        hp = dataclasses.replace(hp, inner_params=tuple((l, n) for l in last for n in MATRICES))
    return hp


def seconds(fn, sync):
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def timings(first_step, steady_steps, edit, reqs, sync) -> dict:
    """One side's figures: the first meta step and the first edit (compilation or warm-up), then
    steady meta steps/s and edits/s; "new" is the first request's edit, for the agreement check."""
    first, steady = seconds(first_step, sync), seconds(steady_steps, sync)
    edit_first = seconds(lambda: edit(reqs[0]), sync)
    edit_s = sum(seconds(lambda r=r: edit(r), sync) for r in reqs[1:])
    return {"meta_first_s": first, "meta_steps_per_s": FLAGS.steps / steady,
            "edit_first_s": edit_first, "edits_per_s": FLAGS.edits / edit_s, "new": edit(reqs[0])}


def time_ours(cfg, params, tok, hp, edits, loc, reqs):
    import jax

    from mirage_jax.editing.mend import editor_net, inner_kernels, mend_edit, resolve_editor
    from mirage_jax.editing.mend_train import MENDTrainingData, train_editor

    def train(i, n):  # n steps on edits i..i+n-1, no validation: the bare training loop
        data = MENDTrainingData(tuple(edits[i: i + n]), tuple(loc[i: i + n]), val_edits=())
        return train_editor(params, cfg, tok, data, hp, n, progress=False)[0]

    editor = resolve_editor(editor_net(cfg, params, hp), hp)  # once, as a run does (`EditMethod.prepare`)
    edit = lambda r: inner_kernels(mend_edit(params, cfg, tok, [r], hp, editor)[0], hp.inner_params)  # noqa: E731
    return timings(lambda: train(0, 1), lambda: train(1, FLAGS.steps), edit, reqs, jax.block_until_ready)


def time_torch(model, tok, hp, edits, loc, reqs, device):
    import numpy as np
    import torch

    import torch_mend as tm
    from mirage_jax.editing.mend_train import _batches

    def batch(p, t):
        tokens, attn, tmask = (torch.from_numpy(np.array(a)).to(device) for a in _batches(tok, [p], [t]))
        return tokens.long(), attn.long(), tmask

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    tm.prepare(model, hp.inner_params)
    mend = tm.TorchMEND(model, hp.inner_params, hp.rank, hp.n_hidden, hp.edit_lr).to(device)
    opt = tm.optimizer(mend, hp)
    step = lambda i: tm.meta_step(model, mend, opt, i, hp, batch(*edits[i]), batch(*loc[i]))  # noqa: E731
    fresh = tm.TorchMEND(model, hp.inner_params, hp.rank, hp.n_hidden, hp.edit_lr).to(device)  # untrained
    edit = lambda r: tm.edit(model, fresh, batch(r.prompt, r.target_new))  # noqa: E731
    return timings(lambda: step(0), lambda: [step(i) for i in range(1, FLAGS.steps + 1)], edit, reqs, sync)


def main(argv):
    import jax
    import numpy as np

    from mirage_jax.datasets import EditRequest

    cfg, params, tok, name, hf_config = load_edit_subject(FLAGS.random_llama7b, FLAGS.tokenizer, FLAGS.layers)
    hp = hparams(name, cfg)
    edits, loc = pairs(FLAGS.steps + 1, 5000)
    reqs = [EditRequest(i, p, "", t, None, None, (), None) for i, (p, t) in enumerate(pairs(FLAGS.edits + 1, 0)[0])]
    device_kind = jax.devices()[0].device_kind
    print(f"MEND {name}: inner {hp.inner_params}, rank {hp.rank}, accumulate {hp.accumulate}; "
          f"{FLAGS.steps} meta steps and {FLAGS.edits} edits timed after the first")
    ours = time_ours(cfg, params, tok, hp, edits, loc, reqs)
    theirs, note = None, "PyTorch baseline not run (--notorch)"
    if FLAGS.torch:
        import torch

        device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
        if jax.devices()[0].platform == "gpu" and device == "cpu":
            note = "PyTorch baseline skipped: our side ran on the GPU, torch has no CUDA here"
        else:
            model = torch_twin(cfg, params, hf_config, device)
            theirs = time_torch(model, tok, hp, edits, loc, reqs, device)
            note = f"PyTorch {torch.__version__} eager on {device} ({torch.get_num_threads()} threads), same weights"
            want = [np.asarray(jax.device_get(v), np.float32).T for v in ours["new"].values()]
            got = [v.detach().float().cpu().numpy() for v in theirs["new"].values()]
            diff = max(float(np.abs(w - g).max()) for w, g in zip(want, got))
            scale = max(float(np.abs(w).max()) for w in want)
            note += f"; untrained-editor new weights agree to max |diff| {diff:.2e} (max |W| {scale:.2e})"

    print(note)
    print(f"{'':22}{'ours (JAX)':>14}{'PyTorch':>14}{'speed-up':>14}")
    out = {"model": name, "device": device_kind, "ours": {}, "torch": {}}
    for key, label in (("meta_steps_per_s", "meta steps/s"), ("meta_first_s", "first step s"),
                       ("edits_per_s", "edits/s"), ("edit_first_s", "first edit s")):
        a = ours[key]
        b = theirs[key] if theirs else None
        ratio = (a / b if key.endswith("per_s") else b / a) if b else None
        out["ours"][key], out["torch"][key] = a, b
        print(f"{label:22}{a:14.3f}{(f'{b:14.3f}' if b else '-'.rjust(14))}"
              f"{(f'{ratio:13.2f}x' if ratio else '-'.rjust(14))}")
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
