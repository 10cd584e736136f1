"""Edit stacks: K single edits evaluated in one batched pass give what each gives on its own.

The reference is always the plain path -- each member's full pytree through the same public
function -- so a stack that mixed members up, read the wrong rows or dropped a member's leaves
would show as a difference. Every test also checks its premise: the members' outputs differ.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import datasets
from mirage_jax import generate as gen
from mirage_jax.editing import METHODS
from mirage_jax.editing.common import replace_down_kernels, replace_mlp
from mirage_jax.editing.ft import FTConfig
from mirage_jax.editing.grace import GRACEConfig
from mirage_jax.evaluation import synthetic
from mirage_jax.evaluation.judge import ExactMatchJudge
from mirage_jax.evaluation.wild import WildConfig
from mirage_jax.model import load_model, stack
from mirage_jax.model.adapters import empty_wise
from mirage_jax.model.diff import changed_leaves, path_steps
from mirage_jax.model.stack import EditStack
from mirage_jax.model.transformer import forward
from mirage_jax.runner import RunConfig, _public, evaluate, evaluate_singles, pre_edit, run
from mirage_jax.tokens import decode_rows, member_rows
from tiny import qaedit_records, save_tiny

LAYER = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny("llama", tmp_path_factory.mktemp("stack") / "ckpt", seed=7, attn_gain=4.0))


def _rank_one(model, seed: int, scale: float = 0.3, layer: int = LAYER):
    """A ROME-shaped edit: the down kernel of `layer` plus a random rank-one term (moves generations)."""
    k = np.asarray(model.params["layers"][layer]["mlp"]["down"]["kernel"])
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal(k.shape[0]), rng.standard_normal(k.shape[1])
    return replace_down_kernels(model.params, {layer: jnp.asarray(k + scale * np.outer(u, v), k.dtype)})


def _wise(model, seed: int, ratio: float):
    """A WISE side memory under layer 0 with the `sequence` router (its route can switch mid-answer,
    which re-runs the whole sequence in the decode loop): a stack must keep that per member."""
    k = model.params["layers"][0]["mlp"]["down"]["kernel"]
    noise = 2.0 * np.random.default_rng(seed).standard_normal(k.shape).astype(np.float32)
    w = empty_wise(k, 2, ratio, "sequence", False)
    w = dict(w, memories=w["memories"].at[0].set(k + noise), min_act=w["min_act"].at[0].set(float(seed)))
    return replace_mlp(model.params, {(0, "wise"): w})


def _ids(model, texts):
    return [model.tokenizer(t)["input_ids"] for t in texts]


TEXTS = ["t10 t11 t5", "t20 t21 t22 t23", "t10 t11 t5 t7", "t33 t9", "t40 t41", "t50 t51 t52", "t60"]


def test_forward_of_a_stack_is_each_members_forward(tiny):
    members = [_rank_one(tiny, s) for s in range(3)]
    st = stack.build(tiny.params, members)
    assert isinstance(st, EditStack) and st.size == 3 and len(st.paths) == 1  # only the changed kernel stacked
    rows = _ids(tiny, TEXTS[:6])
    tokens = np.full((6, 8), 0, np.int32)
    mask = np.zeros((6, 8), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, 8 - len(ids):], mask[r, 8 - len(ids):] = ids, 1
    got = forward(st, tiny.cfg, jnp.asarray(tokens), attn_mask=jnp.asarray(mask)).logits
    for m, params in enumerate(members):
        rows_m = slice(2 * m, 2 * m + 2)
        want = forward(params, tiny.cfg, jnp.asarray(tokens[rows_m]), attn_mask=jnp.asarray(mask[rows_m]))
        np.testing.assert_allclose(got[rows_m], want.logits, atol=2e-5, rtol=1e-5)
    other = forward(members[1], tiny.cfg, jnp.asarray(tokens[:2]), attn_mask=jnp.asarray(mask[:2])).logits
    assert np.abs(np.asarray(other) - np.asarray(got[:2])).max() > 1e-2  # the premise: the members differ


def test_only_edited_mlps_run_per_member_else_the_whole_forward(tiny):
    """MLP edits: only those MLPs run per member (`stack.mlp_stacks`); an edit elsewhere (here an
    attention kernel) sends the whole forward through the per-member vmap. Both give each member's
    own logits, and a KV-cached decode step too."""
    k = np.asarray(tiny.params["layers"][0]["attn"]["q"]["kernel"])
    q_edits = []
    for s in range(2):
        layers = list(tiny.params["layers"])
        noise = np.random.default_rng(s).standard_normal(k.shape).astype(k.dtype)
        layers[0] = {**layers[0], "attn": {**layers[0]["attn"], "q": {"kernel": jnp.asarray(k + noise)}}}
        q_edits.append({**tiny.params, "layers": layers})
    for members, per_layer in (([_rank_one(tiny, s) for s in range(2)], True), (q_edits, False)):
        st = stack.build(tiny.params, members)
        assert (stack.mlp_stacks(st) is not None) == per_layer
        tokens = np.asarray(_ids(tiny, ["t10 t11 t5 t7"] * 2))
        got = forward(st, tiny.cfg, jnp.asarray(tokens), return_logits=True)
        for m, params in enumerate(members):
            want = forward(params, tiny.cfg, jnp.asarray(tokens[m : m + 1]))
            np.testing.assert_allclose(got.logits[m : m + 1], want.logits, atol=2e-5, rtol=1e-5)
        assert np.abs(np.asarray(got.logits[0] - got.logits[1])).max() > 1e-2  # the members differ


def _stops_at_a_multiple_of_5(text: str) -> bool:
    """A stop rule that ends rows at scattered steps, so that the decode loop compacts its batch."""
    return any(w[1:].isdigit() and int(w[1:]) % 5 == 0 for w in text.split())


@pytest.mark.parametrize("kind", ["rank_one", "wise_sequence_router"])
def test_generation_of_a_stack_is_each_members_generation(tiny, kind, monkeypatch):
    """Unequal prompts per member (one has none), batch_size 2: several rounds and filler rows; rows
    end at scattered steps, so the loop drops finished members and rows mid-generation (counted)."""
    members = [_rank_one(tiny, s) for s in range(4)] if kind == "rank_one" else [
        _wise(tiny, s, r) for s, r in ((1, 1.1), (2, 0.9), (3, 1.0), (4, 1.2))]
    st = stack.build(tiny.params, members)
    prompts = _ids(tiny, TEXTS)
    owner = [0, 0, 2, 3, 0, 2, 3]  # member 1 answers nothing
    kw = dict(max_new_tokens=24, batch_size=2, chunk=2, stop_fn=_stops_at_a_multiple_of_5)
    compactions = []
    compact = gen._compact
    monkeypatch.setattr(gen, "_compact", lambda *a: compactions.append(a[-1].members.size) or compact(*a))
    monkeypatch.setattr(gen, "MIN_COMPACT_ROWS", 1)  # the mechanics, on batches of a few rows
    monkeypatch.setattr(gen, "MIN_SAVED_ROW_STEPS", 0)
    got = gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, **kw)
    assert compactions and min(compactions) < 4, compactions  # the stack of 4 lost its finished members
    for m, params in enumerate(members):
        mine = [i for i, o in enumerate(owner) if o == m]
        want = gen.generate_ids(params, tiny.cfg, tiny.tokenizer, [prompts[i] for i in mine], **kw)
        assert [got[i] for i in mine] == want, m
    alone = gen.generate_ids(members[2], tiny.cfg, tiny.tokenizer, [prompts[0]], **kw)
    assert alone[0].ids != got[0].ids  # the premise: another member answers the same prompt otherwise


def test_a_compaction_may_split_a_member_over_slots_and_changes_no_generation(tiny, monkeypatch):
    """Member 0 answers four prompts, the others one each (4 x 4 rows): as rows end, compactions put
    member 0's running rows into several member slots (its leaves repeated) -- and every generation
    still equals the member's alone. Planted bug caught: a split slot given the next member's leaves."""
    members = [_rank_one(tiny, s) for s in range(4)]
    st = stack.build(tiny.params, members)
    prompts = _ids(tiny, TEXTS)
    owner = [0, 0, 0, 0, 1, 2, 3]
    kw = dict(max_new_tokens=24, batch_size=4, chunk=2, stop_fn=_stops_at_a_multiple_of_5)
    plans, compaction = [], gen._compaction
    monkeypatch.setattr(gen, "_compaction", lambda *a: plans.append(compaction(*a)) or plans[-1])
    monkeypatch.setattr(gen, "MIN_COMPACT_ROWS", 1)
    monkeypatch.setattr(gen, "MIN_SAVED_ROW_STEPS", 0)
    got = gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, **kw)

    def split(plan) -> bool:  # a member in two slots that both hold a running row
        q = plan.rows.size // plan.members.size
        live = [m for j, m in enumerate(plan.members) if not plan.done[j * q : (j + 1) * q].all()]
        return len(live) > len(set(live))

    assert any(p is not None and split(p) for p in plans), plans
    for m, params in enumerate(members):
        mine = [i for i, o in enumerate(owner) if o == m]
        want = gen.generate_ids(params, tiny.cfg, tiny.tokenizer, [prompts[i] for i in mine], **kw)
        assert [got[i] for i in mine] == want, m


def test_a_stack_prefills_a_shared_prompt_prefix_once_per_member(tiny, monkeypatch):
    """Prompts that start with the same 14 tokens: the prefix is prefilled once per member (an edit
    of layer 0 changes its keys / values above it), each member's rows get their own, and every
    generation equals the member's alone. Planted bug caught: the prefix rows handed out `tile`-wise
    (member k's rows given member k mod K's prefix) instead of `repeat`-wise."""
    members = [_rank_one(tiny, s, scale=1.0, layer=0) for s in range(4)]
    st = stack.build(tiny.params, members)
    head = " ".join(f"t{i}" for i in range(70, 84))  # 14 + up to 4 tokens: 4 x 16 + 8 x 16 < 8 x 32 slots
    prompts = _ids(tiny, [f"{head} {t}" for t in TEXTS])
    owner = [0, 1, 2, 3, 0, 1, 2]
    shared, fn = [], gen._prefix_cache
    monkeypatch.setattr(gen, "_prefix_cache", lambda *a: shared.append(a[2].shape) or fn(*a))
    kw = dict(max_new_tokens=12, batch_size=2)
    got = gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, **kw)
    assert shared and shared[0][0] == 4, shared  # one prefix row per member
    for m, params in enumerate(members):
        mine = [i for i, o in enumerate(owner) if o == m]
        assert [got[i] for i in mine] == gen.generate_ids(params, tiny.cfg, tiny.tokenizer,
                                                          [prompts[i] for i in mine], **kw), m


def _q_edit(model, seed: int):
    """An edit of layer 0's attention query kernel: a stack of these runs its whole forward per member."""
    layers = list(model.params["layers"])
    k = np.asarray(layers[0]["attn"]["q"]["kernel"])
    noise = np.random.default_rng(seed).standard_normal(k.shape).astype(k.dtype)
    layers[0] = {**layers[0], "attn": {**layers[0]["attn"], "q": {"kernel": jnp.asarray(k + noise)}}}
    return {**model.params, "layers": layers}


def _each_members_alone(tiny, members, prompts, owner, got, **kw):
    """Every generation of a stack equals its member's alone (`owner`: each prompt's member), and
    another member answers some prompt otherwise (the premise)."""
    for m, params in enumerate(members):
        mine = [i for i, o in enumerate(owner) if o == m]
        assert [got[i] for i in mine] == gen.generate_ids(params, tiny.cfg, tiny.tokenizer,
                                                          [prompts[i] for i in mine], **kw), m
    others = [gen.generate_ids(members[(o + 1) % len(members)], tiny.cfg, tiny.tokenizer, [p], **kw)[0]
              for p, o in zip(prompts, owner)]
    assert others != got


@pytest.mark.parametrize("kind", ["mlp", "attention"])
@pytest.mark.parametrize("head", [0, 14])
def test_a_stack_prefills_its_members_rests_packed_in_one_call(tiny, monkeypatch, head, kind):
    """Short prompts of 4 members (4 rows each), with and without a shared prefix: every member's
    rests packed into two rows of its own (member 0's two long rests do not share a row;
    `_prefill_packed`, one call for the stack, each member's prefix keys / values under its rows) --
    MLP edits (only those MLPs per member) and attention edits (the whole forward per member) -- and
    every generation equals the member's alone. Planted bug caught: the member prefixes handed to the
    packed rows `tile`-wise instead of `repeat`-wise."""
    make = (lambda s: _rank_one(tiny, s, scale=1.0, layer=0)) if kind == "mlp" else (lambda s: _q_edit(tiny, s))
    members = [make(s) for s in range(4)]
    st = stack.build(tiny.params, members)
    lead = " ".join(f"t{i}" for i in range(70, 70 + head))
    long = [" ".join(f"t{i}" for i in range(3, 3 + n)) for n in (9, 8)]
    prompts = _ids(tiny, [f"{lead} {t}".strip() for t in long + TEXTS[:5]])
    owner = [0, 0, 0, 1, 2, 3, 1]
    packed = []
    fn = gen._pack_prompts
    monkeypatch.setattr(gen, "_pack_prompts", lambda *a: packed.append(fn(*a)) or packed[-1])
    kw = dict(max_new_tokens=10, batch_size=4)
    got = gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, **kw)
    assert len(packed) == 1 and packed[0].tokens.shape == (8, 16), packed  # 2 packed rows per member
    _each_members_alone(tiny, members, prompts, owner, got, **kw)


def test_the_lowest_changed_layer_bounds_what_the_unedited_model_computes(tiny):
    """`stack.lowest_layer`: the lowest decoder layer of the changed leaves; an embedding edit is layer
    0 (nothing is left as it was), a final-norm edit past every layer."""
    n = tiny.cfg.num_layers
    paths = lambda edit: [path_steps(p) for p in changed_leaves(tiny.params, edit)]  # noqa: E731
    assert stack.lowest_layer(paths(_rank_one(tiny, 0, layer=1)), n) == 1
    assert stack.lowest_layer(paths(_head_edit(tiny, 0)), n) == n
    assert stack.lowest_layer(paths(dict(tiny.params, embed={"embedding": tiny.params["embed"]["embedding"] + 1})),
                              n) == 0
    both = replace_down_kernels(_head_edit(tiny, 0), {0: tiny.params["layers"][0]["mlp"]["down"]["kernel"] + 1.0})
    assert stack.lowest_layer(paths(both), n) == 0
    assert stack.lowest_layer(paths(_rank_one(tiny, 0, layer=1)) + paths(both), n) == 0
    assert stack.lowest_layer([], n) == n


@pytest.mark.parametrize("head, calls", [(0, 1), (14, 1), (14, 2)])
def test_a_stack_prefills_from_where_the_unedited_model_left_its_prompts(tiny, monkeypatch, head, calls):
    """The unedited model keeps each prompt's rest below the edited layer (`PromptStates`, the
    hidden state entering it and the keys / values under it); a stack of edits of that layer then
    prefills the same prompts from there (`_states_below`) -- and every generation equals the
    stack's without the states, and each member's alone. Keeping changes no generation either.
    Planted bugs caught: the kept hidden states one packed slot late; the kept keys / values put at
    the start of the rest slots; the lower layers' cache left as the prefill's (empty)."""
    layer = tiny.cfg.num_layers - 1
    members = [_rank_one(tiny, s, scale=1.0, layer=layer) for s in range(4)]
    st = stack.build(tiny.params, members)
    lead = " ".join(f"t{i}" for i in range(70, 70 + head))
    long = [" ".join(f"t{i}" for i in range(3, 3 + n)) for n in (9, 8)]
    prompts = _ids(tiny, [f"{lead} {t}".strip() for t in long + TEXTS[:5]])
    owner = [0, 0, 0, 1, 2, 3, 1]
    states = gen.PromptStates(layer)
    kw = dict(max_new_tokens=10)
    halves = [prompts[::2], prompts[1::2]] if calls == 2 else [prompts]  # 2: each stack batch spans both banks
    kept = [gen.generate_ids(tiny.params, tiny.cfg, tiny.tokenizer, part, states=states, keep_states=True,
                             batch_size=8, **kw) for part in halves]
    before = [kept[i % calls][i // calls] for i in range(len(prompts))]
    assert set(states.rests) == {tuple(p) for p in prompts} and len(states.banks) == calls
    assert before == gen.generate_ids(tiny.params, tiny.cfg, tiny.tokenizer, prompts, batch_size=8, **kw)
    used, fn = [], gen._states_below
    monkeypatch.setattr(gen, "_states_below", lambda *a: used.append(1) or fn(*a))
    starts, prefix_cache = [], gen._prefix_cache
    monkeypatch.setattr(gen, "_prefix_cache", lambda *a, **k: starts.append(k.get("start", 0)) or prefix_cache(*a, **k))
    got = gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, states=states, batch_size=4, **kw)
    assert used, "the stack prefilled every layer"
    if head and calls == 1:  # the shared prefix, kept as the prompts' rests were, starts there too
        assert states.prefixes and starts and set(starts) == {layer}, starts
    assert got == gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, batch_size=4, **kw)
    _each_members_alone(tiny, members, prompts, owner, got, batch_size=4, **kw)
    assert got != before  # the premise: the edits change some answer


@pytest.mark.parametrize("kind", ["mlp", "attention"])
@pytest.mark.parametrize("head", [0, 14])
def test_a_member_with_long_rests_takes_several_packed_blocks(tiny, monkeypatch, head, kind):
    """Member 0 of 4 has four ~40-token rests (a row each), the others one row's worth (a 33-token rest
    each, so their prefill blocks are as wide): equal blocks would give every member 4 rows, no fewer
    positions than the blocks, so the packed prefill runs 8 blocks of one row -- member 0
    on four of them, its leaves and prefix repeated (`tokens.member_blocks`) -- and every generation
    equals the member's alone, for MLP edits (only those MLPs per block) and attention edits (the
    whole forward per block). Planted bugs caught: a member's rows all run on its first block's
    member (its leaves not repeated); the blocks' prefixes left in member order."""
    make = (lambda s: _rank_one(tiny, s, scale=1.0, layer=0)) if kind == "mlp" else (lambda s: _q_edit(tiny, s))
    members = [make(s) for s in range(4)]
    st = stack.build(tiny.params, members)
    lead = " ".join(f"t{i}" for i in range(70, 70 + head))
    long = [" ".join(f"t{(i * 7 + j) % 60 + 3}" for j in range(38 + i)) for i in range(4)]
    mid = [" ".join(f"t{(i * 5 + j) % 50 + 5}" for j in range(33)) for i in range(3)]  # every block 64 wide
    texts = long + [mid[0], TEXTS[0], TEXTS[1], mid[1], TEXTS[3], mid[2], TEXTS[2]]
    prompts = _ids(tiny, [f"{lead} {t}".strip() for t in texts])
    owner = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    packed = []
    fn = gen._pack_prompts
    monkeypatch.setattr(gen, "_pack_prompts", lambda *a: packed.append(fn(*a)) or packed[-1])
    kw = dict(max_new_tokens=10, batch_size=4)
    got = gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, **kw)
    assert len(packed) == 1 and len(packed[0].tokens) == 8, packed  # 8 rows, not 16
    np.testing.assert_array_equal(packed[0].members, [0, 0, 0, 0, 1, 2, 3, 0])
    _each_members_alone(tiny, members, prompts, owner, got, **kw)


@pytest.mark.parametrize("head", [0, 14])
def test_a_stack_prefills_each_member_in_its_own_bucket(tiny, monkeypatch, head):
    """One member's prompts are ~40 tokens, the others' <= 6: one prefill would pad every row to the
    long member's bucket, so each member's rows are prefilled on its own params in its own bucket
    (`_prefill_rows`, called per member with prompts) -- with and without a shared prefix, an edit
    of layer 0 (prefix keys per member). Every generation equals the member's alone. Planted bugs
    caught: a member's rows prefilled on member 0's params; its rest put at the start of the
    prompt slots instead of the end."""
    members = [_rank_one(tiny, s, scale=1.0, layer=0) for s in range(4)]
    st = stack.build(tiny.params, members)
    lead = " ".join(f"t{i}" for i in range(70, 70 + head))
    long = " ".join(f"t{i % 60 + 3}" for i in range(40))
    texts = [f"{lead} {t}".strip() for t in [long, TEXTS[1], long + " t9", TEXTS[3], TEXTS[4], TEXTS[6]]]
    prompts = _ids(tiny, texts)
    owner = [0, 1, 0, 2, 3, 3]
    calls, fn = [], gen._prefill_rows
    monkeypatch.setattr(gen, "_prefill_rows", lambda *a: calls.append(a[2].shape) or fn(*a))
    kw = dict(max_new_tokens=10, batch_size=2)
    got = gen.generate_ids(st, tiny.cfg, tiny.tokenizer, prompts, members=owner, **kw)
    assert len(calls) == 4 and calls[0][1] > calls[1][1] == 16, calls  # the long member's bucket and the others'
    for m, params in enumerate(members):
        mine = [i for i, o in enumerate(owner) if o == m]
        assert [got[i] for i in mine] == gen.generate_ids(params, tiny.cfg, tiny.tokenizer,
                                                          [prompts[i] for i in mine], **kw), m
    assert gen.generate_ids(members[1], tiny.cfg, tiny.tokenizer, [prompts[1]], **kw)[0].ids != \
        gen.generate_ids(members[2], tiny.cfg, tiny.tokenizer, [prompts[1]], **kw)[0].ids  # the members differ


def _head_edit(model, seed: int):
    """An edit of the final norm: a stack of these also runs the LM head per member."""
    scale = np.asarray(model.params["final_norm"]["scale"])
    noise = np.random.default_rng(seed).standard_normal(scale.shape).astype(scale.dtype)
    return {**model.params, "final_norm": {**model.params["final_norm"], "scale": jnp.asarray(scale + noise)}}


@pytest.mark.parametrize("kind", ["mlp", "attention", "head"])
def test_packed_synthetic_scores_of_a_stack_are_each_members(tiny, monkeypatch, kind):
    """The default path: every member's samples packed into its own rows of one call (MLP edits run
    only those MLPs per member, attention / final-norm edits the whole forward and LM head), member
    0's two rows over two rounds (batch_size 1) -- each sample scored as its member alone scores it.
    Planted bugs caught: the reads laid out sample-major instead of member-major (a final-norm
    stack reads them on the wrong member); a member's rows placed row-major across members."""
    make = {"mlp": _rank_one, "attention": lambda m, s, **_: _q_edit(m, s),
            "head": lambda m, s, **_: _head_edit(m, s)}[kind]
    members = [make(tiny, s, scale=2.0, layer=0) for s in range(3)]
    st = stack.build(tiny.params, members)
    assert (stack.mlp_stacks(st) is None) == (kind != "mlp")
    prompts, targets = list(TEXTS[:6]), ["t8 t9", "t70", "t71 t72 t73", "t8", "t9 t9", "t70 t8"]
    prompts[1] = prompts[3] = " ".join(f"t{i % 60 + 3}" for i in range(40))  # rows of 64; member 0 needs 2
    owner = [2, 0, 1, 0, 2, 1]
    calls, fn = [], synthetic._argmax_packed
    monkeypatch.setattr(synthetic, "_argmax_packed",
                        lambda p, c, packed, **kw: calls.append(packed.tokens.shape) or fn(p, c, packed, **kw))
    got = synthetic.predicted_target_tokens(st, tiny.cfg, tiny.tokenizer, prompts, targets, batch_size=1,
                                            members=owner)
    assert calls == [(3, 64), (3, 64)], calls  # 3 members x 1 row, two rounds (member 0 has 2 rows)
    for i, (p, t, m) in enumerate(zip(prompts, targets, owner)):
        [(pred, gold)] = synthetic._padded_scores(members[m], tiny.cfg, tiny.tokenizer, [p], [t], 1, True, None)
        np.testing.assert_array_equal(got[i][0], pred)
        np.testing.assert_array_equal(got[i][1], gold)
    other = [synthetic.predicted_target_tokens(members[(m + 1) % 3], tiny.cfg, tiny.tokenizer, [p], [t])[0][0]
             for p, t, m in zip(prompts, targets, owner)]
    assert any(not np.array_equal(o, g[0]) for o, g in zip(other, got))  # the premise: the members differ


def test_a_stacks_teacher_forced_rows_start_from_the_kept_states(tiny, monkeypatch):
    """The unedited model keeps each teacher-forced row's hidden state entering the edited layer
    (`PromptStates.rows`); a stack of edits of that layer scores the same rows from there -- every
    prediction as without the states (and keeping changes none). Planted bug caught: the kept
    states placed one packed slot late."""
    layer = tiny.cfg.num_layers - 1
    members = [_rank_one(tiny, s, scale=2.0, layer=layer) for s in range(3)]
    st = stack.build(tiny.params, members)
    prompts, targets = list(TEXTS[:6]), ["t8 t9", "t70", "t71 t72 t73", "t8", "t9 t9", "t70 t8"]
    owner = [2, 0, 1, 0, 2, 1]
    states = gen.PromptStates(layer)
    kw = dict(batch_size=4)
    before = synthetic.predicted_target_tokens(tiny.params, tiny.cfg, tiny.tokenizer, prompts, targets,
                                               states=states, keep_states=True, **kw)
    assert len(states.rows) == len(prompts)
    plain = synthetic.predicted_target_tokens(tiny.params, tiny.cfg, tiny.tokenizer, prompts, targets, **kw)
    starts, fn = [], synthetic._argmax_packed
    monkeypatch.setattr(synthetic, "_argmax_packed",
                        lambda p, c, packed, **k: starts.append(k.get("start")) or fn(p, c, packed, **k))
    got = synthetic.predicted_target_tokens(st, tiny.cfg, tiny.tokenizer, prompts, targets, members=owner,
                                            states=states, **kw)
    assert starts and all(s == layer for s in starts), starts
    want = synthetic.predicted_target_tokens(st, tiny.cfg, tiny.tokenizer, prompts, targets, members=owner, **kw)
    for (a, b), (c, d) in zip(got, want):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    for (a, _), (c, _) in zip(before, plain):
        np.testing.assert_array_equal(a, c)
    assert any(not np.array_equal(a, c) for (a, _), (c, _) in zip(got, before))  # the premise: the edits show


@pytest.mark.parametrize("long", [False, True])
def test_padded_synthetic_scores_of_a_stack_are_each_members(tiny, monkeypatch, long):
    """The padded path (adapters, a mesh): one stacked pass, or (one member's sample is long: a
    stacked pass would pad every row to it) member by member, each in its own bucket -- either way
    each member's own scores. Planted bug caught: member by member, every sample scored on member 0."""
    members = [_rank_one(tiny, s, scale=2.0, layer=0) for s in range(3)]
    st = stack.build(tiny.params, members)
    prompts, targets = list(TEXTS[:6]), ["t8 t9", "t70", "t71 t72 t73", "t8", "t9 t9", "t70 t8"]
    owner = [2, 0, 1, 0, 2, 1]
    if long:
        prompts[1] = " ".join(f"t{i % 60 + 3}" for i in range(40))
    chose, fn = [], synthetic._member_by_member
    monkeypatch.setattr(synthetic, "_member_by_member", lambda *a: chose.append(fn(*a)) or chose[-1])
    got = synthetic._padded_scores(st, tiny.cfg, tiny.tokenizer, prompts, targets, 2, True, owner)
    assert chose == [long]
    for i, (p, t, m) in enumerate(zip(prompts, targets, owner)):
        [(pred, gold)] = synthetic.predicted_target_tokens(members[m], tiny.cfg, tiny.tokenizer, [p], [t])
        np.testing.assert_array_equal(got[i][0], pred)
        np.testing.assert_array_equal(got[i][1], gold)


def test_grouping_and_degenerate_stacks(tiny):
    a, b = _rank_one(tiny, 0), _rank_one(tiny, 1)
    w = _wise(tiny, 1, 1.1)
    assert stack.group(tiny.params, [a, w, b, tiny.params, w]) == [[0, 2], [1, 4], [3]]
    built = stack.stacks(tiny.params, [a, w, b, tiny.params, w])  # the runner's: groups with their pytrees
    assert [idx for idx, _ in built] == [[0, 2], [1, 4], [3]] and built[2][1] is tiny.params  # lone: itself
    for (_, st), members in zip(built[:2], ([a, b], [w, w])):
        want = stack.build(tiny.params, members)
        assert st.paths == want.paths
        for x, y in zip(st.leaves, want.leaves):
            np.testing.assert_array_equal(x, y)
    kernel = tiny.params["layers"][LAYER]["mlp"]["down"]["kernel"]
    assert stack.group(tiny.params, [a, b, a], max_bytes=2 * kernel.nbytes) == [[0, 1], [2]]  # two kernels a stack
    assert stack.build(tiny.params, [tiny.params, tiny.params]) is tiny.params  # no change: the original
    with pytest.raises(ValueError, match="same leaves"):
        stack.build(tiny.params, [a, w])
    with pytest.raises(ValueError, match="member of every prompt"):
        gen.generate_ids(stack.build(tiny.params, [a, b]), tiny.cfg, tiny.tokenizer, _ids(tiny, TEXTS[:2]))
    per, rounds = stack.layout([1, 1, 1, 0], 2, 4, per_cap=2)
    assert per == 2 and rounds == [[(3, 0), (0, 2), (1, 3)], [(2, 2)]]
    # a generation batch: the fewest rows per member whose total is a `decode_rows` size
    owners = [m for m in range(16) for _ in range(7)]
    rows_per = functools.partial(member_rows, k=16, sizes=decode_rows, alone=False)
    per, rounds = stack.layout(owners, 16, 112, per_cap=128, rows_per=rows_per)
    assert per == 7 and len(rounds) == 1 and sorted(slot for _, slot in rounds[0]) == list(range(112))
    assert [member_rows(most, k, decode_rows, alone=False)
            for k, most in ((4, 3), (5, 7), (1, 7), (16, 5))] == [4, 8, 8, 5]


@pytest.mark.parametrize("method, hp", [("FT-M", FTConfig(layers=(LAYER,), lr=1e-2, num_steps=20)),
                                        ("GRACE", GRACEConfig(layer=LAYER, eps=1e-3, n_iter=20, capacity=2))])
def test_runner_stacked_single_edits_equal_one_by_one(tiny, tmp_path, monkeypatch, method, hp):
    """Real edits through the runner's path: every metric of every sample -- WILD answers and
    verdicts, locality against the pre-edit answers, teacher-forced and (GRACE) generated synthetic
    scores -- equals the evaluation of that sample's edited model alone; then a whole run with
    stacks of 3 writes the rows of a run with stacks of 1 (FT-M's stacks prefilled from the layer
    it trains, on what each group's pre-edit pass kept: `runner._unchanged_below`)."""
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(qaedit_records(5)))
    reqs = list(datasets.load_qaedit(data).requests)
    m = METHODS[method]
    rc = RunConfig(method=method, model_name="tiny", dataset="qaedit", data_path=str(data), evaluation="both",
                   wild=WildConfig(max_new_tokens=6), output_dir=str(tmp_path / "a"),
                   generated_synthetic=m.generated_synthetic)
    judge = ExactMatchJudge()
    pre = pre_edit(tiny, reqs, rc, judge)
    edited = [m.apply(tiny.params, tiny.cfg, tiny.tokenizer, [r], hp) for r in reqs]
    got = evaluate_singles(tiny, reqs, edited, rc, judge, pre)
    for r, (params, _), g in zip(reqs, edited, got):
        assert g == evaluate(tiny, params, [r], rc, judge, [pre[r.case_id]])[0], r.case_id
    raws = {g["wild"]["rewrite_raw"] for g in got}
    assert len(raws) > 1  # the premise: the samples' edited models answer differently

    rows = {}
    used, fn = [], gen._states_below
    monkeypatch.setattr(gen, "_states_below", lambda *a: used.append(1) or fn(*a))
    for k in (1, 3):
        out = tmp_path / f"run{k}"
        run(tiny, reqs, m, hp, dataclasses.replace(rc, output_dir=str(out), stack_edits=k), judge)
        rows[k] = [{**json.loads(x), "edit": None} for x in next(out.glob("*.jsonl")).read_text().splitlines()]
    assert rows[1] == rows[3]
    assert bool(used) == (method == "FT-M")  # GRACE's stacks route per row: they prefill unpacked
    assert [row["post"] for row in rows[1]] == [_public(g) for g in got]  # with the kept states as without
    if m.apply_each is not None:  # and edits made together (FT: packed) give the rows of edits made one by one
        out = tmp_path / "alone"
        run(tiny, reqs, dataclasses.replace(m, apply_each=None), hp, dataclasses.replace(rc, output_dir=str(out)),
            judge)
        alone = [{**json.loads(x), "edit": None} for x in next(out.glob("*.jsonl")).read_text().splitlines()]
        assert alone == rows[1]
