"""Where the subject is: character offsets in the prompt -> the index of its last token.

ROME, R-ROME and MEMIT read the MLP key and write the value at the *last token of the subject*
(``fact_token: subject_last``). The seed found it by replacing every occurrence of the subject
with ``{}`` and tokenising prefix and prefix+subject separately, which asserts on a repeated
subject and miscounts at BPE merge boundaries (spec 7.1 #3). Here the subject is found once, by
character offsets of its first whole-word occurrence, and the token is read off the tokenizer's
offset mapping of the *full* text the model sees (context prefix + prompt + " " + target), so the
index is right inside any template and with any tokenizer that reports offsets.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from mirage_jax.tokens import EditInputError, bucket, encode_prompt_target


class SubjectRow(NamedTuple):
    """One text to feed: ``prefix + prompt (+ " " + target)`` with ``subject`` inside ``prompt``."""

    prefix: str  # context-template text placed before the prompt ("" for the plain prompt)
    prompt: str
    subject: str
    target: str | None = None  # None: no target tokens (key reads, the KL prompt)


@dataclasses.dataclass(frozen=True)
class SubjectBatch:
    """Left-padded batch (like `tokens.TokenBatch`) plus the subject's last-token index per row."""

    tokens: np.ndarray  # [B, T] int32
    attn_mask: np.ndarray  # [B, T] int32
    target_mask: np.ndarray  # [B, T] float32, 1 on target tokens
    subject_last: np.ndarray  # [B] int32 index of the subject's last token (T-1 on filler rows)
    n_rows: int  # real rows; the rest pad the batch to a multiple of `row_multiple`


def subject_span(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of the subject in the prompt: the first whole-word occurrence, else the
    first occurrence as a substring. Surrounding whitespace of the subject is ignored."""
    s = subject.strip()
    if not s:
        raise EditInputError(f"empty subject for prompt {prompt!r}")
    m = re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", prompt)
    if m:
        return m.span()
    i = prompt.find(s)
    if i < 0:
        raise EditInputError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return i, i + len(s)


def last_token_before(offsets: Sequence[tuple[int, int]], char_end: int) -> int:
    """Index of the last (non-special) token that starts before `char_end`: the token holding the
    character at ``char_end - 1`` whether or not the tokenizer folds a leading space into it."""
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end]
    if not hits:
        raise EditInputError(f"no token covers the text before character {char_end}")
    return hits[-1]


def encode_row(tokenizer: Any, row: SubjectRow, add_special_tokens: bool = True):
    """(ids, n_prompt, subject_last) for one row; errors name the subject and the prompt."""
    _, end = subject_span(row.prompt, row.subject)
    text = row.prefix + row.prompt
    ids, offsets, n_prompt = encode_prompt_target(tokenizer, text, row.target, add_special_tokens)
    last = last_token_before(offsets, len(row.prefix) + end)
    if last >= n_prompt:  # a merge across the prompt/target boundary; cannot happen with " "
        raise EditInputError(f"subject {row.subject!r} runs into the target in {text!r}")
    return ids, n_prompt, last


def locate_batch(
    tokenizer: Any,
    rows: Sequence[SubjectRow],
    *,
    add_special_tokens: bool = True,
    min_len: int = 16,
    row_multiple: int = 8,
) -> SubjectBatch:
    """Tokenise every row, left-pad to a power-of-two length (>= `min_len`) and pad the number of
    rows to a multiple of `row_multiple` (an edit always has the same rows: 21 templates + 1 KL
    prompt -> 24), so XLA sees a handful of shapes."""
    enc = [encode_row(tokenizer, r, add_special_tokens) for r in rows]
    n = len(enc)
    t_len = bucket(max(len(ids) for ids, _, _ in enc), min_len)
    b = -(-n // row_multiple) * row_multiple
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((b, t_len), pad, np.int32)
    attn = np.zeros((b, t_len), np.int32)
    tmask = np.zeros((b, t_len), np.float32)
    subject_last = np.full((b,), t_len - 1, np.int32)
    for r, (ids, n_prompt, last) in enumerate(enc):
        off = t_len - len(ids)
        tokens[r, off:] = ids
        attn[r, off:] = 1
        tmask[r, off + n_prompt:] = 1
        subject_last[r] = off + last
    attn[n:, -1] = 1  # filler rows see one token so their softmax stays finite
    return SubjectBatch(tokens, attn, tmask, subject_last, n)
