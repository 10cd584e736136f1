"""Synthetic (teacher-forced) evaluation, as the editing literature reports it (spec section 2).

Every target token is predicted from the *gold* prefix; the score is the fraction of target
tokens whose argmax equals the gold token. Locality compares post-edit argmax tokens with the
pre-edit ones over the locality answer span. The samples are packed several to a row, segment-
masked (`_pack_scores`): one jitted forward per round of rows, an edit stack's members together.

The seed scores GRACE differently (spec 2.2): greedy generation of |target| tokens from the prompt,
position-wise accuracy against the target ids, plus a macro-F1. `generated_target_tokens` /
`generated_accuracy` are that variant, for any params (adapters or not): results label it
``*_generated`` beside the teacher-forced ``*_acc``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax import distributed
from mirage_jax.editing.common import loss_reads
from mirage_jax.generate import PromptStates, generate_ids
from mirage_jax.model import sharding, stack
from mirage_jax.model.adapters import has_adapters
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.stack import EditStack
from mirage_jax.model.transformer import forward, top_token, unembed
from mirage_jax.tokens import bucket, first_fit_members, make_batch, member_rows, split_pays, split_prompt_target


@functools.partial(jax.jit, static_argnums=(1,))
def _argmax_tokens(params, cfg: ModelConfig, tokens, attn_mask, prompt_len, read_pos):
    """Argmax next token at `read_pos` ``[B, R]`` (the positions before each target token). The LM
    head runs there only: over every position it would cost more than the whole stack (49k x 576
    on the default model, where rows hold ~40 tokens and targets ~4)."""
    # prompt_len: an adapter (GRACE) acts at the last *prompt* token, as when the edit was made
    hidden = forward(params, cfg, tokens, attn_mask=attn_mask, prompt_len=prompt_len, return_logits=False).hidden
    logits = unembed(params, cfg, jnp.take_along_axis(hidden, read_pos[:, :, None], axis=1))
    return top_token(logits)


def predicted_target_tokens(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    add_special_tokens: bool = True,
    members: Sequence[int] | None = None,
    states: PromptStates | None = None,
    keep_states: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample: (argmax predictions over the target span, gold target ids). `add_special_tokens`
    False for prompts that hold them already (chat-wrapped). `members`: with an `EditStack` as
    params, the stacked edit each sample is scored on (ignored for plain params). `states`: with
    `keep_states` (the unedited model) keep each packed row's hidden state entering `states.layer`
    (`PromptStates.rows`), else score the rows kept there from that layer on -- as `generate_ids`.

    Samples are packed several to a row (`_pack_scores`) unless the params have adapters (their
    routing reads each row's last prompt token) or lie on a device mesh; then each sample has a
    left-padded row of its own (`_padded_scores`)."""
    if sharding.mesh_of(params) is None and not has_adapters(stack.structure(params)):
        return _packed_scores(params, cfg, tokenizer, prompts, targets, batch_size, add_special_tokens, members,
                              states, keep_states)
    return _padded_scores(params, cfg, tokenizer, prompts, targets, batch_size, add_special_tokens, members)


def _padded_scores(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                   batch_size: int, add_special_tokens: bool,
                   members: Sequence[int] | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`predicted_target_tokens`, one left-padded row per sample: batches sorted by length, an edit
    stack's either stacked (member-major rows) or member by member (`_member_by_member`)."""
    if isinstance(params, EditStack) and _member_by_member(tokenizer, prompts, targets, add_special_tokens, members,
                                                           params.size, batch_size):
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(prompts)
        for m in sorted(set(members)):
            idx = [i for i, owner in enumerate(members) if owner == m]
            for i, pair in zip(idx, _padded_scores(params.member(m), cfg, tokenizer, [prompts[i] for i in idx],
                                                   [targets[i] for i in idx], batch_size, add_special_tokens, None)):
                out[i] = pair
        return out  # type: ignore[return-value]
    if isinstance(params, EditStack):
        per, rounds = stack.layout(members, params.size, len(prompts), batch_size)
        batches = []
        for r in rounds:  # member-major rows; a filler row repeats the round's first sample, its output unread
            at = {slot: i for i, slot in r}
            batches.append(([at.get(slot, r[0][0]) for slot in range(params.size * per)], [slot for _, slot in r],
                            [i for i, _ in r]))
    else:
        chunks = _by_length(_lengths(tokenizer, prompts, targets, add_special_tokens), batch_size)
        batches = [(rows, list(range(len(rows))), rows) for rows in chunks]
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(prompts)
    for rows, slots, items in batches:
        b = make_batch(tokenizer, [prompts[i] for i in rows], [targets[i] for i in rows],
                       add_special_tokens=add_special_tokens, batch_bucket=not isinstance(params, EditStack))
        reads = loss_reads(b.tokens, b.target_mask, b.prompt_last, "target_new")  # where FT-M's loss reads
        pred = distributed.fetch(_argmax_tokens(params, cfg, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask),
                                                jnp.asarray(b.prompt_len), reads.pos))
        gold, n_read = np.asarray(reads.tok), np.asarray(reads.mask).sum(1).astype(int)
        for slot, i in zip(slots, items):
            out[i] = (pred[slot, : n_read[slot]], gold[slot, : n_read[slot]])
    return out  # type: ignore[return-value]


class _PackedScores(NamedTuple):
    """Teacher-forced rows (prompt + target) packed several to a row for one forward (`_pack_scores`)."""

    tokens: np.ndarray  # [K*R, W] the samples' ids, first fit by decreasing length; member m's R rows at m*R
    segments: np.ndarray  # [K*R, W] the sample each slot holds, -1 where empty
    positions: np.ndarray  # [K*R, W] each token's position in its own sample
    reads: np.ndarray  # [K*Q] flat slot (row * W + slot) before each target token, member m's Q at m*Q


def _pack_scores(rows: Sequence[tuple[Sequence[int], int]], owners: Sequence[int], k: int, cap: int,
                 pad_id: int) -> list[tuple[_PackedScores, list[tuple[int, int, int]]]]:
    """`rows` (ids, prompt tokens) packed into rows of W = bucket(longest) slots, each of the `k`
    members' samples (`owners`) first fit into its own rows, in rounds of at most `cap` rows per
    member: per round the packing and, per sample in it, (sample, its first read, its read count).

    Rows per member are the same for every member (an edit stack runs member-major blocks), the
    fewest whose total is a packed-rows bucket; the reads (the LM head's rows) per member a quarter
    of its slots, more only where the targets need it -- so the shapes follow the rows (a few
    programs per run), as `read_slots` does for the padded layout."""
    width = bucket(max(len(ids) for ids, _ in rows))
    place, used = first_fit_members([len(ids) for ids, _ in rows], owners, k, width)
    out = []
    for first in range(0, used, cap):
        r = member_rows(min(cap, used - first), k)
        here = sorted((i for i, (_, row, _) in place.items() if first <= row < first + cap), key=lambda i: place[i])
        n_reads = [0] * k
        for i in here:
            n_reads[place[i][0]] += len(rows[i][0]) - rows[i][1]
        q = max(bucket(max(n_reads), 4), r * width // 4)
        tokens, segments = np.full((k * r, width), pad_id, np.int32), np.full((k * r, width), -1, np.int32)
        positions, reads = np.zeros((k * r, width), np.int32), np.zeros((k * q,), np.int32)
        spans, filled = [], [0] * k
        for i in here:
            (ids, n_prompt), (member, row, slot) = rows[i], place[i]
            row = member * r + row - first
            tokens[row, slot:slot + len(ids)], segments[row, slot:slot + len(ids)] = ids, i
            positions[row, slot:slot + len(ids)] = np.arange(len(ids))
            at, n = member * q + filled[member], len(ids) - n_prompt  # token t is predicted at slot t - 1
            reads[at:at + n] = row * width + slot + np.arange(n_prompt - 1, len(ids) - 1)
            spans.append((i, at, n))
            filled[member] += n
        out.append((_PackedScores(tokens, segments, positions, reads), spans))
    return out


@functools.partial(jax.jit, static_argnums=(1,), static_argnames=("start", "keep"))
def _argmax_packed(params: Any, cfg: ModelConfig, packed: _PackedScores, *, start: int = 0, keep: int = 0,
                   hidden: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Argmax next token at `packed.reads` of one forward over packed rows: each token sees the
    earlier tokens of its own sample only (segment mask, positions per sample), so it predicts what
    its sample's own left-padded row would; the LM head runs at the reads only. `start` > 0: from
    `hidden`, the state entering that layer at each packed slot; `keep` > 0: also return the state
    entering layer `keep` (plain params only) -- `generate.PromptStates`."""
    seg = packed.segments
    out = forward(params, cfg, None if start else packed.tokens, hidden=hidden, start_layer=start,
                  attn_mask=seg[:, :, None] == seg[:, None, :], positions=packed.positions, return_logits=False,
                  reads=(("layer_in", keep),) if keep else ())
    at = out.hidden.reshape(-1, out.hidden.shape[-1])[packed.reads]
    pred = top_token(unembed(params, cfg, at[:, None])[:, -1])
    return pred, out.reads[("layer_in", keep)] if keep else None


def _packed_scores(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                   batch_size: int, add_special_tokens: bool, members: Sequence[int] | None,
                   states: PromptStates | None = None,
                   keep_states: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """`predicted_target_tokens` with the samples packed into shared rows (`_pack_scores`): at most
    `batch_size` rows per member and call, an edit stack's members in one call (member-major rows).

    Why: the pass is compute-bound on a CPU, and one left-padded row per sample pads to a power of
    two: QAEdit's ~19-token rows filled 8-row member batches 32 or 64 wide, under half of them real
    tokens, one call per member of a stack (a 32-sample main job: 17,664 positions for 8,504 tokens)."""
    if not prompts:
        return []
    rows = [split_prompt_target(tokenizer, p, t, add_special_tokens) for p, t in zip(prompts, targets)]
    k = params.size if isinstance(params, EditStack) else 1
    if k > 1:
        stack.layout(members, k, len(prompts), batch_size)  # checks every sample names a member
    owners = list(members) if k > 1 else [0] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep = states.layer if states is not None and keep_states else 0
    start = 0
    if states is not None and not keep_states and all(tuple(ids) in states.rows for ids, _ in rows):
        start = states.start_for(params, cfg)
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(prompts)
    for packed, spans in _pack_scores(rows, owners, k, max(1, batch_size), pad):
        # each sample's packed slots, where states are kept or used
        slots = [np.flatnonzero(packed.segments.ravel() == i) for i, _, _ in spans] if start or keep else []
        hidden = None
        if start:
            kept = states.rows[tuple(rows[spans[0][0]][0])]
            hidden = np.zeros((packed.tokens.size, kept.shape[-1]), kept.dtype)
            for (i, _, _), at in zip(spans, slots):
                hidden[at] = states.rows[tuple(rows[i][0])]
            hidden = jnp.asarray(hidden.reshape(packed.tokens.shape + kept.shape[-1:]))
        pred, held = _argmax_packed(params, cfg, _PackedScores(*map(jnp.asarray, packed)), start=start, keep=keep,
                                    hidden=hidden)
        pred = distributed.fetch(pred)
        if keep:
            held = np.asarray(jax.device_get(held)).reshape(-1, held.shape[-1])
            for (i, _, _), at in zip(spans, slots):
                states.rows[tuple(rows[i][0])] = held[at].copy()
        for i, at, n in spans:
            ids, n_prompt = rows[i]
            out[i] = (pred[at:at + n], np.asarray(ids[n_prompt:], np.int32))
    return out  # type: ignore[return-value]


def _lengths(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], add_special_tokens: bool) -> list[int]:
    """Tokens of each ``prompt + target`` row, as `make_batch` builds it."""
    return [len(split_prompt_target(tokenizer, p, t, add_special_tokens)[0]) for p, t in zip(prompts, targets)]


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of `batch_size`, sorted by length: a batch is padded to its longest
    row's bucket, and the pass is compute-bound on a CPU (the default model's pre-edit scores of
    QAEdit 0-19, 140 rows: 12.4 s in input order, 9.2 s sorted)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _member_by_member(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], add_special_tokens: bool,
                      members: Sequence[int], size: int, batch_size: int) -> bool:
    """Whether an edit stack's samples are better scored member by member (each on its own params,
    in its own row bucket): where that pays (`split_pays`) over one stacked pass, which pads every
    member's rows to the longest sample of all (QAEdit, 16 members: [128, 64] where one by one
    ~16 x [8, 32]). A teacher-forced pass is compute-bound on a CPU: the stacked rows bought nothing."""
    lengths = _lengths(tokenizer, prompts, targets, add_special_tokens)
    per, rounds = stack.layout(members, size, len(prompts), batch_size)
    stacked = len(rounds) * size * per * bucket(max(lengths))
    alone = 0
    for m in set(members):
        mine = [n for n, owner in zip(lengths, members) if owner == m]
        alone += sum(bucket(len(rows), 1) * bucket(max(mine[i] for i in rows)) for rows in _by_length(mine, batch_size))
    return split_pays(alone, stacked)


def token_accuracy(params, cfg, tokenizer, prompts, targets, batch_size: int = 32,
                   add_special_tokens: bool = True, members: Sequence[int] | None = None) -> list[float]:
    """Reliability / generalisation: teacher-forced target-token accuracy per sample."""
    pairs = predicted_target_tokens(params, cfg, tokenizer, prompts, targets, batch_size, add_special_tokens, members)
    return [accuracy(p, g) for p, g in pairs]


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    """Teacher-forced token accuracy of one sample: the fraction of target tokens predicted."""
    return float(np.mean(pred == gold))


def locality_agreement(pre: Sequence[np.ndarray], post: Sequence[np.ndarray]) -> list[float]:
    """Fraction of answer positions where post-edit argmax equals pre-edit argmax."""
    return [float(np.mean(np.asarray(a) == np.asarray(b))) for a, b in zip(pre, post)]


def generated_target_tokens(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str],
                            targets: Sequence[str], batch_size: int = 32,
                            members: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample: (the first |target| greedily generated ids, -1 where generation ended earlier at
    EOS; gold target ids). The seed's GRACE variant (spec 2.2): no cache there, our KV-cached loop
    gives the same tokens (tests/test_grace.py). Target ids are split in context, as everywhere."""
    if not prompts:
        return []
    split = [split_prompt_target(tokenizer, p, t) for p, t in zip(prompts, targets)]
    gold = [np.asarray(ids[n:], np.int32) for ids, n in split]
    gens = generate_ids(params, cfg, tokenizer, [ids[:n] for ids, n in split],
                        max_new_tokens=max(len(g) for g in gold), batch_size=batch_size, members=members)
    out = []
    for g, gen in zip(gold, gens):
        ids = np.full(len(g), -1, np.int32)
        got = np.asarray(gen.ids[: len(g)], np.int32)
        ids[: len(got)] = got
        out.append((ids, g))
    return out


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """sklearn's ``f1_score(gold, pred, average="macro")`` over the two id lists (the seed's
    ``*_F1``): mean over every id in either list of 2tp / (2tp + fp + fn), position-wise."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    scores = []
    for c in np.union1d(gold, pred):
        tp = np.sum((gold == c) & (pred == c))
        denom = np.sum(gold == c) + np.sum(pred == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def generated_accuracy(params, cfg, tokenizer, prompts, targets, batch_size: int = 32) -> list[tuple[float, float]]:
    """Per sample (position-wise accuracy of the generated ids, macro-F1), spec 2.2."""
    pairs = generated_target_tokens(params, cfg, tokenizer, prompts, targets, batch_size)
    return [(float(np.mean(p == g)), macro_f1(g, p)) for p, g in pairs]
