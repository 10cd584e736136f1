"""The jitted greedy loop reproduces HF `generate` token for token, with buckets and stops.

HF's greedy ids are golden entries (tests/golden.py); the parity run recomputes them live."""

from __future__ import annotations

import numpy as np
import pytest

import golden
from mirage_jax import generate as gen
from mirage_jax.model.checkpoint import load_hf_checkpoint
from tiny import tiny_tokenizer

MAX_NEW = 20


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(2, 128, size=n)] for n in (3, 9, 17, 5, 1)]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    path = golden.save_tiny(f"generate.{request.param}", tmp_path_factory.mktemp("g" + request.param))
    cfg, params, _ = load_hf_checkpoint(path)
    cfg = cfg.replace(eos_token_ids=(1,))
    return request.param, cfg, params, tiny_tokenizer(cfg.vocab_size)


def test_batched_greedy_equals_hf_generate(tiny):
    family, cfg, params, tok = tiny
    ours = gen.generate_ids(params, cfg, tok, prompts(), max_new_tokens=MAX_NEW, batch_size=4, chunk=7)
    golden.check_equal("tiny", f"generate.{family}.greedy", [[int(t) for t in g.ids] for g in ours])


def test_stop_strings_and_stop_rule_cut_on_decoded_text(tiny):
    _, cfg, params, tok = tiny
    prompt = [[5, 6, 7]]
    [full] = gen.generate_ids(params, cfg, tok, prompt, max_new_tokens=12, chunk=4)
    assert full.stopped_by in ("length", "eos")
    third = tok.decode(list(full.ids[2:3]))
    [cut] = gen.generate_ids(params, cfg, tok, prompt, max_new_tokens=12, stop_strings=[third], chunk=4)
    first_hit = next(n for n in range(1, 13) if third in tok.decode(list(full.ids[:n])))
    assert cut.ids == full.ids[:first_hit] and cut.stopped_by == "stop"
    [ruled] = gen.generate_ids(params, cfg, tok, prompt, max_new_tokens=12,
                               stop_fn=lambda text: len(text.split()) >= 5, chunk=3)
    assert ruled.ids == full.ids[:5]


def test_eos_finishes_a_row_early(tiny):
    _, cfg, params, tok = tiny
    [full] = gen.generate_ids(params, cfg, tok, [[9, 10]], max_new_tokens=8)
    stop_at = full.ids[3]  # pretend the 4th generated token is an end-of-turn token
    cfg2 = cfg.replace(eos_token_ids=(stop_at,))
    [g] = gen.generate_ids(params, cfg2, tok, [[9, 10]], max_new_tokens=8)
    k = full.ids.index(stop_at)
    assert g.ids == full.ids[: k + 1] and g.stopped_by == "eos"


# Each call: prompt lengths, max_new_tokens, batch_size, and the (batch, prompt, new-token) bucket of each of its
# batches -- written out, not computed with `tokens.bucket`, so that the test does not share the code it checks.
_BUCKET_CALLS = [
    ((2, 9), 5, 8, [(2, 16, 16)]),
    ((3, 15), 9, 8, [(2, 16, 16)]),  # other prompt lengths and max_new_tokens, same buckets
    ((4, 6, 7), 16, 8, [(4, 16, 16)]),
    ((5, 5, 5, 5), 12, 8, [(4, 16, 16)]),  # 4 rows share the batch bucket of 3
    ((20,), 3, 8, [(1, 32, 16)]),
    ((30,), 17, 8, [(1, 32, 32)]),
    ((2, 3, 4, 5, 6), 10, 4, [(4, 16, 16), (1, 16, 16)]),  # two batches; the short last one is not padded to 4
]


def test_compiles_exactly_once_per_bucket(tiny, monkeypatch):
    """Prefill and decode each compile exactly one program per distinct (batch, prompt, new-token)
    bucket, counted after every call, over calls whose prompt lengths, batch sizes and
    max_new_tokens differ inside the same buckets, in chunks (several decode calls per batch).

    Planted bug it catches: all generation bucketing removed (`tokens.bucket` returns its input,
    exact shapes) -- a program per call instead of per bucket. The test it replaces allowed as
    many compilations as its two calls could make, so that bug passed it.
    """
    _, cfg, params, tok = tiny
    monkeypatch.setattr(gen, "_pack_prompts", lambda *a: None)  # the packed prefill's programs: its own test
    compiled = (gen._prefill, gen._decode)
    for fn in compiled:
        fn.clear_cache()
    seen: set[tuple[int, int, int]] = set()
    for lengths, new, batch_size, buckets in _BUCKET_CALLS:
        prompts = [[3] * n for n in lengths]
        gen.generate_ids(params, cfg, tok, prompts, max_new_tokens=new, batch_size=batch_size, chunk=4)
        seen.update(buckets)
        counts = [fn._cache_size() for fn in compiled]
        assert counts == [len(seen)] * 2, f"after prompts of {lengths}, {new} new: {counts} programs, buckets {seen}"


def test_empty_prompt_is_a_clear_error(tiny):
    *_, tok = tiny
    with pytest.raises(gen.GenerationError, match="prompt 1 is empty"):
        gen.encode_prompts(tok, ["t3 t4", ""])


def test_rows_that_finish_early_are_compacted_away_without_changing_any_answer(tmp_path, monkeypatch):
    """Rows stop at scattered steps (a stop rule on their text); once at most half the batch still
    runs, the loop goes on with a smaller batch. Every generation equals the one without compaction,
    and compaction happened (twice: 8 -> 4 -> 2 or fewer rows). The tiny Llama (the tiny GPT-2 repeats
    one token in every row: its rows would all stop together)."""
    cfg, params, _ = load_hf_checkpoint(golden.save_tiny("generate.llama", tmp_path))
    cfg = cfg.replace(eos_token_ids=(1,))
    tok = tiny_tokenizer(cfg.vocab_size)
    rng = np.random.default_rng(3)
    rows = [[int(t) for t in rng.integers(2, 128, size=n)] for n in (3, 9, 5, 4, 7, 2, 6, 8)]

    def rule(text: str) -> bool:  # fires at a token whose number is a multiple of 5: a different step per row
        return any(w[1:].isdigit() and int(w[1:]) % 5 == 0 for w in text.split())

    kw = dict(max_new_tokens=40, stop_fn=rule, batch_size=8, chunk=2)
    calls = []
    compact = gen._compact
    monkeypatch.setattr(gen, "_compact", lambda *a: calls.append(a[-1].rows.size) or compact(*a))
    monkeypatch.setattr(gen, "MIN_COMPACT_ROWS", 1)  # the mechanics, on a batch of 8
    monkeypatch.setattr(gen, "MIN_SAVED_ROW_STEPS", 0)
    got = gen.generate_ids(params, cfg, tok, rows, **kw)
    assert len(calls) >= 2 and calls[-1] <= 2, calls
    monkeypatch.setattr(gen, "_compaction", lambda *a: None)
    want = gen.generate_ids(params, cfg, tok, rows, **kw)
    assert got == want
    assert len({len(g.ids) for g in want}) >= 4  # the premise: the rows end at different steps


def test_compaction_never_makes_a_batch_smaller_than_the_floor():
    """Each new batch size is one more compiled decode loop: small batches are left alone, a big
    one shrinks only down to `MIN_COMPACT_ROWS` (filler rows marked done)."""
    floor = gen.MIN_COMPACT_ROWS
    one_running = np.ones(64, bool)
    one_running[5] = False
    plan = gen._compaction(one_running, 1, 50)
    assert plan.rows.size == floor and plan.rows[0] == 5 and plan.done.sum() == floor - 1
    assert gen._compaction(one_running[:floor], 1, 50) is None  # a batch at the floor is never compacted
    done = np.ones(64, bool)
    done[[1, 17]] = False  # 4 members of 16 rows: members 0 and 1 each keep one running row
    plan = gen._compaction(done, 4, 50)
    assert plan.rows.size == floor and list(plan.members) == [0, 1]
    assert [int(r) for r, d in zip(plan.rows, plan.done) if not d] == [1, 17]


def test_compaction_steps_down_half_octaves():
    """A batch of 112 rows (16 QAEdit samples' questions, `decode_rows`) with 90 running goes to 96
    rows -- with powers of two it kept all 112 until 64 ran -- and 40 running go to 48; a stack of 16
    members x 7 rows with 5 running each goes to 48 member slots of 2 rows (96; 4-row slots take 32
    slots, 128 rows), each member's rows on its own slots. Planted bug caught: the rungs left at powers of two."""
    done = np.ones(112, bool)
    done[:90] = False
    assert gen._compaction(done, 1, 50).rows.size == 96
    done[40:] = True
    assert gen._compaction(done, 1, 50).rows.size == 48
    done = np.ones(112, bool)
    for m in range(16):
        done[m * 7 : m * 7 + 5] = False
    plan = gen._compaction(done, 16, 50, max_slots=64)
    assert plan.rows.size == 96 and len(plan.members) == 48
    assert all(plan.rows[j] // 7 == plan.members[j // 2] for j in range(96))
    assert sorted(int(r) for r, d in zip(plan.rows, plan.done) if not d) == np.nonzero(~done)[0].tolist()


def test_compaction_counts_member_slots_by_their_leaves():
    """Each member slot of a compacted stack copies the member's stacked leaves (and reads them every
    step): 16 members x 7 rows with 3 running each go to 48 slots of 1 row where slots are free, to 16
    slots of 4 rows (64 rows, no copies) where a slot costs a row (`_slot_rows`). Planted bug caught:
    the slot cost left out of the shape's choice."""
    done = np.ones(112, bool)
    for m in range(16):
        done[m * 7 : m * 7 + 3] = False
    free = gen._compaction(done, 16, 50, max_slots=64)
    assert free.rows.size == 48 and len(free.members) == 48
    costly = gen._compaction(done, 16, 50, max_slots=64, slot_rows=1.0)
    assert costly.rows.size == 64 and list(costly.members) == list(range(16))


@pytest.mark.parametrize("n", [20, 36])
def test_a_batch_of_more_than_sixteen_prompts_decodes_in_quarter_octave_rows(tmp_path, monkeypatch, n):
    """Above 16 prompts a batch takes quarter-octave rows (`decode_rows`: 20 for 20, 40 for 36, not
    32 / 64) and every generation equals the one of batches of 4 -- 36 prompts prefilled unpacked in
    blocks of `PREFILL_BLOCK` rows, the last one of 8 (short ones first, then long: the blocks pay)."""
    cfg, params, _ = load_hf_checkpoint(golden.save_tiny("generate.llama", tmp_path))
    cfg = cfg.replace(eos_token_ids=(1,))
    tok = tiny_tokenizer(cfg.vocab_size)
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 12, size=n) if n == 20 else [2] * 32 + [40] * 4
    rows = [[int(t) for t in rng.integers(2, 128, size=k)] for k in lengths]
    sizes, decode = [], gen._decode
    monkeypatch.setattr(gen, "_decode", lambda *a: sizes.append(a[3].done.shape[0]) or decode(*a))
    blocks, prefill_rows = [], gen._prefill_rows
    monkeypatch.setattr(gen, "_prefill_rows", lambda *a: blocks.append(a[2].shape[0]) or prefill_rows(*a))
    monkeypatch.setattr(gen, "_pack_prompts", lambda *a: None)
    got = gen.generate_ids(params, cfg, tok, rows, max_new_tokens=8, batch_size=64)
    assert sizes and set(sizes) == {20 if n == 20 else 40}
    assert blocks == ([] if n == 20 else [32, 8]), blocks
    assert got == gen.generate_ids(params, cfg, tok, rows, max_new_tokens=8, batch_size=4)


def test_compaction_splits_a_member_over_slots_and_pays_for_itself():
    """A stack of 4 members x 8 rows with 5 / 1 / 1 / 0 running: 8 rows per member would keep all 32
    rows; 4 per member with member 0 in two slots makes 16 (the stacked leaves never grow past 4
    members). A compaction that saves fewer than `MIN_SAVED_ROW_STEPS` row-steps is not made."""
    done = np.ones(32, bool)
    done[[0, 2, 3, 5, 7, 9, 20]] = False  # member 0: rows 0-7 (5 running), member 1: 9, member 2: 20
    steps = -(-gen.MIN_SAVED_ROW_STEPS // 16)  # 16 rows dropped
    plan = gen._compaction(done, 4, steps)
    assert list(plan.members) == [0, 0, 1, 2] and plan.rows.size == 16
    running = [int(r) for r, d in zip(plan.rows, plan.done) if not d]
    assert running == [0, 2, 3, 5, 7, 9, 20]
    assert all(plan.rows[j] // 8 == plan.members[j // 4] for j in range(16))  # every row on its own member
    assert gen._compaction(done, 4, steps - 1) is None


def _counting(monkeypatch, name: str) -> list:
    """Calls of the module function `name` of `gen`, recorded (their results) while it still runs."""
    calls, fn = [], getattr(gen, name)
    monkeypatch.setattr(gen, name, lambda *a: calls.append(fn(*a)) or calls[-1])
    return calls


def test_a_shared_prefix_is_prefilled_once_and_changes_no_generation(tiny, monkeypatch):
    """Prompts with 12 common tokens and rests of 1-9 tokens: the prefix is prefilled once, its keys /
    values copied to every row, and every generation equals the one of the ordinary prefill (which
    matches HF's). Planted bugs caught: positions counted from the rest's slots only, the prefix KV
    copied from the wrong member row (`repeat` -> `tile` over rows), the rest prefilled at slot 0."""
    _, cfg, params, tok = tiny
    rng = np.random.default_rng(5)
    prefix = [int(t) for t in rng.integers(2, 128, size=12)]
    rows = [prefix + [int(t) for t in rng.integers(2, 128, size=n)] for n in (3, 9, 1, 5, 7)]
    shared = _counting(monkeypatch, "_prefix_cache")
    got = gen.generate_ids(params, cfg, tok, rows, max_new_tokens=MAX_NEW, batch_size=8, chunk=5)
    assert len(shared) == 1  # one batch: 1 x 16 prefix slots + 8 x 16 rest slots < 8 x 32 whole prompts
    monkeypatch.setattr(gen, "_shared_prefix", lambda *a, **k: 0)
    want = gen.generate_ids(params, cfg, tok, rows, max_new_tokens=MAX_NEW, batch_size=8, chunk=5)
    assert got == want
    assert len({g.ids for g in want}) >= 3  # the premise: the rests lead to different answers


def test_when_a_prefix_is_shared():
    """`_shared_prefix`: the common tokens, one left to each prompt, when that prefills fewer slots (the
    prompt keeps a power-of-two slot count: prefix bucket + rest slots)."""
    cfg = gen.ModelConfig(model_type="llama", vocab_size=64, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=512)
    params = {"layers": [{"mlp": {}}]}
    head = list(range(2, 26))  # 24 common tokens, like the default model's system turn
    rows = [head + [30 + i] * (i + 4) for i in range(7)]
    assert gen._shared_prefix(params, cfg, rows, 8, 1, 64) == 24
    assert gen._shared_prefix(params, cfg, [head[:9] + [40], head[:9] + [41, 42]], 2, 1, 64) == 0  # 9 -> 16+16 slots
    assert gen._shared_prefix(params, cfg, [r[:7] + [50] for r in rows], 8, 1, 64) == 0  # 7 < MIN_SHARED_PREFIX
    assert gen._shared_prefix(params, cfg, [head[:17], head[:17] + [7, 8], head[:17] + [9]], 4, 1, 64) == 16  # 1 left
    assert gen._shared_prefix(params, cfg, rows[:1], 1, 1, 64) == 0  # one prompt: 32 + 32 slots > 32
    assert gen._shared_prefix(params, cfg.replace(sliding_window=64), rows, 8, 1, 64) == 0  # the window could bind
    # Prompts that fit 64 slots whole, where the shared layout takes 32 + 96: unpacked rests would fill
    # 8 x 64 positions (no gain); packed (first fit into rows of 64) they take 3 rows.
    short = [head + [40 + i] * n for i, n in enumerate((5, 8, 10, 12, 15, 20, 25, 40))]
    assert gen._shared_prefix(params, cfg, short, 8, 1, 64) == 24
    assert gen._shared_prefix(params, cfg, short, 8, 1, 64, packs=False) == 0
    assert gen._shared_prefix(params, cfg.replace(sliding_window=160), rows, 8, 1, 64) == 24  # it never binds
    adapted = {"layers": [{"mlp": {"grace": {}}}]}
    assert gen._shared_prefix(adapted, cfg, rows, 8, 1, 64) == 0


def test_a_stop_character_brings_the_host_check_forward(tiny, monkeypatch):
    """With `stop_chars`, the loop leaves its chunk within two steps of a token that holds one, so a
    lone row ends right after its stop instead of at the end of a 16-step chunk; the generations are
    the same with any table, even one that sends every step to the host. Planted bugs caught: the
    exit test reading the row's token one step late (`step - 1` -> `step - 3`), no exit at all."""
    _, cfg, params, tok = tiny
    [full] = gen.generate_ids(params, cfg, tok, [[5, 6, 7]], max_new_tokens=30, chunk=16)
    texts = [tok.decode([t]) for t in full.ids]
    char = next(c for c in "0123456789" if any(c in t for t in texts[2:]))  # a digit that turns up late
    first = next(i for i, t in enumerate(texts) if char in t)
    kw = dict(max_new_tokens=30, chunk=16, stop_fn=lambda text: char in text)
    exits = _counting(monkeypatch, "_decode")
    want = gen.generate_ids(params, cfg, tok, [[5, 6, 7]], **kw)
    assert want[0].ids == full.ids[:first + 1] and int(exits[-1][1].step) == 16 * (first // 16 + 1)
    exits.clear()
    got = gen.generate_ids(params, cfg, tok, [[5, 6, 7]], stop_chars=char, **kw)
    assert got == want and int(exits[-1][1].step) == first + 1, [int(s.step) for _, s in exits]
    assert gen.generate_ids(params, cfg, tok, [[5, 6, 7]], stop_chars="t", **kw) == want  # every token checked
    assert gen.stop_chars_of(["ab", ".", ""]) == "b."


@pytest.mark.parametrize("head", [0, 12])
def test_a_plain_batch_prefills_blocks_of_sorted_rows_in_their_own_buckets(tiny, monkeypatch, head):
    """Six short prompts and two of ~40 tokens in one batch of 8, blocks of 2 rows: sorted by length,
    the short blocks prefill 16 columns and only the long block its wide bucket (`_prefill_rows`,
    4 calls), with and without a shared prefix -- and every generation equals the prompt's alone.
    Planted bugs caught: every block's first tokens taken from row 0's block; a block's rest put at
    the start of the prompt slots instead of the end."""
    _, cfg, params, tok = tiny
    rng = np.random.default_rng(7)
    lead = [int(t) for t in rng.integers(2, 128, size=head)]
    rows = [lead + [int(t) for t in rng.integers(2, 128, size=n)] for n in (3, 40, 5, 1, 38, 7, 2, 4)]
    monkeypatch.setattr(gen, "PREFILL_BLOCK", 2)
    monkeypatch.setattr(gen, "_pack_prompts", lambda *a: None)  # blocks, not packed rows (tested below)
    calls, fn = [], gen._prefill_rows
    monkeypatch.setattr(gen, "_prefill_rows", lambda *a: calls.append(a[2].shape) or fn(*a))
    got = gen.generate_ids(params, cfg, tok, rows, max_new_tokens=MAX_NEW, batch_size=8, chunk=5)
    assert [w for _, w in calls] == [16, 16, 16, 64 if head == 0 else 48], calls  # 48: a 16-slot prefix + 48
    want = [gen.generate_ids(params, cfg, tok, [r], max_new_tokens=MAX_NEW, batch_size=1)[0] for r in rows]
    assert got == want
    assert len({g.ids for g in want}) >= 2  # the premise: the prompts lead to different answers


@pytest.mark.parametrize("head", [0, 12])
def test_packed_prompts_prefill_in_one_call_and_change_no_generation(tiny, monkeypatch, head):
    """Eight prompts with rests of 1-9 tokens in one batch of 8: packed three to a row of 16 slots
    (`_prefill_packed`: 4 rows, half the unpacked prefill's 8 x 16), with and without a shared prefix --
    and every generation equals the unpacked prefill's and the prompt's alone. Planted bugs caught:
    positions counted from the rest's first token (the shared prefix left out), the segment mask
    dropped (a rest sees the rests packed before it), each rest's keys put one slot early in its row."""
    _, cfg, params, tok = tiny
    rng = np.random.default_rng(7)
    lead = [int(t) for t in rng.integers(2, 128, size=head)]
    rows = [lead + [int(t) for t in rng.integers(2, 128, size=n)] for n in (3, 9, 1, 5, 7, 2, 4, 6)]
    packed = _counting(monkeypatch, "_pack_prompts")
    got = gen.generate_ids(params, cfg, tok, rows, max_new_tokens=MAX_NEW, batch_size=8, chunk=5)
    assert len(packed) == 1 and packed[0].tokens.shape == (4, 16), packed
    monkeypatch.setattr(gen, "_pack_prompts", lambda *a: None)
    assert got == gen.generate_ids(params, cfg, tok, rows, max_new_tokens=MAX_NEW, batch_size=8, chunk=5)
    assert got == [gen.generate_ids(params, cfg, tok, [r], max_new_tokens=MAX_NEW, batch_size=1)[0] for r in rows]
    assert len({g.ids for g in got}) >= 3  # the premise: the prompts lead to different answers


def test_pack_prompts_layout():
    """`_pack_prompts`: each member's rests first fit into its own rows, positions after the shared
    prefix, each cache slot's source in the packed rows (the "none" slot for padding and filler rows)
    and each row's last token -- or None where packing saves less than a quarter."""
    rows = [[1] * 5 + [10, 11], [1] * 5 + [20], [1] * 5 + [30, 31, 32]]  # a 5-token prefix, rests 2, 1, 3
    p = gen._pack_prompts(rows, [0, 3, 1], 4, 2, 5, 8, 0, 1000)  # 2 members x 2 rows; row 2 a filler
    np.testing.assert_array_equal(p.tokens, [[30, 31, 32, 10, 11, 0, 0, 0], [20, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(p.segments, [[2, 2, 2, 0, 0, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(p.positions[0, :5], [5, 6, 7, 5, 6])
    none = 16
    np.testing.assert_array_equal(p.source, [[none] * 6 + [3, 4], [none] * 5 + [0, 1, 2], [none] * 8,
                                             [none] * 7 + [8]])
    np.testing.assert_array_equal(p.last, [4, 2, 0, 8])
    assert gen._pack_prompts(rows, [0, 3, 1], 4, 2, 5, 8, 0, 20) is None  # 16 packed positions > 3/4 of 20


def test_prefill_blocks_pay_or_the_batch_prefills_at_once():
    """`_prefill_blocks`: per-block buckets where they save a quarter of the positions, else one call -- its
    width the bucket of the longest rest, never the layout's wider rest slots."""
    rows = [[1] * n for n in (3, 4, 5, 6, 20, 40)]
    assert gen._prefill_blocks(rows, range(6), 8, 2, 0, 64) == [(0, 16), (2, 16), (4, 64)]  # 2*96 <= 3/4 of 8*64
    longer = [[1] * n for n in (3, 17, 18, 20)]
    assert gen._prefill_blocks(longer, range(4), 4, 2, 0, 64) == [(0, 32)]  # 2*64 > 3/4 of 4*32: one call
    assert gen._prefill_blocks(rows[:4], range(4), 4, 2, 0, 96) == [(0, 16)]  # 96 rest slots, 16 used
    assert gen._prefill_blocks([[1] * 30, [1] * 9], [0, 6], 8, 2, 5, 32) == [(0, 32), (6, 16)]  # a prefix of 5


def test_the_default_batch_fits_the_cache_budget():
    """`default_batch`: 128 rows where one batch's KV cache stays within `KV_BUDGET` (4 GiB), halved
    where it would not (a 7B Llama-2 in bf16: 32 rows, what every model got before; float32: 16)."""
    import jax.numpy as jnp

    from mirage_jax.model.memory import MODELS
    models = dict(MODELS)
    assert gen.default_batch(models["Llama-2-7B"], jnp.bfloat16, 50) == 32
    assert gen.default_batch(models["Llama-2-7B"], jnp.float32, 50) == 16
    assert gen.default_batch(models["Llama-3-8B"], jnp.bfloat16, 50) == 128  # 8 KV heads
    assert gen.default_batch(models["Llama-2-7B"], jnp.bfloat16, 1000) == 8  # the floor
    cfg = models["Llama-2-7B"]
    per_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (128 + 64)
    assert 32 * per_row <= gen.KV_BUDGET < 64 * per_row


def test_compaction_may_fill_more_member_slots_than_the_stack_has_where_the_bytes_allow():
    """16 members x 8 rows, each member with 2-5 running rows (59): capped at the stack's 16 slots
    the rows stay at 128 (8 per member: one member has 5); with more slots allowed (`_stack_blocks`:
    small stacked leaves) 32 slots of 2 rows hold them in 64 (64 slots of one row would too: the
    more rows per slot, the fewer copies of the leaves), every row still on its own member."""
    counts = [5, 4, 4, 2, 4, 4, 4, 4, 4, 2, 4, 4, 4, 4, 2, 4]
    done = np.ones(128, bool)
    for m, c in enumerate(counts):
        done[m * 8 : m * 8 + c] = False
    assert gen._compaction(done, 16, 50) is None
    plan = gen._compaction(done, 16, 50, max_slots=64)
    assert plan.rows.size == 64 and plan.members.size == 32
    assert all(plan.rows[j] // 8 == plan.members[j // 2] for j in range(64))
    assert sorted(int(r) for r, d in zip(plan.rows, plan.done) if not d) == list(np.nonzero(~done)[0])


@pytest.mark.parametrize("vocab", [49152, 32000, 1009, 200])
def test_top_token_is_the_first_argmax(vocab):
    """`top_token` (the max of each block of logits, then the argmax inside the first block holding
    it) picks `jnp.argmax`'s token -- the first of tied maxima, across blocks and inside one -- for a
    vocabulary of 1024-, 1000-logit blocks, one block, and none (200: plain argmax). Planted bug
    caught: the last block holding the max."""
    import jax.numpy as jnp

    from mirage_jax.model.transformer import top_token

    rng = np.random.default_rng(vocab)
    logits = rng.integers(-3, 4, size=(3, 5, vocab)).astype(np.float32)  # many ties, in and across blocks
    logits[0, 0] = -np.inf
    logits[0, 1, vocab // 2] = np.inf
    logits[1, 2, -1] = 9.0  # the max in the last slot only
    got = np.asarray(top_token(jnp.asarray(logits)))
    assert got.dtype == np.int32 and (got == np.argmax(logits, axis=-1)).all()
