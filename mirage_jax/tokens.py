"""Static-shape buckets, and prompt + target -> padded token batches with a target mask.

Used by every gradient-based editor (FT, MEND) and by the teacher-forced synthetic evaluation,
so "which tokens are the target" is decided in exactly one place. The target is tokenised *in
context* (prompt + " " + target, then split by character offsets), so SentencePiece-style
tokenizers get no stray lone-space token and byte-level BPE merges at the boundary are honest.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class EditInputError(ValueError):
    """An edit request cannot be turned into tokens (empty target, no target tokens...)."""


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): static shapes, few compilations."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def ladder(n: int, per_octave: int) -> int:
    """Smallest size >= n of the form m * 2^e with m <= 2 * `per_octave` (a power of two): 1 gives
    the powers of two (`bucket`), 2 adds the half octaves (12, 24, 48, 96, ...), 4 the quarter
    octaves too (80, 96, 112, 128, ...); below 2 * `per_octave` every size is its own. Finer rungs
    pad less, each one more compiled program."""
    e = 0
    while -(-n // (1 << e)) > 2 * per_octave:
        e += 1
    return max(1, -(-n // (1 << e)) << e)


def decode_rows(n: int) -> int:
    """Rows of a generation batch for n prompts: a power of two up to 16, then quarter octaves. On a
    CPU a padded row costs a decode step what a real one does (the step is ~2.1 ms a row on the
    default model), and 112 questions (16 QAEdit samples) padded to 128 ran 16 idle rows through
    every step until the first compaction."""
    return bucket(n, 1) if n <= 16 else ladder(n, 4)


def first_fit(lengths: Sequence[int], width: int) -> tuple[list[tuple[int, int]], int]:
    """Sequences packed into rows of `width` slots, first fit by decreasing length: each one's
    ``(row, first slot)`` and the number of rows used. Packing puts several short sequences (FT's
    edit requests, WILD's prompt rests) in one row of a compute-bound forward, so that its padded
    positions are about its real tokens (segment-masked attention keeps them apart)."""
    free: list[int] = []  # per row: its first empty slot
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > width:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit rows of {width}")
        row = next((r for r, f in enumerate(free) if f + lengths[i] <= width), len(free))
        if row == len(free):
            free.append(0)
        place[i] = row, free[row]
        free[row] += lengths[i]
    return place, len(free)


def first_fit_members(lengths: Sequence[int], owners: Sequence[int], k: int,
                      width: int) -> tuple[dict[int, tuple[int, int, int]], int]:
    """`first_fit` of each of `k` edit-stack members' sequences (`owners`) into rows of its own: each
    sequence's ``(member, row among the member's, first slot)`` and the most rows a member uses (a
    stack runs member-major blocks of equal rows: `member_rows`)."""
    place: dict[int, tuple[int, int, int]] = {}
    used = 0
    for member in range(k):
        mine = [i for i, m in enumerate(owners) if m == member]
        where, n = first_fit([lengths[i] for i in mine], width)
        place.update({i: (member, *w) for i, w in zip(mine, where)})
        used = max(used, n)
    return place, used


def rows_bucket(n: int) -> int:
    """Rows of a packed batch: a power of two up to 8, then multiples of 8 -- a packed batch of ~100
    rows padded to 128 would give back much of what packing saved."""
    return bucket(n, 1) if n <= 8 else -(-n // 8) * 8


def member_rows(used: int, k: int, sizes: Callable[[int], int] = rows_bucket, alone: bool = True) -> int:
    """Rows per member of a member-major batch of `k` edit-stack members (the same count each) where
    some member needs `used`: the fewest whose k-member total is a `sizes` size (a packed prefill's
    `rows_bucket`, a generation batch's `decode_rows`) or, with `alone`, whose own count is one --
    whichever comes first. For a packed prefill the total alone gave 3 members 8 rows each (24, a
    bucket) where each needed 1, the count alone 16 members 4 rows each (64) where 3 (48) do; for a
    generation batch 16 QAEdit samples of 7 questions take 7 a member (112 rows), not 8 (128)."""
    return next(r for r in itertools.count(used) if sizes(k * r) == k * r or (alone and sizes(r) == r))


def member_blocks(counts: Sequence[int], max_blocks: int) -> tuple[int, np.ndarray | None]:
    """How a packed edit-stack batch lays out its rows when member m fills ``counts[m]`` of them: R
    rows per block and the member each block runs on -- None for one block per member, in member
    order (R = `member_rows`), or, where that takes fewer rows and at most `max_blocks` blocks, one
    row per block: a member with several rows takes several blocks (its stacked leaves repeated, as
    a compaction's member slots are), the filler blocks at the end run member 0.

    Why: equal blocks give every member the rows of the one with the most -- a QAEdit stack of 16
    whose one member had four rests of 52-62 tokens took 5 rows of 64 each (80 rows, more than its
    prefill blocks held), where 56 rows hold every rest."""
    k, counts = len(counts), [int(c) for c in counts]
    r = member_rows(max(counts), k)
    total = rows_bucket(sum(counts))
    if total >= k * r or total > max_blocks:
        return r, None
    members = np.zeros(total, np.int32)
    members[:sum(counts)] = np.repeat(np.arange(k), counts)
    return 1, members


def split_pays(split: int, whole: int) -> bool:
    """Whether a batch is worth padding in parts (`split` positions: each part to its own bucket) over
    once (`whole` positions): when that saves a quarter or more. A compute-bound forward (a CPU's
    prefill and teacher-forced scores, ~620 positions/s on the default model) costs what its padded
    positions do; a part costs a call, and cold a compiled program of its own. Halving, the rule
    before, left a [128, 64] prefill of 112 questions where parts held 4608 positions, and a
    stacked [128, 64] scoring of 16 samples where member by member held ~5100."""
    return 4 * split <= 3 * whole


def read_slots(n: int, width: int) -> int:
    """Slots for `n` packed reads (target positions sent through the LM head) of rows `width` tokens
    long: a quarter of the width (at least 4), more only when `n` needs it. Tying the read count
    to the row bucket keeps it from adding compiled shapes of its own: with `bucket(n, 4)` a
    20-sample FT-M run on QAEdit compiled 17 synthetic scorers and 7 FT loops (answers of 1-16
    tokens) where 7 and 2 did before reads were packed, ~35 s of XLA compilation on a CPU."""
    return max(bucket(n, 4), width // 4)


def vocab_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """The text of every token id (special tokens kept) up to `vocab_size`; ids past the tokenizer's
    vocabulary (rows padding the embedding) get "". One batched decode: ~0.2 s for 49k tokens."""
    n = min(vocab_size, len(tokenizer))
    return list(tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)) + [""] * (vocab_size - n)


def join_target(prompt: str, target: str) -> str:
    """The seed prepends " " unconditionally (double space for targets that already start with
    one); we strip the target's outer whitespace first."""
    return prompt + " " + target.strip()


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Left-padded batch. `target_mask[b, t]` is 1 where token t is a target token of row b."""

    tokens: np.ndarray  # [B, T] int32
    attn_mask: np.ndarray  # [B, T] int32
    target_mask: np.ndarray  # [B, T] float32
    prompt_last: np.ndarray  # [B] index of the last prompt token
    n_rows: int  # real rows (the rest is padding up to the batch bucket)

    @property
    def prompt_len(self) -> np.ndarray:
        """[B] real prompt tokens per row (BOS included): the forward's ``prompt_len``, which tells
        adapters (GRACE) where each row's last prompt token is."""
        pads = self.tokens.shape[1] - self.attn_mask.sum(-1)
        return (self.prompt_last - pads + 1).astype(np.int32)


def encode_prompt_target(tokenizer: Any, prompt: str, target: str | None, add_special_tokens: bool = True):
    """Token ids of prompt (+ " " + target), their character offsets in that text, and how many
    tokens belong to the prompt. `target=None` encodes the prompt alone (all tokens are prompt)."""
    if target is not None and not target.strip():
        raise EditInputError(f"empty target for prompt {prompt!r}")
    text = prompt if target is None else join_target(prompt, target)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # First token that starts at/after the end of the prompt (special tokens have (0, 0)).
    n_prompt = next((i for i, (s, e) in enumerate(offsets) if e > s and s >= len(prompt)), len(ids))
    if target is not None and n_prompt == len(ids):
        raise EditInputError(f"target {target!r} produced no tokens after prompt {prompt!r}")
    if n_prompt == 0:
        raise EditInputError(f"prompt {prompt!r} produced no tokens")
    return ids, offsets, n_prompt


def split_prompt_target(tokenizer: Any, prompt: str, target: str, add_special_tokens: bool = True):
    """Token ids of prompt+target and how many of them belong to the prompt."""
    if not target or not target.strip():
        raise EditInputError(f"empty target for prompt {prompt!r}")
    ids, _, n_prompt = encode_prompt_target(tokenizer, prompt, target, add_special_tokens)
    return ids, n_prompt


def make_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    add_special_tokens: bool | Sequence[bool] = True,
    min_len: int = 16,
    batch_bucket: bool = True,
) -> TokenBatch:
    """Rows ``prompt + " " + target``, left-padded to a bucketed length. `add_special_tokens` per
    row where rows differ (a chat-wrapped prompt already holds its special tokens as text)."""
    special = [add_special_tokens] * len(prompts) if isinstance(add_special_tokens, bool) else list(add_special_tokens)
    rows = [split_prompt_target(tokenizer, p, t, a) for p, t, a in zip(prompts, targets, special, strict=True)]
    n = len(rows)
    t_len = bucket(max(len(ids) for ids, _ in rows), min_len)
    b = bucket(n, 1) if batch_bucket else n
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((b, t_len), pad, np.int32)
    attn = np.zeros((b, t_len), np.int32)
    tmask = np.zeros((b, t_len), np.float32)
    last = np.full((b,), t_len - 1, np.int32)
    for r, (ids, n_prompt) in enumerate(rows):
        off = t_len - len(ids)
        tokens[r, off:] = ids
        attn[r, off:] = 1
        tmask[r, off + n_prompt:] = 1
        last[r] = off + n_prompt - 1
    attn[n:, -1] = 1  # filler rows see one token so their softmax stays finite
    return TokenBatch(tokens, attn, tmask, last, n)
