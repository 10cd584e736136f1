"""The prompt/target split (`mirage_jax.tokens`) and the synthetic metric on the default model's
real byte-level BPE tokenizer (SmolLM2), where a leading space is part of a word's token.

The expectations are built without `tokens.py`: the prompt tokenised alone, prompt + " " + target
tokenised whole, and (for the metric) one unpadded `transformers` forward per request (its argmax is a
golden entry, tests/golden.py); the token tables in the comments are the hand-checked values.
"""

from __future__ import annotations

import numpy as np
import pytest

import golden
from mirage_jax.evaluation import synthetic
from mirage_jax.evaluation.synthetic import locality_agreement, token_accuracy
from mirage_jax.tokens import (
    EditInputError,
    bucket,
    decode_rows,
    first_fit,
    ladder,
    make_batch,
    member_blocks,
    member_rows,
    rows_bucket,
    split_prompt_target,
)

# (prompt, target, the target's tokens in context). "Ġ" is the byte-level BPE space.
SPLITS = [
    ("The capital of France is", "Paris", ["ĠParis"]),  # alone, "Paris" would be another token
    ("The capital of France is", "  Paris ", ["ĠParis"]),  # outer whitespace dropped, one joining space
    ("He was born in", "1990", ["Ġ", "1", "9", "9", "0"]),  # digits split: the joining space stands alone
    ("Q: Who?", "Danielle Darrieux", ["ĠDaniel", "le", "ĠDar", "rie", "ux"]),
    ("x", "'s mother", ["Ġ'", "s", "Ġmother"]),
]

# (prompt, target, teacher-forced accuracy) on the default model. Target tokens -> argmax
# predictions from the gold prefix (transformers, float32):
#   Paris            ĠParis                                  -> ĠParis                          1/1
#   Lyon             ĠLyon                                   -> ĠParis                          0/1
#   Paris, the ...   ĠParis , Ġthe Ġcity Ġof Ġlight          -> ĠParis . Ġand Ġcapital Ġthat Ġlove   1/6
#   the Moon         Ġthe ĠMoon                              -> ĠMars ĠMoon                     1/2
#   1990             Ġ 1 9 9 0                               -> Ġ 1 9 8 9                       3/5
#   Paris, France    ĠParis , ĠFrance                        -> Ġthe , ĠFrance                  2/3
#   Tokyo, ...       ĠTokyo , Ġthe Ġlargest Ġcity Ġin ĠJapan -> ĠTokyo . Ġand Ġcapital Ġcity Ġin Ġthe   3/7
# (smallest top-1 margin over these positions: 0.038 logits, far above our ~1e-3 from transformers).
ACCURACY = [
    ("The capital of France is", "Paris", 1.0),
    ("The capital of France is", "Lyon", 0.0),
    ("The capital of France is", "Paris, the city of light", 1 / 6),
    ("In 1969, the first humans landed on", "the Moon", 1 / 2),
    ("He was born in", "1990", 3 / 5),
    ("The Eiffel Tower is located in", "Paris, France", 2 / 3),
    ("The capital of Japan is", "Tokyo, the largest city in Japan", 3 / 7),
]


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


def independent_split(tok, prompt: str, target: str, special: bool = True) -> tuple[list[int], int]:
    """(ids of prompt + " " + target, number of prompt tokens), from two plain tokenizer calls."""
    full = tok(prompt + " " + target.strip(), add_special_tokens=special)["input_ids"]
    alone = tok(prompt, add_special_tokens=special)["input_ids"]
    assert full[: len(alone)] == alone  # byte-level BPE never merges across the joining space
    return full, len(alone)


@pytest.mark.parametrize("prompt, target, expected", SPLITS)
def test_target_is_tokenised_in_context(tok, prompt, target, expected):
    ids, n_prompt = split_prompt_target(tok, prompt, target)
    assert (ids, n_prompt) == independent_split(tok, prompt, target)
    assert tok.convert_ids_to_tokens(ids[n_prompt:]) == expected
    assert tok.decode(ids[n_prompt:]) == " " + target.strip()


def test_target_after_a_chat_template(tok):
    """The template already holds every special token (add_special_tokens=False); the target
    starts after the template's final newline."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids, n_prompt = split_prompt_target(tok, prompt, "Paris", add_special_tokens=False)
    assert (ids, n_prompt) == independent_split(tok, prompt, "Paris", special=False)
    assert tok.convert_ids_to_tokens(ids[n_prompt - 1:]) == ["Ċ", "ĠParis"]


def test_empty_target_is_an_error(tok):
    with pytest.raises(EditInputError, match="empty target"):
        split_prompt_target(tok, "The capital of France is", "  ")


def test_batch_is_left_padded_with_the_mask_exactly_on_the_target(tok):
    """Planted bug this catches (seen failing): the target mask starting one token early
    (`tmask[r, off + n_prompt - 1:]`, the last prompt token counted as target)."""
    prompts, targets = ["The capital of France is", "Q: Who?", "He was born in"], ["Paris", "Danielle Darrieux", "1990"]
    b = make_batch(tok, prompts, targets)
    assert b.tokens.shape == b.attn_mask.shape == b.target_mask.shape == (4, 16)  # buckets: 3 rows -> 4, 10 -> 16
    assert b.n_rows == 3
    # Row 0 by hand: 5 prompt tokens + "ĠParis" = 6 tokens, right-aligned in 16 slots.
    assert np.flatnonzero(b.target_mask[0]).tolist() == [15] and b.prompt_last[0] == 14
    assert b.attn_mask[0].tolist() == [0] * 10 + [1] * 6
    for r, (prompt, target) in enumerate(zip(prompts, targets)):
        full, n_prompt = independent_split(tok, prompt, target)
        off = 16 - len(full)
        assert b.tokens[r, off:].tolist() == full
        assert (b.tokens[r, :off] == tok.pad_token_id).all()
        assert b.attn_mask[r].tolist() == [0] * off + [1] * len(full)
        assert np.flatnonzero(b.target_mask[r]).tolist() == list(range(off + n_prompt, 16))
        assert b.prompt_last[r] == off + n_prompt - 1
    assert not b.target_mask[3].any()  # the filler row has no target


def test_token_accuracy_is_teacher_forced_target_accuracy(default_model):
    """Left-padded batches of 3 (so rows of different lengths share a batch) against the table
    above, which one unpadded transformers forward per request reproduces (its argmax per position
    is golden). Planted bugs this catches (seen failing): the target mask starting one token early;
    the prediction for target token t read at t instead of t - 1."""
    tok = default_model.tokenizer
    prompts, targets, expected = (list(col) for col in zip(*ACCURACY))
    reference = golden.value("default", "tokens.argmax")  # [full ids, transformers' argmax at each position]
    assert len(reference) == len(ACCURACY), f"ACCURACY changed: {golden.REGENERATE}"
    by_reference = []
    for prompt, target, (ref_ids, argmax) in zip(prompts, targets, reference):
        full, n_prompt = independent_split(tok, prompt, target)
        assert full == ref_ids, (prompt, target, f"golden inputs differ: {golden.REGENERATE}")
        predictions = np.asarray(argmax[n_prompt - 1 : len(full) - 1])  # position i predicts token i + 1
        by_reference.append(float(np.mean(predictions == np.asarray(full[n_prompt:]))))
    assert by_reference == pytest.approx(expected, abs=1e-12)
    got = token_accuracy(default_model.params, default_model.cfg, tok, prompts, targets, batch_size=3)
    assert got == pytest.approx(expected, abs=1e-12)


def test_packed_scores_are_each_samples_own(default_model, monkeypatch):
    """The packed pass (samples several to a row, rounds of `batch_size` rows) predicts, sample by
    sample, what the left-padded pass predicts -- on the default model, where the golden table
    above pins the padded pass to transformers. Planted bugs caught: the segment mask dropped (a
    sample sees the one packed before it); positions counted over the row, not the sample; the
    reads one slot late."""
    tok = default_model.tokenizer
    prompts, targets, _ = (list(col) for col in zip(*ACCURACY))
    prompts += ["Q: Who wrote Hamlet? A:", "The largest ocean on Earth is the"]
    targets += ["William Shakespeare", "Pacific Ocean"]
    calls, fn = [], synthetic._argmax_packed
    monkeypatch.setattr(synthetic, "_argmax_packed",
                        lambda p, c, packed, **kw: calls.append(packed) or fn(p, c, packed, **kw))
    got = synthetic.predicted_target_tokens(default_model.params, default_model.cfg, tok, prompts, targets,
                                            batch_size=4)
    assert [c.tokens.shape for c in calls] == [(4, 16), (4, 16)]  # 9 samples in 7 rows of 16: two rounds
    assert sum(len(set(row[row >= 0].tolist())) == 2 for c in calls for row in c.segments) == 2  # 10 + 6 twice
    want = synthetic._padded_scores(default_model.params, default_model.cfg, tok, prompts, targets, 3, True, None)
    for i, ((pred, gold), (pred_w, gold_w)) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(gold, gold_w, err_msg=str(i))
        np.testing.assert_array_equal(pred, pred_w, err_msg=str(i))


def test_locality_agreement_is_the_fraction_of_equal_positions():
    pre = [np.array([5, 6, 7]), np.array([1, 2]), np.array([9])]
    post = [np.array([5, 0, 7]), np.array([3, 4]), np.array([9])]
    assert locality_agreement(pre, post) == pytest.approx([2 / 3, 0.0, 1.0])


def test_first_fit_packs_longest_first_into_the_first_row_with_room():
    place, rows = first_fit([3, 9, 1, 5, 7], 10)
    assert rows == 3 and place == [(1, 7), (0, 0), (0, 9), (2, 0), (1, 0)]  # 9+1 | 7+3 | 5
    with pytest.raises(ValueError, match="11 tokens"):
        first_fit([4, 11], 10)
    assert [rows_bucket(n) for n in (1, 3, 5, 8, 9, 40, 41)] == [1, 4, 8, 8, 16, 40, 48]
    # rows per member: a bucketed total (16 x 3 = 48) or a bucketed count (3 x 1), the first reached
    assert [member_rows(u, k) for u, k in ((3, 16), (1, 3), (3, 3), (5, 1), (9, 1), (2, 5))] == [3, 1, 4, 8, 16, 2]


def test_packed_scores_count_positions_per_sample(tmp_path):
    """On a learned-position model (GPT-2's table; under RoPE a sample's positions shifted by its
    first slot give the same scores) the packed pass still predicts what each sample's own padded
    row does. Planted bug caught: positions counted over the row, not the sample."""
    from mirage_jax.model import load_model
    from tiny import save_tiny

    m = load_model(save_tiny("gpt2", tmp_path / "ckpt", seed=3, attn_gain=4.0))
    prompts = ["t10 t11 t5", "t20 t21 t22 t23", "t33 t9", "t40 t41 t42", "t50 t51 t52 t53 t54 t55 t56", "t60"]
    targets = ["t8 t9", "t70", "t71 t72 t73", "t8", "t9 t9 t9", "t70 t8"]
    got = synthetic.predicted_target_tokens(m.params, m.cfg, m.tokenizer, prompts, targets)
    want = synthetic._padded_scores(m.params, m.cfg, m.tokenizer, prompts, targets, 32, True, None)
    packed, _ = synthetic._pack_scores([split_prompt_target(m.tokenizer, p, t) for p, t in zip(prompts, targets)],
                                       [0] * 6, 1, 32, 0)[0]
    assert packed.tokens.shape == (4, 16)  # 6 samples in 3 rows
    assert max(len(set(row[row >= 0].tolist())) for row in packed.segments) == 3
    for i, ((pred, gold), (pred_w, gold_w)) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(gold, gold_w, err_msg=str(i))
        np.testing.assert_array_equal(pred, pred_w, err_msg=str(i))



def test_member_blocks_repeat_a_member_with_many_rows_where_that_takes_fewer():
    """`member_blocks`: one block per member (None) where equal blocks are no more rows, else one row
    per block in member order, filler blocks on member 0 -- never more blocks than allowed."""
    qaedit = [5] + [3] * 15  # one member's four long rests: 5 rows where the others need 3
    r, members = member_blocks(qaedit, 1000)
    assert r == 1 and len(members) == 56  # 50 rows, bucketed; equal blocks: 16 x 5 = 80
    np.testing.assert_array_equal(members[:8], [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(members[48:], [15, 15, 0, 0, 0, 0, 0, 0])
    assert member_blocks(qaedit, 16) == (5, None)  # the repeated leaves would not fit
    assert member_blocks([1, 1, 1], 1000) == (1, None)  # equal blocks: 3 rows, 4 otherwise
    assert member_blocks([2] * 4, 1000) == (2, None)
    assert member_blocks([3], 1000) == (4, None)  # plain params: one block


@pytest.mark.parametrize("per_octave", [1, 2, 4])
def test_ladder_is_the_smallest_rung_at_or_above(per_octave):
    """`ladder` against its definition: the sizes m * 2^e with m <= 2 * per_octave (all of 1..2 *
    per_octave), the smallest >= n. 1 is `bucket`; `decode_rows` is powers of two to 16, then
    quarter octaves (112 rows for 112 prompts)."""
    rungs = sorted({m << e for m in range(1, 2 * per_octave + 1) for e in range(12)})
    for n in range(1, 1025):
        assert ladder(n, per_octave) == next(r for r in rungs if r >= n), n
        if per_octave == 1:
            assert ladder(n, 1) == bucket(n, 1)
    assert [ladder(n, 2) for n in (7, 9, 13, 33, 49, 65, 97)] == [8, 12, 16, 48, 64, 96, 128]
    assert [decode_rows(n) for n in (5, 9, 16, 17, 100, 112, 113)] == [8, 16, 16, 20, 112, 112, 128]
