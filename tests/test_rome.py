"""ROME / R-ROME: the rank-one equation, which leaf changes, subject location, templates, and
edits on the default model that actually take."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.datasets import EditRequest, demo_path, load_qaedit
from mirage_jax.editing import METHODS
from mirage_jax.editing import templates as tpl
from mirage_jax.editing.common import down_kernel
from mirage_jax.editing.locate import SubjectRow, locate_batch, subject_span
from mirage_jax.editing.rome import ROMEConfig, rome_edit, subject_keys
from mirage_jax.editing.stats import KeyStats
from mirage_jax.editing.values import ValueSettings, build_problem, value_optimisation
from mirage_jax.model import load_model
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import EditInputError
from tiny import save_tiny

# Small but real: 6 templates (1 plain + 5 sampled), few steps, a wide δ ball so the random tiny
# model moves at all.
TINY_HP = ROMEConfig(layers=(0,), v_num_grad_steps=6, clamp_norm_factor=50.0, context_template_length_params=((4, 5),))


def _req(prompt, subject, target, case_id=0):
    return EditRequest(case_id, prompt, subject, target, None, None, (), None)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(save_tiny("llama", tmp_path_factory.mktemp("rome_llama") / "ckpt", seed=2))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):  # MLP biases: W k + b must be handled in the update
    return load_model(save_tiny("gpt2", tmp_path_factory.mktemp("rome_gpt2") / "ckpt", seed=4))


def _reference(model, req, hp):
    """Keys, v_init and δ computed with the building blocks, independently of rome_edit."""
    templates = tpl.context_templates(model.params, model.cfg, model.tokenizer, hp.template_seed,
                                      hp.context_template_length_params)
    problem = build_problem(model.tokenizer, [req.prompt], [req.subject], [req.target_new], templates)
    b = problem.batch
    keys, _ = subject_keys(model.params, model.cfg, hp.layers[0], jnp.asarray(b.tokens), jnp.asarray(b.attn_mask),
                           jnp.asarray(b.subject_last))
    val = value_optimisation(model.params, model.cfg, problem, ValueSettings.from_hparams(hp, hp.layers[0], "mlp_out"))
    return np.asarray(keys), len(templates), val


def _mlp_out(model, params, layer, key):
    down = params["layers"][layer]["mlp"]["down"]
    out = np.asarray(key) @ np.asarray(down["kernel"])
    return out + np.asarray(down["bias"]) if "bias" in down else out


def _changed_leaves(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    return [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(flat_a, flat_b) if not np.array_equal(x, y)]


def test_rome_maps_the_plain_key_to_v_star_and_changes_one_leaf(tiny_llama):
    req = _req("t10 t11 t12 t13", "t11 t12", "t40 t41")
    new, info = rome_edit(tiny_llama.params, tiny_llama.cfg, tiny_llama.tokenizer, [req], TINY_HP)
    keys, _, val = _reference(tiny_llama, req, TINY_HP)
    v_star = val.v_init[0] + val.delta[0]
    got = _mlp_out(tiny_llama, new, 0, keys[0])
    np.testing.assert_allclose(got, v_star, rtol=1e-4, atol=1e-4 * np.abs(v_star).max())
    assert np.linalg.norm(val.delta[0]) > 1e-3  # the optimisation moved: the check is not vacuous
    assert _changed_leaves(tiny_llama.params, new) == ["['layers'][0]['mlp']['down']['kernel']"]
    e = info["edits"][0]
    assert e["case_id"] == 0 and 1 <= e["steps"] <= TINY_HP.v_num_grad_steps - 1
    assert info["templates"][0] == "{}" and len(info["templates"]) == 6
    assert e["delta_norm"] == pytest.approx(float(np.linalg.norm(val.delta[0])), rel=1e-5)


def test_r_rome_maps_the_template_averaged_key_to_v_star(tiny_gpt2):
    hp = dataclasses.replace(TINY_HP, variant="r-rome")
    req = _req("t20 t21 t22", "t21", "t50")
    new, info = METHODS["R-ROME"].apply(tiny_gpt2.params, tiny_gpt2.cfg, tiny_gpt2.tokenizer, [req], TINY_HP)
    assert info["variant"] == "r-rome" and info["key_mode"] == "random_prefix"
    keys, m, val = _reference(tiny_gpt2, req, hp)
    v_star = val.v_init[0] + val.delta[0]
    got = _mlp_out(tiny_gpt2, new, 0, keys[:m].mean(0))
    np.testing.assert_allclose(got, v_star, rtol=1e-4, atol=1e-4 * np.abs(v_star).max())
    # ROME would map the plain key there instead; with sampled prefixes the two differ.
    assert not np.allclose(_mlp_out(tiny_gpt2, new, 0, keys[0]), v_star, rtol=1e-4, atol=1e-4)
    assert _changed_leaves(tiny_gpt2.params, new) == ["['layers'][0]['mlp']['down']['kernel']"]


def test_mom2_adjustment_solves_with_the_key_second_moment(tiny_llama):
    req = _req("t10 t11 t12 t13", "t11 t12", "t40 t41")
    hp = dataclasses.replace(TINY_HP, mom2_adjustment=True)
    with pytest.raises(ValueError, match="stats="):
        rome_edit(tiny_llama.params, tiny_llama.cfg, tiny_llama.tokenizer, [req], hp)
    diag = np.linspace(0.5, 3.0, tiny_llama.cfg.intermediate_size)
    stats, reads = KeyStats({0: (np.diag(diag), 1)}), []
    second_moment = stats.second_moment
    stats.second_moment = lambda layer: reads.append(layer) or second_moment(layer)
    new, _ = rome_edit(tiny_llama.params, tiny_llama.cfg, tiny_llama.tokenizer, [req], hp, stats=stats)
    keys, m, _ = _reference(tiny_llama, req, hp)
    update = np.asarray(down_kernel(new, 0)) - np.asarray(down_kernel(tiny_llama.params, 0))  # u rᵀ
    u = update[:, np.argmax(np.abs(update).max(0))]
    expected = keys[:m].mean(0) / diag
    cos = abs(u @ expected) / (np.linalg.norm(u) * np.linalg.norm(expected))
    assert cos > 1 - 1e-4
    rome_edit(new, tiny_llama.cfg, tiny_llama.tokenizer, [req], hp, stats=stats)
    assert reads == [0]  # C read and factorised once; the next edit reuses the factor the statistics keep
    with pytest.raises(ValueError, match=r"shape \(7, 7\)"):  # statistics of another model
        rome_edit(tiny_llama.params, tiny_llama.cfg, tiny_llama.tokenizer, [req], hp,
                  stats=KeyStats({0: (np.eye(7), 1)}))


# --- subject location -------------------------------------------------------------------------


def test_subject_span_prefers_whole_words_and_takes_the_first():
    assert subject_span("Is this i or iPhone?", "i") == (8, 9)  # not the "i" inside "Is"/"this"
    assert subject_span("Paris, Paris and Paris", "Paris") == (0, 5)
    assert subject_span("the iPhone maker", "Phone") == (5, 10)  # substring fallback
    assert subject_span("Who is  Ada Lovelace?", " Ada Lovelace ") == (8, 20)
    with pytest.raises(EditInputError, match=r"'Mars'.*'What is the capital of France\?'"):
        subject_span("What is the capital of France?", "Mars")


def test_repeated_subject_and_context_prefix(tiny_llama):
    tok = tiny_llama.tokenizer
    rows = [SubjectRow("", "t5 t7 t9 t7 t3", "t7", "t40"),
            SubjectRow("t60 t61 t2. ", "t5 t7 t9 t7 t3", "t7", "t40"),
            SubjectRow("", "t7 is a", "t7", None)]
    b = locate_batch(tok, rows)
    assert b.tokens.shape == (8, 16) and b.n_rows == 3
    for r in range(3):
        assert b.tokens[r, b.subject_last[r]] == tok.convert_tokens_to_ids("t7")
    t = b.tokens.shape[1]
    assert b.subject_last[0] == t - 6 + 1  # the first t7 of 6 tokens (5 prompt + 1 target)
    assert b.subject_last[1] == t - 9 + 4  # the same t7 behind 3 prefix tokens ("t2." is one, unk)
    assert b.target_mask[0].sum() == 1 and b.target_mask[2].sum() == 0


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The capital of France is Paris. Romeo and Juliet was written by Shakespeare."] * 20,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def test_subject_whose_token_carries_the_leading_space():
    tok = _byte_level_tokenizer()
    prompt = "Romeo and Juliet was written by"
    b = locate_batch(tok, [SubjectRow("The capital of France is Paris. ", prompt, "Romeo and Juliet", "Shakespeare"),
                           SubjectRow("", "The capital of France is", "France", "Paris")])
    assert tok.convert_ids_to_tokens([int(b.tokens[0, b.subject_last[0]])]) == ["ĠJuliet"]
    assert tok.convert_ids_to_tokens([int(b.tokens[1, b.subject_last[1]])]) == ["ĠFrance"]
    enc = tok("The capital of France is", return_offsets_mapping=True)
    assert enc["offset_mapping"][3][0] == 14  # the token's span starts at the space, not at "F"


def test_subject_absent_is_an_edit_input_error_the_runner_skips(tiny_llama):
    from mirage_jax.runner import _safe_edit

    bad = _req("t10 t11 t12", "t99", "t40", case_id=7)
    with pytest.raises(EditInputError, match=r"case 7: subject 't99' does not occur in prompt 't10 t11 t12'"):
        METHODS["ROME"].apply(tiny_llama.params, tiny_llama.cfg, tiny_llama.tokenizer, [bad], TINY_HP)
    params, info = _safe_edit(METHODS["ROME"], tiny_llama, tiny_llama.params, [bad], TINY_HP)
    assert params is tiny_llama.params and "does not occur" in info["error"]


# --- context templates -------------------------------------------------------------------------


def test_templates_are_seeded_and_shaped_like_the_seeds(tiny_llama):
    m = tiny_llama
    a = tpl.context_templates(m.params, m.cfg, m.tokenizer, seed=0, length_params=((4, 5), (6, 10)))
    b = tpl.context_templates(m.params, m.cfg, m.tokenizer, seed=0, length_params=((4, 5), (6, 10)))
    c = tpl.context_templates(m.params, m.cfg, m.tokenizer, seed=1, length_params=((4, 5), (6, 10)))
    assert a == b and a != c
    assert len(a) == 16 and a[0] == "{}"
    for t in a[1:]:
        assert t.endswith(". {}") and "{" not in t[:-2] and "}" not in t[:-2]
    # Word-level tokenizer: one word per token, minus special tokens (unk/pad t0, eos t1) that
    # decoding skips -- the seed words themselves are unknown to it.
    words = [len(t[:-4].split()) for t in a[1:]]
    assert all(n <= 4 for n in words[:5]) and all(n <= 6 for n in words[5:]) and max(words[5:]) >= 4


def test_sampled_tokens_are_in_the_models_top_k(tiny_llama):
    m = tiny_llama
    tokens = np.array([[0, 0, 5], [0, 9, 8]], np.int32)
    mask = np.zeros((2, 3 + 6), np.int32)
    mask[0, 2:3] = mask[1, 1:3] = 1
    new = np.asarray(tpl._sample_top_k(m.params, m.cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                       jax.random.PRNGKey(3), 6))
    full = np.concatenate([tokens, new], axis=1)  # re-score the sampled sequences in one pass
    logits = np.asarray(jax.jit(lambda p, t, a: forward(p, m.cfg, t, attn_mask=a).logits)(
        m.params, jnp.asarray(full), jnp.asarray((full > 0) | (np.arange(9) >= 3), np.int32)))
    for r in range(2):
        for t in range(3, 9):
            assert full[r, t] in np.argsort(logits[r, t - 1])[-tpl.TOP_K:]


# --- the default model --------------------------------------------------------------------------


def test_rome_edits_take_on_the_default_model(default_model):
    from configs import get_hparams
    from mirage_jax.evaluation.synthetic import token_accuracy
    from mirage_jax.generate import generate

    m = default_model
    reqs = [r for r in load_qaedit(demo_path()).requests if r.case_id in (0, 2, 7)]  # short prompts: one bucket
    # The configured layer, fewer/shorter templates than the paper (CPU time): the test is about
    # the mechanism working on a real model, not about the paper's numbers.
    hp = dataclasses.replace(get_hparams("ROME", "smollm2-135m"), context_template_length_params=((3, 5),))
    loc_prompt = "What is the capital of Japan?"
    before = generate(m, [loc_prompt], max_new_tokens=10)[0].ids
    params, info = rome_edit(m.params, m.cfg, m.tokenizer, reqs, hp)
    assert [e["case_id"] for e in info["edits"]] == [0, 2, 7]
    acc = token_accuracy(params, m.cfg, m.tokenizer, [r.prompt for r in reqs], [r.target_new for r in reqs])
    assert np.mean(acc) >= 0.9, (acc, info["edits"])
    after = generate(m.with_params(params), [loc_prompt], max_new_tokens=10)[0].ids
    assert np.mean(np.asarray(before) == np.asarray(after)) >= 0.7, (before, after)
    # WILD: the edited model, asked freely, says the new target for most edit prompts.
    from mirage_jax.evaluation.wild import WildConfig, wild_answers

    answers = wild_answers(params, m.cfg, m.tokenizer, [r.prompt for r in reqs],
                           WildConfig(context_type="qa_inst", max_new_tokens=24))
    said = [r.target_new.lower() in a.answer.lower() for r, a in zip(reqs, answers)]
    assert sum(said) >= 2, [(r.target_new, a.answer) for r, a in zip(reqs, answers)]


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_a_run_samples_its_templates_once_from_the_unedited_model(tiny_llama, tmp_path, monkeypatch, mode):
    """Templates are a run constant (`EditMethod.prepare`), not a hidden module cache. Planted
    bugs this catches: the runner not passing the prepared templates (every edit re-samples, and
    in sequential mode from the already edited model, so rows disagree); a prepare that samples
    per edit."""
    import json

    from mirage_jax.evaluation.judge import ExactMatchJudge
    from mirage_jax.evaluation.wild import WildConfig
    from mirage_jax.runner import RunConfig, run

    calls = []
    real = tpl.sample_texts
    monkeypatch.setattr(tpl, "sample_texts", lambda params, *a, **k: calls.append(params) or real(params, *a, **k))
    reqs = [_req(f"t{20 + 2 * i} t{21 + 2 * i} t5", f"t{21 + 2 * i}", f"t{40 + i}", case_id=i) for i in range(3)]
    rc = RunConfig(method="ROME", model_name="tiny", dataset="qaedit", data_path="-", edit_mode=mode,
                   evaluation="synthetic", wild=WildConfig(max_new_tokens=2), output_dir=str(tmp_path))
    run(tiny_llama, reqs, METHODS["ROME"], TINY_HP, rc, ExactMatchJudge())
    assert len(calls) == 1 and calls[0] is tiny_llama.params
    rows = [json.loads(x) for x in (tmp_path / f"{rc.run_name}.jsonl").read_text().splitlines()]
    expected = list(tpl.context_templates(tiny_llama.params, tiny_llama.cfg, tiny_llama.tokenizer,
                                          TINY_HP.template_seed, TINY_HP.context_template_length_params))
    assert len(rows) == 3 and all(r["edit"]["templates"] == expected for r in rows)


# --- speed levers against the straightforward computation, and the PyTorch reference -------------


@pytest.mark.parametrize("site", ["mlp_out", "residual"])
def test_suffix_only_steps_match_the_full_recompute(tiny_llama, site):
    """The fast path (prefix keys/values cached at δ = 0, each step on the last S positions only)
    against every step on all T positions: same δ, loss, NLL, KL and steps after a fixed number of
    Adam steps (no early stop), for ROME's site with one request and MEMIT's with two. Planted
    bugs this catches: suffix positions restarting at 0; the prefix cache left empty; δ added one
    position off."""
    m = tiny_llama
    reqs = [_req("t10 t11 t12 t13 t14 t15", "t11", "t40 t41", 0), _req("t20 t21 t22", "t21 t22", "t42", 1)]
    reqs = reqs[:1] if site == "mlp_out" else reqs
    templates = tpl.context_templates(m.params, m.cfg, m.tokenizer, 0, ((4, 5),))
    problem = build_problem(m.tokenizer, [r.prompt for r in reqs], [r.subject for r in reqs],
                            [r.target_new for r in reqs], templates)
    t = problem.batch.tokens.shape[1]
    assert problem.suffix_length() < t  # the fast path is taken
    hp = dataclasses.replace(TINY_HP, early_stop_loss=0.0)
    vs = ValueSettings.from_hparams(hp, 0, site)
    fast = value_optimisation(m.params, m.cfg, problem, vs)
    full = value_optimisation(m.params, m.cfg, problem, vs, suffix=False)
    assert fast.evaluations == full.evaluations == hp.v_num_grad_steps
    np.testing.assert_array_equal(fast.steps, full.steps)
    np.testing.assert_allclose(fast.v_init, full.v_init, rtol=0, atol=0)
    scale = np.abs(full.delta).max()
    assert scale > 1e-2  # δ moved
    np.testing.assert_allclose(fast.delta, full.delta, rtol=0, atol=1e-4 * scale)
    for a, b in ((fast.loss, full.loss), (fast.nll, full.nll), (fast.kl, full.kl)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert np.all(full.kl > 0)  # the KL term is live, so a wrong KL read would show


@pytest.mark.parity  # needs torch (the `parity` extra)
def test_torch_reference_rome_gives_the_same_delta_and_kernel(tiny_llama):
    """benchmarks/torch_rome.py (the reference's way: whole model per step, δ by a forward hook,
    full-vocabulary log-softmax, torch Adam) against ours on the same rows: the same δ after a
    fixed number of steps and the same updated kernel. This pins the baseline edit_speed.py
    compares with, and checks our loss, Adam, clamp and rank-one update against an independent
    implementation."""
    pytest.importorskip("torch")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch_rome

    from common import torch_twin

    m = tiny_llama
    req = _req("t10 t11 t12 t13 t14", "t11 t12", "t40 t41")
    hp = dataclasses.replace(TINY_HP, early_stop_loss=0.0, clamp_norm_factor=4.0)  # the clamp binds
    templates = tpl.context_templates(m.params, m.cfg, m.tokenizer, 0, hp.context_template_length_params)
    new, info = rome_edit(m.params, m.cfg, m.tokenizer, [req], hp, templates=templates)
    problem = build_problem(m.tokenizer, [req.prompt], [req.subject], [req.target_new], templates)
    vs = ValueSettings.from_hparams(hp, 0, "mlp_out")
    ours = value_optimisation(m.params, m.cfg, problem, vs)
    kernel, theirs = torch_rome.rome_edit(torch_twin(m.cfg, m.params, m.hf_config), problem, vs, len(templates))
    assert theirs["steps"] == int(ours.steps[0]) == info["edits"][0]["steps"] == hp.v_num_grad_steps - 1
    scale = np.abs(ours.delta).max()
    np.testing.assert_allclose(theirs["v_init"], ours.v_init[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(theirs["delta"], ours.delta[0], rtol=0, atol=2e-4 * scale)
    assert theirs["loss"] == pytest.approx(float(ours.loss[0]), rel=1e-4)
    assert theirs["kl"] == pytest.approx(float(ours.kl[0]), rel=1e-3) and theirs["kl"] > 1e-3
    old = np.asarray(down_kernel(m.params, 0))
    got = np.asarray(down_kernel(new, 0))
    assert np.abs(got - old).max() > 1e-3  # the edit is not vacuous
    np.testing.assert_allclose(kernel, got, rtol=0, atol=5e-4 * np.abs(got - old).max())
