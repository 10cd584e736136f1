"""FT-L / FT-M against their definition: which leaves move, by how much, and when it stops."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.editing.common import loss_reads
from mirage_jax.editing.ft import FTConfig, _flat_reads, _pack, ft_edit, ft_edit_each
from mirage_jax.evaluation.synthetic import token_accuracy
from mirage_jax.model import load_model
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import make_batch
from tiny import save_tiny

PROMPTS, TARGETS = ["t10 t11 t12", "t20 t21"], ["t50 t51", "t60"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny("llama", tmp_path_factory.mktemp("ft"), seed=7))


def _changed(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    return {jax.tree_util.keystr(p) for (p, x), y in zip(la, lb) if not np.array_equal(np.asarray(x), np.asarray(y))}


@pytest.mark.parametrize("objective", ["target_new", "prompt_last"])
def test_only_the_trained_kernels_change_and_the_edit_is_learned(tiny, objective):
    """FT-M's full teacher-forced accuracy also pins `target_nll`'s alignment: with its target mask
    shifted by one position (planted, seen failing) the accuracy stops at 0.25."""
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=40, objective=objective)
    new, info = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, hp)
    assert _changed(tiny.params, new) == {"['layers'][1]['mlp']['down']['kernel']"}
    if objective == "target_new":  # FT-M: teacher-forced accuracy of the targets reaches 1
        assert np.mean(token_accuracy(new, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS)) == 1.0
    # The flat tiny model never gets near the default early-stop loss (1e-2): the whole budget runs.
    # Stopping inside the budget is test_stops_at_the_first_step_below_the_threshold.
    assert info["steps"] == hp.num_steps and info["loss"] > hp.early_stop_loss


def test_linf_norm_constraint_bounds_every_weight_change(tiny):
    eps = 1e-3
    new, _ = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS,
                     FTConfig(layers=(0, 1), lr=1e-1, num_steps=10, norm_constraint=eps))
    for layer in (0, 1):
        d = np.abs(np.asarray(new["layers"][layer]["mlp"]["down"]["kernel"]) -
                   np.asarray(tiny.params["layers"][layer]["mlp"]["down"]["kernel"]))
        assert d.max() <= eps + 1e-7 and d.max() > eps / 2  # the box is reached and respected


def test_early_stop_when_the_loss_is_already_low(tiny):
    # The random tiny model's logits are nearly flat (loss ~3.8 at best), so move the threshold
    # instead of the loss: a loss below it at the first evaluation means no step at all.
    _, info = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, FTConfig(layers=(1,), num_steps=5))
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=60, early_stop_loss=info["loss"] + 1.0)
    again, info2 = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, hp)
    assert info2["steps"] == 1 and not _changed(tiny.params, again)


def _reference_loss(params, cfg, objective: str) -> float:
    """Both FT objectives written out from their definitions, one unpadded request at a time. The
    tiny tokenizer maps the word "tN" to id N, so the token ids need no tokenizer either."""
    per_request = []
    for prompt, target in zip(PROMPTS, TARGETS):
        p_ids, t_ids = ([int(w[1:]) for w in text.split()] for text in (prompt, target))
        logp = jax.nn.log_softmax(forward(params, cfg, np.asarray([p_ids + t_ids])).logits[0], axis=-1)
        last = len(p_ids) - 1  # the position that predicts the first target token
        rows = [last + i for i in range(len(t_ids))] if objective == "target_new" else [last] * len(t_ids)
        per_request.append(-np.mean([float(logp[r, t]) for r, t in zip(rows, t_ids)]))
    return float(np.mean(per_request))


@pytest.mark.parametrize("objective", ["target_new", "prompt_last"])
def test_stops_at_the_first_step_below_the_threshold(tiny, objective):
    """Early stop fires inside the budget, where the loss (recomputed independently) is below the
    threshold, and not one step earlier. The threshold is halfway between the loss before training
    and after the full budget, since the flat tiny model cannot reach the default 1e-2. Planted bugs
    this catches (seen failing): the early stop never firing (`stop = False`), which the old
    `steps <= num_steps` could not see; the stopping step still applying its update."""
    full = FTConfig(layers=(1,), lr=1e-2, num_steps=40, objective=objective, early_stop_loss=-1.0)
    trained, _ = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, full)
    before, after = _reference_loss(tiny.params, tiny.cfg, objective), _reference_loss(trained, tiny.cfg, objective)
    assert after < before - 0.5  # training really lowers the loss, so the halfway mark is crossed
    hp = dataclasses.replace(full, early_stop_loss=(before + after) / 2)
    new, info = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, hp)
    steps = info["steps"]
    assert 1 < steps < hp.num_steps
    # Met where it stopped: no update is taken at the stopping step, so the returned weights are
    # the ones whose loss fired the stop.
    assert _reference_loss(new, tiny.cfg, objective) < hp.early_stop_loss
    assert info["loss"] == pytest.approx(_reference_loss(new, tiny.cfg, objective), abs=1e-4)
    # Not met one step earlier: a budget of steps - 1 runs out without stopping.
    _, earlier = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS,
                         dataclasses.replace(hp, num_steps=steps - 1))
    assert earlier["steps"] == steps - 1 and earlier["loss"] >= hp.early_stop_loss


def test_bad_layer_and_empty_target_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="layer 7 out of range"):
        ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, FTConfig(layers=(7,)))
    with pytest.raises(ValueError, match="empty target"):
        ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, ["t1 t2"], ["  "], FTConfig(layers=(1,)))


def _full_logits_loss(params, cfg, b, objective):
    """Both objectives written out on the FULL logits (what the packed reads must equal):
    FT-M, −log p(token t+1 | ..t) at every t whose next token is a target; FT-L, −log p(target
    token | prompt) under the one distribution at the last prompt token; mean per request."""
    logp = jax.nn.log_softmax(forward(params, cfg, jnp.asarray(b.tokens), attn_mask=jnp.asarray(b.attn_mask)).logits)
    losses = []
    for r in range(len(b.tokens)):
        idx = np.flatnonzero(b.target_mask[r])
        if not len(idx):  # a filler row of the batch bucket
            continue
        at = idx - 1 if objective == "target_new" else np.full_like(idx, b.prompt_last[r])
        losses.append(-logp[r, at, b.tokens[r, idx]].mean())
    return jnp.mean(jnp.stack(losses))


@pytest.mark.parametrize("objective", ["target_new", "prompt_last"])
def test_packed_reads_give_the_full_logits_loss_and_gradient(tiny, objective):
    """Only the read positions go through the LM head; loss and gradient equal the full-logits
    definition (targets of different lengths in one batch, so padding of the reads is exercised)."""
    from mirage_jax.editing import ft
    from mirage_jax.editing.common import loss_reads, replace_down_kernels
    from mirage_jax.tokens import make_batch

    b = make_batch(tiny.tokenizer, ["t10 t11 t12", "t20 t21", "t30"], ["t50 t51 t52", "t60", "t70 t71"])
    reads = loss_reads(b.tokens, b.target_mask, b.prompt_last, objective)
    assert reads.pos.shape[1] == 4 and float(reads.mask.sum()) == 6  # K = 3 targets bucketed to 4
    w = {1: np.asarray(tiny.params["layers"][1]["mlp"]["down"]["kernel"]) * 1.5}
    hidden = forward(tiny.params, tiny.cfg, jnp.asarray(b.tokens), attn_mask=jnp.asarray(b.attn_mask),
                     stop_layer=1).hidden
    got, g_got = jax.value_and_grad(ft._loss)(w, tiny.params, tiny.cfg, 1, hidden, jnp.asarray(b.attn_mask), reads)
    want, g_want = jax.value_and_grad(
        lambda w: _full_logits_loss(replace_down_kernels(tiny.params, w), tiny.cfg, b, objective))(w)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_got[1]), np.asarray(g_want[1]), rtol=1e-4, atol=1e-7)


def test_target_length_adds_no_compiled_shape_within_a_row_bucket(tiny):
    """Answers of 2 and 7 tokens after a ~20-token prompt (rows in the 32 bucket): one FT loop and
    one synthetic scorer serve both -- the packed reads take a quarter of the row (`read_slots`),
    not a bucket of their own (with `bucket(n, 4)` each compiled twice, ~1-3 s apiece on a CPU)."""
    from mirage_jax.editing import ft
    from mirage_jax.evaluation import synthetic

    prompt = " ".join(f"t{i}" for i in range(10, 30))
    targets = ["t50 t51", "t60 t61 t62 t63 t64 t65 t66"]
    hp = FTConfig(layers=(1,), num_steps=2)
    loops, scorers = ft._optimise._cache_size(), synthetic._argmax_packed._cache_size()
    for target in targets:
        new, _ = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, [prompt], [target], hp)
        token_accuracy(new, tiny.cfg, tiny.tokenizer, [prompt], [target])
    assert ft._optimise._cache_size() - loops == 1
    assert synthetic._argmax_packed._cache_size() - scorers == 1


EACH_PROMPTS = ["t10 t11 t12", "t20 t21", "t30 t31 t32 t33 t34 t35 t36", "t40"]
EACH_TARGETS = ["t50 t51", "t60", "t70 t71 t72", "t80 t81"]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return load_model(save_tiny("gpt2", tmp_path_factory.mktemp("ft_gpt2"), seed=7))


@pytest.mark.parametrize("family, objective, box", [("llama", "target_new", None), ("llama", "prompt_last", None),
                                                    ("llama", "target_new", 2e-3), ("gpt2", "target_new", None)])
def test_edits_together_equal_each_edit_alone(request, family, objective, box):
    """`ft_edit_each` (single edits packed into shared rows) against `ft_edit` on each request alone:
    the same steps (requests stop at different steps: the threshold is set where they do), the same
    final loss, the same update up to float reordering (Adam turns the noise of near-zero gradients
    into +-lr steps on a few weights: compared in Frobenius norm). Three requests: the count is
    padded with an empty one. Planted bugs this catches (seen failing): positions running across
    the packed row instead of restarting per request; the segment mask dropped (requests attend to
    each other); one stop for all requests (`any`) instead of each its own. GPT-2 (a position table)
    catches the first: under RoPE a segment's constant position offset changes nothing."""
    tiny = request.getfixturevalue("tiny" if family == "llama" else "tiny_gpt2")
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=30, objective=objective, norm_constraint=box)
    n = 3
    free = [ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, [p], [t], dataclasses.replace(hp, early_stop_loss=-1.0))
            for p, t in zip(EACH_PROMPTS[:n], EACH_TARGETS[:n])]
    hp = dataclasses.replace(hp, early_stop_loss=float(np.median([info["loss"] for _, info in free])) + 0.05)
    alone = [ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, [p], [t], hp)
             for p, t in zip(EACH_PROMPTS[:n], EACH_TARGETS[:n])]
    together = ft_edit_each(tiny.params, tiny.cfg, tiny.tokenizer, EACH_PROMPTS[:n], EACH_TARGETS[:n], hp)
    steps = [info["steps"] for _, info in alone]
    assert len(set(steps)) > 1 and min(steps) < hp.num_steps  # the premise: they stop apart
    k0 = np.asarray(tiny.params["layers"][1]["mlp"]["down"]["kernel"])
    for (a, ia), (b, ib) in zip(alone, together):
        assert _changed(tiny.params, b) == _changed(tiny.params, a) <= {"['layers'][1]['mlp']['down']['kernel']"}
        assert ib["steps"] == ia["steps"]
        assert ib["loss"] == pytest.approx(ia["loss"], abs=1e-5)
        da = np.asarray(a["layers"][1]["mlp"]["down"]["kernel"]) - k0
        db = np.asarray(b["layers"][1]["mlp"]["down"]["kernel"]) - k0
        assert np.linalg.norm(db - da) <= 1e-3 * np.linalg.norm(da) + 1e-9
        if box is not None:
            assert np.abs(db).max() <= box + 1e-7


def test_packing_places_every_token_once():
    """`_pack`: each request's tokens, in order, in one row, no slot used twice, positions from 0."""
    rng = np.random.default_rng(0)
    lengths = [3, 64, 20, 41, 1, 0, 33]
    t = 64
    tokens, attn = np.zeros((len(lengths), t), np.int32), np.zeros((len(lengths), t), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, t - n:], attn[r, t - n:] = rng.integers(1, 100, n), 1
    pk = _pack(tokens, attn)
    rows, width = pk.tokens.shape
    assert width == 64 and rows == 3  # 162 tokens in 64-slot rows: 3 rows (quarter octaves: every count to 8)
    used = pk.flat[attn.astype(bool)]
    assert len(set(used.tolist())) == len(used)
    for r, n in enumerate(lengths):
        slots = pk.flat[r, t - n:]
        np.testing.assert_array_equal(pk.tokens.reshape(-1)[slots], tokens[r, t - n:])
        np.testing.assert_array_equal(pk.segments.reshape(-1)[slots], r)
        np.testing.assert_array_equal(pk.positions.reshape(-1)[slots], np.arange(n))
        assert len(set((slots // width).tolist())) <= 1  # one row per request
    assert (pk.segments >= 0).sum() == sum(lengths)


@pytest.mark.parametrize("objective", ["target_new", "prompt_last"])
def test_flat_reads_point_into_each_requests_own_segment(tiny, objective):
    """`_flat_reads`: one read per target token, request-major, each at a packed slot of its own
    request's segment -- FT-M's the slot just before its token, FT-L's the last prompt token -- and
    a quarter of the packing's slots in all. Planted bug caught (the loop tests missed it: Adam is
    blind to a gradient's scale): the owners in the wrong order."""
    prompts, targets = EACH_PROMPTS + ["t90 t91"], EACH_TARGETS + ["t92 t93 t94 t95"]
    b = make_batch(tiny.tokenizer, prompts, targets, batch_bucket=False)
    pk = _pack(b.tokens, b.attn_mask)
    fr = _flat_reads(loss_reads(b.tokens, b.target_mask, b.prompt_last, objective), pk)
    n = int(b.target_mask.sum())
    assert len(fr.slot) == max(16, pk.tokens.size // 4) and fr.valid.sum() == n and not fr.valid[n:].any()
    want = np.concatenate([b.tokens[r][b.target_mask[r] > 0] for r in range(len(prompts))])
    np.testing.assert_array_equal(fr.tok[:n], want)
    np.testing.assert_array_equal(fr.owner[:n], np.repeat(np.arange(len(prompts)), b.target_mask.sum(1).astype(int)))
    np.testing.assert_array_equal(pk.segments.reshape(-1)[fr.slot[:n]], fr.owner[:n])
    if objective == "target_new":
        np.testing.assert_array_equal(pk.tokens.reshape(-1)[fr.slot[:n] + 1], want)
    else:
        last = pk.flat[np.arange(len(prompts)), b.prompt_last]
        np.testing.assert_array_equal(fr.slot[:n], last[fr.owner[:n]])

