"""MEND against its definition: the per-token factors of the gradient, the identity editor as one
SGD step, meta-training that helps, and a checkpoint round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden
from configs import get_hparams
from mirage_jax import datasets
from mirage_jax.editing import METHODS, mend
from mirage_jax.editing.common import replace_mlp_kernels, target_nll
from mirage_jax.editing.mend import (
    MENDConfig,
    apply_editor,
    inner_kernels,
    load_editor,
    make_editor,
    mend_edit,
    save_editor,
    token_pairs,
)
from mirage_jax.editing.mend_train import (
    MENDTrainingData,
    _batches,
    _meta_loss,
    mend_training_edits,
    post_edit_nll,
    resolve_archive,
    train_editor,
    validate_editor,
)
from mirage_jax.evaluation.judge import ExactMatchJudge
from mirage_jax.model import load_model
from mirage_jax.model.transformer import forward
from mirage_jax.runner import RunConfig, run
from mirage_jax.tokens import make_batch
from tiny import save_tiny

PROMPTS, TARGETS = ["t10 t11 t12", "t20 t21"], ["t50 t51", "t60"]
INNER = ((0, "gate"), (1, "up"), (1, "down"), (1, "gate"))
HP = MENDConfig(inner_params=INNER, rank=16, edit_lr=1e-2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(golden.save_tiny("mend.llama", tmp_path_factory.mktemp("mend")))  # save_tiny llama, seed 7


def _batch(tiny, prompts=PROMPTS, targets=TARGETS):
    b = make_batch(tiny.tokenizer, prompts, targets)
    return jnp.asarray(b.tokens), jnp.asarray(b.attn_mask), jnp.asarray(b.target_mask)


@pytest.fixture(scope="module")
def reference(tiny):
    """(loss, ∂loss/∂inner kernels) by plain autodiff through the kernels, jitted once."""
    tokens, attn, tmask = _batch(tiny)

    def f(kernels):
        p = replace_mlp_kernels(tiny.params, kernels)
        return target_nll(forward(p, tiny.cfg, tokens, attn_mask=attn).logits, tokens, tmask)

    return jax.jit(jax.value_and_grad(f))(inner_kernels(tiny.params, INNER))


def test_token_pairs_outer_products_sum_to_the_kernel_gradient(tiny, reference):
    tokens, attn, tmask = _batch(tiny)
    pairs_fn = jax.jit(token_pairs, static_argnames=("cfg", "inner"))
    loss, pairs = pairs_fn(tiny.params, tiny.cfg, INNER, tokens, attn, tmask)
    want_loss, want = reference
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for k in INNER:
        x, d = pairs[k]
        got = jnp.einsum("bti,bto->io", x, d)
        assert float(jnp.abs(want[k]).max()) > 0
        np.testing.assert_allclose(got, want[k], rtol=1e-4, atol=1e-7)
    # Pad positions carry no gradient (their keys are masked out of attention).
    assert float(jnp.abs(pairs[(1, "down")][1] * (1 - attn[..., None])).max()) == 0.0


@pytest.mark.parametrize("norm", [False, True])
def test_untrained_editor_is_one_sgd_step(tiny, reference, norm):
    hp = dataclasses.replace(HP, norm=norm)  # norm on but no statistics yet is the identity too
    reqs = [SimpleNamespace(prompt=p, target_new=t) for p, t in zip(PROMPTS, TARGETS)]
    new, info = mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs, hp)
    tokens, attn, tmask = _batch(tiny)
    g = reference[1]
    got = inner_kernels(new, INNER)
    for k, w in inner_kernels(tiny.params, INNER).items():
        np.testing.assert_allclose(got[k], w - hp.edit_lr * g[k], rtol=1e-5, atol=1e-8)
    # Nothing else moved.
    edited = {f"[{l}]['mlp']['{n}']['kernel']" for l, n in INNER}
    for path, a in jax.tree_util.tree_leaves_with_path(tiny.params):
        b = new
        for key in path:
            b = b[key.key if hasattr(key, "key") else key.idx]
        if not any(jax.tree_util.keystr(path).endswith(e) for e in edited):
            assert a is b or np.array_equal(a, b), jax.tree_util.keystr(path)
    # The edit lowers the loss it was computed from (a descent step).
    after = target_nll(forward(new, tiny.cfg, tokens, attn_mask=attn).logits, tokens, tmask)
    assert float(after) < info["loss"]


def _synthetic(n, seed):
    rng = np.random.default_rng(seed)
    w = lambda k: " ".join(f"t{i}" for i in rng.integers(2, 128, k))  # noqa: E731
    return [(w(3), w(1)) for _ in range(n)]


def test_meta_training_lowers_validation_edit_loss(tiny):
    hp = dataclasses.replace(HP, edit_lr=1e-3, lr=1e-3, lr_lr=1e-2, accumulate=2, cedit=1.0, cloc=1.0)
    train, val, loc = _synthetic(12, 0), _synthetic(4, 1), _synthetic(8, 2)
    before = post_edit_nll(tiny.params, tiny.cfg, tiny.tokenizer, val, hp)
    data = MENDTrainingData(tuple(train), tuple(loc), val_edits=())  # no validation: the bare loop
    editor, info = train_editor(tiny.params, tiny.cfg, tiny.tokenizer, data, hp, 30, progress=False)
    after = post_edit_nll(tiny.params, tiny.cfg, tiny.tokenizer, val, hp, editor)
    assert all(np.isfinite(r["loss"]) for r in info["log"]) and len(info["log"]) == 30 and not info["history"]
    assert float(editor["norm_stats"]["g_64x96"]["count"]) > 0  # running statistics were collected
    assert after < before - 0.3, (before, after)  # measured: 4.85 -> 3.83


def test_checkpoint_round_trip(tiny, tmp_path):
    _, variables = make_editor(tiny.cfg, tiny.params, HP)
    variables = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape),
                                       variables)
    save_editor(str(tmp_path / "editor"), variables)
    back = load_editor(str(tmp_path / "editor"), make_editor(tiny.cfg, tiny.params, HP)[1])
    la, lb = jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves_with_path(back)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, a), (_, b) in zip(la, lb):
        np.testing.assert_array_equal(a, b)
    # `hp.archive` is how the runner picks a trained editor up.
    reqs = [SimpleNamespace(prompt=PROMPTS[0], target_new=TARGETS[0])]
    via_archive, info = mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs,
                                  dataclasses.replace(HP, archive=str(tmp_path / "editor")))
    direct, _ = mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs, HP, variables)
    assert info["trained_editor"]
    for k, w in inner_kernels(direct, INNER).items():
        np.testing.assert_array_equal(inner_kernels(via_archive, INNER)[k], w)


def test_bad_inner_param_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="layer 5 out of range"):
        make_editor(tiny.cfg, tiny.params, dataclasses.replace(HP, inner_params=((5, "up"),)))
    with pytest.raises(ValueError, match="not in this model"):
        make_editor(tiny.cfg, tiny.params, dataclasses.replace(HP, inner_params=((1, "fc"),)))


def test_registered_method_runs_end_to_end_in_the_runner(tiny, tmp_path):
    recs = [{"prompt": f"t{10 + i} t{11 + i} t5", "subject": f"t{11 + i}", "target": f"t{40 + i}",
             "rephrase": f"t{11 + i} t{10 + i}", "locality": [{"loc": "t99 t98", "loc_ans": "t97"}]} for i in range(2)]
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(recs))
    reqs = list(datasets.load_qaedit(data).requests)
    assert get_hparams("MEND", "llama-2-7b").inner_params[0] == (29, "gate")  # the paper's table entry
    rc = RunConfig(method="MEND", model_name="tiny", dataset="qaedit", data_path=str(data), edit_mode="batch",
                   batch_size=2, evaluation="synthetic", output_dir=str(tmp_path / "out"))
    summary = run(tiny, reqs, METHODS["MEND"], HP, rc, ExactMatchJudge())
    rows = [json.loads(x) for x in (tmp_path / "out" / f"{rc.run_name}.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == [0, 1] and "error" not in rows[0]["edit"]
    assert "rewrite_acc" in summary["post"]["synthetic"]


# --- train_editor: validation, best checkpoint, resume, early stopping --------------------------

TRAIN_HP = dataclasses.replace(HP, edit_lr=1e-3, lr=1e-3, lr_lr=1e-2, accumulate=2, cedit=1.0, cloc=1.0)


def _data():
    rng = np.random.default_rng(1)
    words = lambda k: " ".join(f"t{i}" for i in rng.integers(2, 128, k))  # noqa: E731
    val = tuple((words(3), words(3)) for _ in range(4))  # multi-token targets: graded edit success
    return MENDTrainingData(tuple(_synthetic(12, 0)), tuple(_synthetic(8, 2)), val)


def test_train_editor_validates_and_keeps_the_best(tiny, tmp_path):
    out = tmp_path / "run"
    best, info = train_editor(tiny.params, tiny.cfg, tiny.tokenizer, _data(), TRAIN_HP, 18, out_dir=str(out),
                              val_every=3, patience=10, progress=False)
    scores = [h["edit_success"] for h in info["history"]]
    assert [h["step"] for h in info["history"]] == [3, 6, 9, 12, 15, 18] and info["step"] == 18
    assert len(set(scores)) > 1  # the scores move, so "best" means something (measured: best at 12, not 18)
    assert all(np.isfinite(h["post_nll"]) for h in info["history"])
    assert info["best_score"] == max(scores)
    meta = json.loads((out / "best.json").read_text())
    assert meta["edit_success"] == max(scores) and meta["step"] == info["best_step"]
    # The best checkpoint is the editor that scored it, and loads as an archive.
    on_disk = load_editor(str(out / "best"), make_editor(tiny.cfg, tiny.params, TRAIN_HP)[1])
    again = validate_editor(tiny.params, tiny.cfg, tiny.tokenizer, _data().val_edits, TRAIN_HP, on_disk)
    assert again["edit_success"] == pytest.approx(max(scores))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, on_disk, best))
    assert (out / "latest" / "meta.json").exists()


def test_train_editor_resumes_after_a_kill(tiny, tmp_path):
    kw = dict(val_every=2, patience=10, progress=False)
    full, info_full = train_editor(tiny.params, tiny.cfg, tiny.tokenizer, _data(), TRAIN_HP, 8,
                                   out_dir=str(tmp_path / "a"), **kw)

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_editor(tiny.params, tiny.cfg, tiny.tokenizer, _data(), TRAIN_HP, 8, out_dir=str(tmp_path / "b"),
                     on_step=kill, **kw)
    resumed, info = train_editor(tiny.params, tiny.cfg, tiny.tokenizer, _data(), TRAIN_HP, 8,
                                 out_dir=str(tmp_path / "b"), resume=True, **kw)
    assert info["log"][0]["step"] == 5  # continued after the checkpoint at step 4, not from 0
    assert info["step"] == info_full["step"] == 8
    assert [h["step"] for h in info["history"]] == [2, 4, 6, 8]
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert info["best_score"] == pytest.approx(info_full["best_score"])


def test_train_editor_stops_early_without_improvement(tiny, tmp_path):
    # min_delta=1: no edit success (a fraction) can beat the first validation's by more.
    _, info = train_editor(tiny.params, tiny.cfg, tiny.tokenizer, _data(), TRAIN_HP, 100, out_dir=str(tmp_path),
                           val_every=2, patience=2, min_delta=1.0, progress=False)
    assert info["stopped_early"] and info["step"] == 6  # best at 2, no gain at 4 and 6
    assert info["best_step"] == 2


def test_mend_training_edits_reserves_the_first_records(tmp_path):
    recs = [{"prompt": f"p{i}", "subject": "s", "target_new": f"t{i}", "locality_prompt": f"l{i}",
             "locality_ground_truth": f"a{i}"} for i in range(30)]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    d = mend_training_edits(str(path), start=10, val_size=5)
    assert d.edits[0] == ("p10", "t10") and len(d.edits) == 15 and d.val_edits[-1] == ("p29", "t29")
    assert d.rephrases[0] == "p10"  # no paraphrase in these records: the prompt itself
    assert d.locality[0] == ("l10", "a10") and len(d.locality) == 15
    with pytest.raises(ValueError, match="need more than val_size"):
        mend_training_edits(str(path), start=28, val_size=5)
    # A ZsRE training split (MEND format) is used whole: no records are reserved.
    zsre = [{"src": f"q{i}?", "subject": "s", "alt": f"a{i}", "rephrase": f"r{i}?", "loc": f"nq question: l{i}",
             "loc_ans": f"la{i}", "answers": ["x"]} for i in range(12)]
    zpath = tmp_path / "zsre_mend_train.json"
    zpath.write_text(json.dumps(zsre))
    z = mend_training_edits(str(zpath), val_size=2)
    assert z.edits[0] == ("q0?", "a0") and len(z.edits) == 10 and z.val_edits == (("q10?", "a10"), ("q11?", "a11"))
    assert z.locality[0] == ("nq question: l0", "la0")
    assert z.rephrases[0] == "r0?" and z.val_rephrases == ("r10?", "r11?")


def test_resolve_archive(tiny, tmp_path):
    with pytest.raises(ValueError, match="--mend_train_data"):
        resolve_archive(HP, tiny, root=str(tmp_path / "results"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_archive(dataclasses.replace(HP, archive=str(tmp_path / "nope")), tiny)
    best = tmp_path / "results" / tiny.name.strip("/").replace("/", "_") / "best"
    save_editor(str(best), make_editor(tiny.cfg, tiny.params, HP)[1])
    assert resolve_archive(HP, tiny, root=str(tmp_path / "results")).archive == str(best)


def test_rephrase_term_adds_the_paraphrase_nll(tiny):
    """crephrase > 0 adds exactly crephrase · NLL(target | rephrased prompt, edited model) to the
    meta-loss, and its gradient reaches the editor (the seed builds this batch and ignores it)."""
    hp = dataclasses.replace(TRAIN_HP, crephrase=0.5)
    net, init = make_editor(tiny.cfg, tiny.params, hp)
    b = lambda p, t: _batches(tiny.tokenizer, [p], [t])  # noqa: E731
    edit, loc, reph = b("t10 t11 t12", "t50 t51"), b("t99 t98", "t97"), b("t11 t10 t30 t12", "t50 t51")
    # A trained-looking editor: perturb the zero-initialised factors so g is not the identity.
    bump = lambda a: a + 1e-3 * jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape)  # noqa: E731
    variables = dict(init, params=jax.tree_util.tree_map(bump, init["params"]))

    def loss_fn(tr, r):
        return _meta_loss(tr, variables["norm_stats"], net, tiny.params, tiny.cfg, hp, edit, loc, r)

    (plain, _), g_plain = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"], None)
    (with_r, _), g_with = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"], reph)
    new, _, _ = apply_editor(net, variables, tiny.params, tiny.cfg, hp, *edit, update_stats=True)
    want = target_nll(forward(new, tiny.cfg, reph[0], attn_mask=reph[1]).logits, *reph[::2])
    np.testing.assert_allclose(with_r - plain, 0.5 * want, rtol=1e-5)
    diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                                             g_plain, g_with))
    assert all(np.isfinite(diffs)) and max(diffs) > 0


def test_train_editor_with_rephrases_reports_rephrase_success(tiny, tmp_path):
    d = _data()
    hp = dataclasses.replace(TRAIN_HP, crephrase=1.0)
    with pytest.raises(ValueError, match="needs rephrased prompts"):
        train_editor(tiny.params, tiny.cfg, tiny.tokenizer, d, hp, 2, progress=False)
    with pytest.raises(ValueError, match="rephrases has 1 entries for 12 edits"):
        MENDTrainingData(d.edits, d.locality, d.val_edits, ("x",))
    swap = lambda p: " ".join(reversed(p.split()))  # noqa: E731  a "paraphrase": the words reversed
    d = MENDTrainingData(d.edits, d.locality, d.val_edits, tuple(swap(p) for p, _ in d.edits),
                         tuple(swap(p) for p, _ in d.val_edits))
    _, info = train_editor(tiny.params, tiny.cfg, tiny.tokenizer, d, hp, 4, val_every=2, patience=5, progress=False)
    assert all(0.0 <= h["rephrase_success"] <= 1.0 for h in info["history"]) and len(info["history"]) == 2
    assert all(np.isfinite(r["loss"]) for r in info["log"])


def test_low_precision_kernels_warn_once(tiny, caplog):
    """bf16 kernels round most of η·G away (measured on the default model: 0.05% of entries change
    vs 80% in fp32), so the user is told, once per dtype."""
    mend._warn_once.cache_clear()
    reqs = [SimpleNamespace(prompt=PROMPTS[0], target_new=TARGETS[0])]
    low = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tiny.params)
    with caplog.at_level("WARNING", logger="mirage_jax.editing.mend"):
        mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs, HP)
        assert not caplog.records  # float32: nothing to say
        mend_edit(low, tiny.cfg, tiny.tokenizer, reqs, HP)
        mend_edit(low, tiny.cfg, tiny.tokenizer, reqs, HP)
    assert len(caplog.records) == 1 and "bfloat16" in caplog.records[0].getMessage()


def torch_mend_edit(path: Path) -> dict[str, np.ndarray]:
    """The untrained-editor edit of benchmarks/torch_mend.py (PyTorch, hooks for x and δ as the seed) on the
    checkpoint at `path`: {"mend.<HF weight name>": edited weight}. Golden entries (tests/golden.py)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch_mend as tm
    from common import torch_twin

    m = load_model(path)
    model = tm.prepare(torch_twin(m.cfg, m.params, m.hf_config), INNER)
    batch = [torch.from_numpy(np.array(a)) for a in _batches(m.tokenizer, [PROMPTS[0]], [TARGETS[0]])]
    batch = (batch[0].long(), batch[1].long(), batch[2])
    theirs = tm.edit(model, tm.TorchMEND(model, INNER, HP.rank, HP.n_hidden, HP.edit_lr), batch)
    return {f"mend.{name}": theirs[name].numpy() for name in tm.weight_names(INNER)}


def test_benchmark_baseline_agrees_with_ours(tiny):
    """The PyTorch baseline of benchmarks/mend.py (golden entries of `torch_mend_edit`) and ours give the same
    untrained-editor edit on the same weights: two independent routes to one update."""
    reqs = [SimpleNamespace(prompt=PROMPTS[0], target_new=TARGETS[0])]
    ours = inner_kernels(mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs, HP)[0], INNER)
    names = sorted(k.removeprefix("mend.") for k in golden.load("tiny")[0] if k.startswith("mend."))
    assert len(names) == len(INNER)
    for k in INNER:
        assert float(jnp.abs(ours[k] - tiny.params["layers"][k[0]]["mlp"][k[1]]["kernel"]).max()) > 0
        [name] = [n for n in names if n.startswith(f"model.layers.{k[0]}.mlp.{k[1]}_proj.")]
        want = golden.array("tiny", f"mend.{name}")
        # rtol 1e-5 plus atol 1e-6 over the entries, as np.testing.assert_allclose did against the live baseline
        golden.check_close("tiny", f"mend.{name}", np.asarray(ours[k]).T, 1e-6 + 1e-5 * float(np.abs(want).max()))


def test_archive_of_another_config_is_a_clear_error(tiny, tmp_path):
    save_editor(str(tmp_path / "editor"), make_editor(tiny.cfg, tiny.params, HP)[1])
    reqs = [SimpleNamespace(prompt=PROMPTS[0], target_new=TARGETS[0])]
    with pytest.raises(ValueError, match=r"does not fit .*\['u'\] is \(16, 160\) there, \(8, 160\) here"):
        mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs,
                  dataclasses.replace(HP, rank=8, archive=str(tmp_path / "editor")))


def test_train_command_writes_an_editor_launch_can_use(tiny, tmp_path):
    """`python -m mirage_jax.editing.mend_train` trains into its default folder, where `launch.py`
    looks for the editor (`resolve_archive` with no archive given: results/mend/<model>/best; it used
    to write best/best); `resolve_archive` then takes the architecture recorded beside the archive
    (rank 8 here), not the config's (16); the training folder itself is a one-line error."""
    model_dir = save_tiny("llama", tmp_path / "model", seed=7)
    recs = [{"prompt": f"t{10 + i} t{40 + i} t5", "subject": f"t{40 + i}", "target_new": f"t{70 + i}",
             "rephrase_prompt": f"t{40 + i} t{10 + i}", "locality_prompt": f"t{90 + i} t3",
             "locality_ground_truth": f"t{20 + i}"} for i in range(20)]
    (tmp_path / "cf.json").write_text(json.dumps(recs))
    cmd = [sys.executable, "-m", "mirage_jax.editing.mend_train", f"--model={model_dir}",
           f"--train_data={tmp_path / 'cf.json'}", "--start=4", "--val_size=4", "--steps=4", "--val_every=2",
           "--hparams_for=smollm2-135m", '--hp=inner_params=[[1, "up"], [1, "down"]]',
           "--hp=rank=8", "--hp=crephrase=0.1"]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    named = SimpleNamespace(name=load_model(model_dir).name)
    hp = resolve_archive(HP, named, root=str(tmp_path / "results" / "mend"))  # what launch.py does
    out = Path(hp.archive).parent
    assert "12 training edits, 4 validation edits" in done.stdout and f"--hp archive={hp.archive}" in done.stdout
    meta = json.loads((out / "best.json").read_text())
    assert meta["hparams"]["rank"] == 8 and "rephrase_success" in meta
    assert hp.rank == 8 and hp.inner_params == ((1, "up"), (1, "down"))
    reqs = [SimpleNamespace(prompt=PROMPTS[0], target_new=TARGETS[0])]
    assert mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs, hp)[1]["trained_editor"]
    with pytest.raises(ValueError, match=r"is not a MEND editor checkpoint \(it holds a best/ folder: pass that\)"):
        mend_edit(tiny.params, tiny.cfg, tiny.tokenizer, reqs, dataclasses.replace(hp, archive=str(out)))
    bad = subprocess.run([a for a in cmd if not a.startswith("--start")] + ["--start=18"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert bad.returncode != 0 and "error: MEND training data" in bad.stderr


def _answer_positions(batch) -> np.ndarray:
    """The positions of a one-row batch whose logits predict its answer tokens (each answer token
    sits at the next position), read off the mask by hand."""
    return np.nonzero(np.asarray(batch[2][0]))[0] - 1


def test_meta_loss_is_its_formula(tiny):
    """Value, parts and meta-gradient of the jitted meta-loss equal cedit·NLL(edit) + cloc·KL(pre ‖
    post on the locality answer) + crephrase·NLL(rephrase), written out here from log-softmaxes at
    the answer positions: only the edit itself (`apply_editor`) comes from the module. Planted and
    seen failing: the KL reversed to KL(post ‖ pre) in the meta-loss, and `target_nll`'s mask shifted
    by one position."""
    # A large step size: the edit moves the locality answer's distribution visibly (KL ~ 0.02).
    hp = dataclasses.replace(TRAIN_HP, inner_params=((1, "up"), (1, "down")), crephrase=0.3, edit_lr=1.0)
    net, init = make_editor(tiny.cfg, tiny.params, hp)
    bump = lambda a: a + 1e-2 * jnp.sin(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape)  # noqa: E731
    variables = dict(init, params=jax.tree_util.tree_map(bump, init["params"]))
    b = lambda p, t: _batches(tiny.tokenizer, [p], [t])  # noqa: E731
    edit, loc, reph = b("t10 t11 t12", "t50 t51"), b("t99 t98", "t97"), b("t11 t10 t30 t12", "t50 t51")
    stats, P, cfg = variables["norm_stats"], tiny.params, tiny.cfg

    def log_probs(p, batch):  # [answer tokens, V]: the next-token distributions that predict the answer
        logits = forward(p, cfg, batch[0], attn_mask=batch[1]).logits[0]
        return jax.nn.log_softmax(logits[_answer_positions(batch)], axis=-1)

    def nll(p, batch):  # mean over the answer tokens of -log p(answer token)
        answer = np.asarray(batch[0][0])[_answer_positions(batch) + 1]
        return -jnp.mean(log_probs(p, batch)[np.arange(len(answer)), answer])

    def kl(p_pre, p_post, batch):  # KL(pre ‖ post) = Σ_v pre·(log pre − log post), mean over answer tokens
        lp, lq = log_probs(p_pre, batch), log_probs(p_post, batch)
        return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))

    def edited(trainable):
        return apply_editor(net, {"params": trainable, "norm_stats": stats}, P, cfg, hp, *edit, update_stats=True)[0]

    def reference(trainable):
        new = edited(trainable)
        return hp.cedit * nll(new, edit) + hp.cloc * kl(P, new, loc) + hp.crephrase * nll(new, reph)

    want, g_want = jax.value_and_grad(reference)(variables["params"])
    (got, (_, edit_nll, loc_kl)), g_got = jax.value_and_grad(_meta_loss, has_aux=True)(
        variables["params"], stats, net, P, cfg, hp, edit, loc, reph)
    new = edited(variables["params"])
    np.testing.assert_allclose(edit_nll, nll(new, edit), rtol=1e-5)
    np.testing.assert_allclose(loc_kl, kl(P, new, loc), rtol=1e-5)
    # Here the two directions of the KL differ by 100x the tolerance above (measured: 1.2%).
    assert abs(float(kl(new, P, loc)) - float(loc_kl)) > 1e-3 * float(loc_kl) > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, c in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-8)
