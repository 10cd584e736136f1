"""MEMIT and AlphaEdit against their defining equations and on a tiny model."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mirage_jax.datasets import EditRequest, LocalityPair
from mirage_jax.editing.least_squares import alphaedit_delta, memit_delta, null_space_projector
from mirage_jax.editing.memit import MEMITConfig, layer_keys_and_hidden, memit_edit
from mirage_jax.editing.stats import KeyStats, compute_key_stats, corpus_from_texts
from mirage_jax.model import load_model
from tiny import save_tiny


def _rng_problem(n=6, f=48, d=16, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    k0 = rng.normal(size=(400, rank or f)) @ (rng.normal(size=(rank, f)) if rank else np.eye(f))
    cov = (k0.T @ k0 / len(k0)).astype(np.float32)
    return rng.normal(size=(n, f)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32), cov, k0


def test_memit_delta_satisfies_its_normal_equations():
    k, r, cov, _ = _rng_problem()
    lam = 3.0
    delta = np.asarray(memit_delta(k, r, cov, lam), np.float64)
    lhs = (lam * cov.astype(np.float64) + k.T.astype(np.float64) @ k) @ delta
    rhs = k.T.astype(np.float64) @ r
    assert np.abs(lhs - rhs).max() <= 1e-4 * np.abs(rhs).max()


def test_alphaedit_update_leaves_the_preserved_key_subspace_unchanged():
    k, r, cov, k0 = _rng_problem(rank=30)  # 48-dim keys living in a 30-dim subspace
    proj = np.asarray(null_space_projector(cov, 1e-3))
    assert np.isclose(np.trace(proj), 48 - 30, atol=1e-3)  # projector onto the 18-dim null space
    delta = np.asarray(alphaedit_delta(k, r, proj, np.zeros_like(cov), 1.0))
    assert np.abs(k0 @ delta).max() <= 1e-4 * np.abs(k @ delta).max()  # K0 Δ ~ 0
    assert np.abs(delta - proj @ delta).max() <= 1e-5  # Δ = P Δ
    # ... and it still moves the new keys toward their targets (projected least squares).
    kp = k @ proj
    assert np.linalg.norm(kp @ delta - r) < np.linalg.norm(r)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = load_model(save_tiny("llama", tmp_path_factory.mktemp("memit"), seed=11))
    rng = np.random.default_rng(0)
    texts = [" ".join(f"t{i}" for i in rng.integers(2, 128, size=30)) for _ in range(40)]
    stats = compute_key_stats(model, (0, 1), corpus_from_texts("rand", texts), n_samples=40,
                              cache_dir=None, progress=False)
    return model, stats


def _requests(n, first=0):
    """Requests with distinct subjects (distinct keys), words from t20 up, clear of the special
    tokens t0 / t1."""
    return [EditRequest(i, f"t{20 + 2 * i} t{21 + 2 * i} t5", f"t{21 + 2 * i}", f"t{60 + i}", None, None,
                        (LocalityPair("t90 t91", "t92"),), None) for i in range(first, first + n)]


@pytest.mark.parametrize("algorithm", ["memit", "alphaedit"])
def test_only_edit_layers_change_and_targets_move(tiny, algorithm):
    model, stats = tiny
    # Random keys span every direction: call the lower half of C's spectrum "preserved-free".
    thr = max(float(np.median(np.linalg.eigvalsh(stats.second_moment(l)))) for l in (0, 1))
    hp = MEMITConfig(layers=(0, 1), algorithm=algorithm, v_num_grad_steps=10, mom2_update_weight=1.0,
                     nullspace_threshold=thr, l2_reg=1.0, context_template_length_params=((4, 5),))
    reqs = _requests(3)
    new, info = memit_edit(model.params, model.cfg, model.tokenizer, reqs, hp, stats)
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    changed = {jax.tree_util.keystr(p) for (p, a), b in zip(leaves, jax.tree_util.tree_leaves(new))
               if not np.array_equal(np.asarray(a), np.asarray(b))}
    assert changed == {f"['layers'][{l}]['mlp']['down']['kernel']" for l in (0, 1)}
    assert info["z_steps"] and len(info["templates"]) == 6
    if algorithm == "alphaedit":
        assert set(info["state"]) == {0, 1}  # K_pᵀ K_p carried to the next edit of a sequence


def test_memit_single_layer_maps_keys_to_the_targets_least_squares(tiny):
    """With one edit layer and λ -> 0 the update solves K Δ = R: the top hidden state hits z."""
    model, stats = tiny
    hp = MEMITConfig(layers=(1,), v_num_grad_steps=8, mom2_update_weight=1e-4, context_template_length_params=())
    reqs = _requests(2)
    new, _ = memit_edit(model.params, model.cfg, model.tokenizer, reqs, hp, stats)
    from mirage_jax.editing.templates import context_templates
    from mirage_jax.editing.values import ValueSettings, build_problem, value_optimisation

    templates = context_templates(model.params, model.cfg, model.tokenizer, 0, ())
    problem = build_problem(model.tokenizer, [r.prompt for r in reqs], [r.subject for r in reqs],
                            [r.target_new for r in reqs], templates)
    val = value_optimisation(model.params, model.cfg, problem, ValueSettings.from_hparams(hp, 1, "residual"))
    z = val.v_init + val.delta
    b = problem.batch
    _, h = layer_keys_and_hidden(new, model.cfg, 1, 1, b.tokens, b.attn_mask, b.subject_last)
    h = np.asarray(h)[:2]
    before = np.asarray(val.v_init)
    assert np.linalg.norm(h - z) <= 0.02 * np.linalg.norm(z - before)  # the residual is (almost) all gone


def _keys_and_residuals(model, params, reqs, hp, layer):
    """K [n, F] and R = z − h [n, D] of a one-layer edit without templates, float64, read with the
    building blocks (value optimisation, key reads), independently of memit_edit."""
    from mirage_jax.editing.values import ValueSettings, build_problem, value_optimisation

    problem = build_problem(model.tokenizer, [r.prompt for r in reqs], [r.subject for r in reqs],
                            [r.target_new for r in reqs], ("{}",))
    val = value_optimisation(params, model.cfg, problem, ValueSettings.from_hparams(hp, layer, "residual"))
    b = problem.batch
    k, h = layer_keys_and_hidden(params, model.cfg, layer, layer, b.tokens, b.attn_mask, b.subject_last)
    n = len(reqs)
    return np.asarray(k, np.float64)[:n], np.asarray(val.v_init + val.delta, np.float64) - np.asarray(h, np.float64)[:n]


def test_sequential_alphaedit_follows_its_formula_with_the_carried_keys(tiny):
    """Two AlphaEdit edits of a sequence against the written-out formula (Fang et al. 2025, in
    Flax orientation) Δ = (P (Kᵀ K + K_pᵀ K_p) + α I)⁻¹ P Kᵀ R, with a preserved-key subspace K0 of
    rank 40 in F = 96: the update lies in P's range, K0 Δ = 0, and the second edit solves with the
    first edit's keys as K_p (carried in info["state"]), which moves it well beyond the tolerance.

    Planted bugs this catches (each passed every other test): AlphaEdit's branch computing plain
    MEMIT (memit_delta), and the carried state ignored (K_pᵀ K_p taken as zero on every edit)."""
    from mirage_jax.editing import METHODS
    from mirage_jax.editing.common import down_kernel

    model, _ = tiny
    f, layer, alpha = model.cfg.intermediate_size, 1, 1e-3  # α ~ ‖K‖²/10 here, so K_p matters
    rng = np.random.default_rng(3)
    k0 = rng.normal(size=(300, 40)) @ rng.normal(size=(40, f)) / np.sqrt(f)
    stats = KeyStats({layer: (k0.T @ k0, len(k0))})
    hp = MEMITConfig(layers=(layer,), algorithm="alphaedit", v_num_grad_steps=8, nullspace_threshold=1e-3,
                     l2_reg=alpha, context_template_length_params=())
    proj = np.asarray(stats.projector(layer, hp.nullspace_threshold), np.float64)
    assert np.isclose(np.trace(proj), f - 40, atol=1e-3)
    edit = METHODS["AlphaEdit"].apply
    first, second = _requests(3), _requests(3, first=3)
    p1, info1 = edit(model.params, model.cfg, model.tokenizer, first, hp, stats=stats)
    state1 = {l: np.asarray(v) for l, v in info1["state"].items()}
    p2, info2 = edit(p1, model.cfg, model.tokenizer, second, hp, stats=stats, state=info1["state"])
    k1, r1 = _keys_and_residuals(model, model.params, first, hp, layer)
    k2, r2 = _keys_and_residuals(model, p1, second, hp, layer)
    kernel = lambda p: np.asarray(down_kernel(p, layer), np.float64)  # noqa: E731
    d1, d2 = kernel(p1) - kernel(model.params), kernel(p2) - kernel(p1)

    def formula(k, r, prev):
        return np.linalg.solve(proj @ (k.T @ k + prev) + alpha * np.eye(f), proj @ k.T @ r)

    def close(got, want, rtol=1e-4):
        return np.linalg.norm(got - want) <= rtol * np.linalg.norm(want)

    want1, want2 = formula(k1, r1, 0.0), formula(k2, r2, k1.T @ k1)
    assert close(d1, want1), np.linalg.norm(d1 - want1) / np.linalg.norm(want1)
    assert close(d2, want2), np.linalg.norm(d2 - want2) / np.linalg.norm(want2)
    assert not close(formula(k2, r2, 0.0), want2, rtol=1e-2)  # ignoring K_p would be caught
    memit = np.linalg.solve(hp.mom2_update_weight * stats.second_moment(layer) + k1.T @ k1, k1.T @ r1)
    assert not close(memit, want1, rtol=0.5)  # ... and so would plain MEMIT
    for d in (d1, d2):
        assert np.linalg.norm(d - proj @ d) <= 1e-4 * np.linalg.norm(d)  # Δ = P Δ (measured ~1e-6)
        assert np.linalg.norm(k0 @ d) <= 1e-4 * np.linalg.norm(k0, 2) * np.linalg.norm(d, 2)  # K0 Δ = 0
    # The state accumulates K_pᵀ K_p, and the caller's copy is not changed in place.
    np.testing.assert_allclose(state1[layer], k1.T @ k1, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(info1["state"][layer]), state1[layer])
    np.testing.assert_allclose(np.asarray(info2["state"][layer]), k1.T @ k1 + k2.T @ k2, rtol=1e-4, atol=1e-7)


def test_missing_stats_and_bad_shape_are_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"python -m mirage_jax\.editing\.stats"):
        memit_edit(model.params, model.cfg, model.tokenizer, _requests(1), MEMITConfig(layers=(1,)), None)
    bad = KeyStats({1: (np.eye(7, dtype=np.float32), 10)})
    with pytest.raises(ValueError, match="shape"):
        memit_edit(model.params, model.cfg, model.tokenizer, _requests(1),
                   MEMITConfig(layers=(1,), v_num_grad_steps=2, context_template_length_params=()), bad)
    with pytest.raises(ValueError, match="out of range"):
        memit_edit(model.params, model.cfg, model.tokenizer, _requests(1), MEMITConfig(layers=(9,)), bad)


def test_runner_batch_memit_and_sequential_alphaedit_carry_stats_and_state(tiny, tmp_path):
    from mirage_jax.editing import METHODS
    from mirage_jax.evaluation.judge import ExactMatchJudge
    from mirage_jax.runner import RunConfig, run

    model, fixture_stats = tiny
    # A copy whose reads of C from the host are counted (the fixture's is shared by other tests).
    stats, reads = KeyStats({l: (fixture_stats.second_moment(l), 1) for l in (0, 1)}), []
    second_moment = stats.second_moment
    stats.second_moment = lambda layer: reads.append(layer) or second_moment(layer)
    hp = MEMITConfig(layers=(0, 1), v_num_grad_steps=4, mom2_update_weight=1.0, context_template_length_params=())
    seen_states, handed, returned = [], [], []
    alpha = METHODS["AlphaEdit"]

    def spy(*a, **kw):
        seen_states.append(sorted(kw.get("state") or {}))
        handed.append(kw.get("state"))
        params, info = alpha.apply(*a, **kw)
        returned.append(info.get("state"))
        return params, info

    for name, mode, method in (("MEMIT", "batch", METHODS["MEMIT"]),
                               ("AlphaEdit", "sequential", dataclasses.replace(alpha, apply=spy))):
        rc = RunConfig(method=name, model_name="tiny", dataset="qaedit", data_path="mem", edit_mode=mode,
                       batch_size=2, evaluation="synthetic", output_dir=str(tmp_path / name))
        summary = run(model, _requests(3), method, hp, rc, ExactMatchJudge(), stats=stats)
        assert summary["n_samples"] == 3 and summary["n_failed_edits"] == 0
    assert seen_states == [[], [0, 1], [0, 1]]  # each edit of the sequence sees the keys before it
    assert all(h is r for h, r in zip(handed[1:], returned[:-1]))  # ... exactly the state the last one returned
    # C left the host once per layer for 2 MEMIT edits and 3 AlphaEdit edits (AlphaEdit's projector
    # is derived from the C MEMIT already kept on the device).
    assert sorted(reads) == [0, 1]


def test_default_model_memit_edits_demo_facts(tmp_path, default_model):
    """Batch MEMIT of 3 demo facts lifts teacher-forced reliability to ~1 on the default model."""
    from configs import get_hparams
    from mirage_jax.datasets import demo_path, load_qaedit
    from mirage_jax.editing.stats import StatsError, read_corpus
    from mirage_jax.evaluation.synthetic import token_accuracy

    try:
        corpus = read_corpus("wikipedia")  # the registry package (CI installs it)
    except StatsError as err:
        pytest.skip(str(err))
    model = default_model
    hp = get_hparams("MEMIT", model.name)
    stats = compute_key_stats(model, hp.layers, corpus, n_samples=40, max_len=256, cache_dir=None, progress=False)
    reqs = list(load_qaedit(demo_path()).requests)[:3]
    prompts, targets = [r.prompt for r in reqs], [r.target_new for r in reqs]
    assert np.mean(token_accuracy(model.params, model.cfg, model.tokenizer, prompts, targets)) < 0.5
    new, info = memit_edit(model.params, model.cfg, model.tokenizer, reqs, hp, stats)
    assert np.mean(token_accuracy(new, model.cfg, model.tokenizer, prompts, targets)) >= 0.9
    assert max(info["z_loss"]) < 0.2


def test_alphaedit_configs_match_its_release():
    """The values of AlphaEdit's released yaml files (EasyEdit hparams/AlphaEdit), which differ from
    MEMIT's in the value optimisation (weight decay 0.5 on Llama-3-8B) and in α (1 on Qwen2.5-7B)."""
    from configs import get_hparams

    llama3 = get_hparams("AlphaEdit", "Meta-Llama-3-8B-Instruct")
    assert (llama3.layers, llama3.v_lr, llama3.clamp_norm_factor, llama3.v_weight_decay, llama3.l2_reg,
            llama3.nullspace_threshold) == ((4, 5, 6, 7, 8), 0.1, 0.75, 0.5, 10.0, 2e-2)
    qwen = get_hparams("AlphaEdit", "Qwen2.5-7B-Instruct")
    assert (qwen.v_lr, qwen.clamp_norm_factor, qwen.v_weight_decay, qwen.l2_reg) == (0.5, 4.0, 1e-3, 1.0)
    gptj = get_hparams("AlphaEdit", "gpt-j-6B")
    assert (gptj.layers, gptj.v_lr, gptj.v_weight_decay, gptj.v_num_grad_steps) == ((3, 4, 5, 6, 7, 8), 0.5, 0.5, 25)


@pytest.mark.parity  # needs torch (the `parity` extra)
def test_torch_reference_memit_gives_the_same_kernels(tmp_path):
    """benchmarks/torch_rome.py's MEMIT (z one request at a time, whole model per step, δ by a
    forward hook on the decoder layer; keys by hooks; float64 solve) against ours (all requests
    in one batched, suffix-only optimisation): the same new kernels at every edit layer. Pins the
    baseline edit_speed.py compares with, and our batched z against per-request optimisation.
    Three layers, z at layer 1: with z at the last layer the tiny model's gradient is at Adam's
    ε and the first step's direction is float noise on either side."""
    pytest.importorskip("torch")
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch_rome

    from common import torch_twin
    from mirage_jax.editing.common import down_kernel
    from mirage_jax.editing.templates import context_templates
    from mirage_jax.editing.values import ValueSettings, build_problem

    model = load_model(save_tiny("llama", tmp_path / "ckpt", seed=11, num_hidden_layers=3))
    rng = np.random.default_rng(0)
    texts = [" ".join(f"t{i}" for i in rng.integers(2, 128, size=30)) for _ in range(40)]
    stats = compute_key_stats(model, (0, 1), corpus_from_texts("rand", texts), n_samples=40, cache_dir=None,
                              progress=False)
    hp = MEMITConfig(layers=(0, 1), v_num_grad_steps=5, early_stop_loss=0.0, mom2_update_weight=1.0,
                     context_template_length_params=((4, 5),))
    reqs = _requests(2)
    templates = context_templates(model.params, model.cfg, model.tokenizer, 0, hp.context_template_length_params)
    new, _ = memit_edit(model.params, model.cfg, model.tokenizer, reqs, hp, stats, templates=templates)
    args = lambda rs: (model.tokenizer, [r.prompt for r in rs], [r.subject for r in rs],  # noqa: E731
                       [r.target_new for r in rs], templates)
    kernels = torch_rome.memit_edit(torch_twin(model.cfg, model.params, model.hf_config),
                                    [build_problem(*args([r])) for r in reqs], build_problem(*args(reqs)),
                                    len(templates), ValueSettings.from_hparams(hp, 1, "residual"), [0, 1],
                                    {l: torch.from_numpy(np.asarray(stats.second_moment(l))) for l in (0, 1)}, 1.0)
    for layer in (0, 1):
        old, got = np.asarray(down_kernel(model.params, layer)), np.asarray(down_kernel(new, layer))
        change = np.abs(got - old).max()
        assert change > 1e-3  # the edit is not vacuous
        np.testing.assert_allclose(kernels[layer], got, rtol=0, atol=1e-3 * change)
