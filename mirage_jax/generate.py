"""Jitted, batched, KV-cached greedy decoding with static shapes, and the quick-look command.

Why it is built this way:

* Buckets. XLA compiles one program per distinct set of input shapes, and a compilation costs
  seconds where a decode step costs milliseconds. So every shape is padded up to a bucket (a power
  of two, `tokens.bucket`): prompt length (>= 16), batch (<= the bucket of `batch_size`) and
  new tokens (>= 16). A handful of programs then serve every prompt, and an edited model reuses
  them too: an edit changes parameter values, never shapes. `tests/test_generate.py` counts them.
* Chunks. The decode loop is a `lax.while_loop` that stops early once every row is done, run
  `chunk` steps at a time, because between chunks the host checks stop *strings* (and any stop
  rule) on the decoded text -- something token ids alone cannot express ("." inside ".\\n",
  "Robert C. Newton"). Bigger chunks mean fewer host round trips but more wasted steps after a
  row's text has stopped.
* Early checks. A text stop can only fire on a token with one of the stop's last characters in it
  (`stop_chars`: "." and "\n" for the WILD rules), or on the token after it (a period at the end of
  the text waits for the next character). The loop leaves its chunk early when a running row has
  written such a token in its last two steps, so the host checks it then, not up to `chunk` - 1
  steps later; a per-sample WILD batch no longer idles to the end of a chunk after its last answer.
  Which tokens trigger a check decides only *when* the host looks, never what it finds: the
  results are the same for any table.
* Host vs device. The parameters, the KV cache (allocated once per batch, prompt + new-token
  buckets long) and the `DecodeState` live on the device, and EOS is checked there, inside the
  loop (a token id suffices). Per chunk the host fetches `step` and `done` and, when there are
  stop strings or a stop rule, the generated ids (`[B, N]` int32, small), decodes each row with
  the tokenizer, and sends back `done` with the rows whose text has stopped.
* Compaction. Answers end at very different steps (on the default model most by ~27 tokens, some
  at the 50-token budget), and a finished row still costs a forward per step. Once at most half
  the batch runs, and the rows dropped save more than the gather costs, the host gathers the
  running rows into the next smaller bucket (`_compaction`; an edit stack's member with many
  running rows may take several member slots).
* Shared prefix. Prompts under a chat template or an instruction start with the same tokens (the
  default model's system turn: 24 of its ~45 prompt tokens), so `_prefix_cache` runs that prefix
  once (one row per stacked edit) and `_prefill` copies its keys / values to every row and prefills
  only the rest of each prompt (`_shared_prefix` decides; the prefill is ~20% of a WILD run on a CPU).
  The prompt keeps its slot count, so the decode programs are the same as without.
* Packed prompts. A CPU prefill is compute-bound, so its padding is time: where it saves a quarter
  of the prefilled positions, the prompts' rests are packed several to a row (`_pack_prompts`,
  segment-masked attention, each member of an edit stack in its own rows) and prefilled in one call
  (`_prefill_packed`), their keys / values then gathered into the batch cache's usual layout; else
  blocks of rows prefill in their own buckets (`_prefill_blocks`).
* Edit stacks. With an `EditStack` as params (`mirage_jax.model.stack`), every prompt says which
  stacked edit answers it (`members`) and rows are laid out member-major; in a packed prefill a
  member with more rows than the others takes several blocks of them (`tokens.member_blocks`).
* Prompt states. The unedited model's packed prefill can keep each prompt's layers below some
  layer (`PromptStates`, on the device), and its shared prefix's; an edited model that changes
  nothing below it then prefills the same prompts from there -- a single-edit run asks every
  question before and after its edit.
* Rows. A batch takes quarter-octave rows above 16 prompts (`tokens.decode_rows`: 112, not 128)
  and its compactions step down half octaves: on a CPU a padded or finished row costs a decode step
  what a running one does.

    python -m mirage_jax.generate --model=default --prompt='The capital of France is' --max_new_tokens=12
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mirage_jax import distributed
from mirage_jax.model import sharding, stack
from mirage_jax.model.adapters import has_adapters
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.memory import kv_cache_bytes
from mirage_jax.model.stack import EditStack
from mirage_jax.model.transformer import (
    K_SLOT_AXIS,
    V_SLOT_AXIS,
    KVCache,
    Params,
    forward,
    init_cache,
    map_slots,
    params_dtype,
    positions_from_mask,
    top_token,
    unembed,
)
from mirage_jax.tokens import (
    bucket,
    decode_rows,
    first_fit,
    first_fit_members,
    ladder,
    member_blocks,
    member_rows,
    split_pays,
    vocab_texts,
)

StopFn = Callable[[str], bool]


class GenerationError(ValueError):
    """Bad generation input (empty prompt, prompt longer than the model's context...)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's output: new token ids (up to and including the stop) and their text."""

    ids: tuple[int, ...]
    text: str  # decoded with special tokens skipped
    raw_text: str  # decoded with special tokens kept (what stop strings see)
    stopped_by: str  # 'eos', 'stop' (string / stop rule) or 'length'


class DecodeState(NamedTuple):
    """What the greedy loop carries from one step to the next (the habit of gemma's `SamplingState`).

    B is the batch bucket, P the prompt bucket and N the new-token bucket: every field has a static
    shape, so one compiled loop serves every chunk of every batch in the same buckets. The KV cache
    travels beside the state, not in it, so that it alone is donated (see `_decode`).
    """

    step: jax.Array  # [] int32: steps taken = columns of `out` written; the loop counter
    next_token: jax.Array  # [B] int32: greedy pick of the last forward, written at `step` (prefill picks the first)
    out: jax.Array  # [B, N] int32: generated ids (EOS included), -1 after a row is done; N wide: a static carry
    done: jax.Array  # [B] bool: EOS written, stop string / rule hit (set by the host) or filler row; all -> exit
    mask: jax.Array  # [B, P + N] int32: cache slots holding real tokens (left padding stays 0); a step sets one
    prompt_len: jax.Array  # [B] int32: real prompt tokens per row; the token at step s has position prompt_len + s
    prompt_slots: jax.Array  # [] int32: P, the same for every row; the token at step s goes to cache slot P + s
    # Adapter decisions made at prefill on each row's last prompt token ({} without adapters; see
    # `mirage_jax.model.adapters`): a decode step sees only its own token, the prompt's stay put.
    routes: dict
    # [B, P] the left-padded prompts, kept only when an adapter's route can switch mid-answer (WISE's
    # ``sequence`` router): the step after a switch recomputes the whole sequence (`_redo_switched`).
    prompt_tokens: jax.Array | None = None


def _switched(routes: dict) -> jax.Array | None:
    """[B] bool: rows whose adapter decision changed at this step (None: no adapter can switch)."""
    flags = [r["switched"] for layer in routes.values() for r in layer.values() if "switched" in r]
    return None if not flags else jnp.any(jnp.stack(flags), axis=0)


def _redo_switched(params: Params, cfg: ModelConfig, cache: KVCache, s: DecodeState, out_tokens: jax.Array,
                   mask: jax.Array, slot: jax.Array, routes: dict, nxt: jax.Array,
                   switched: jax.Array) -> tuple[KVCache, jax.Array]:
    """After a routing switch, the cached K/V of the earlier tokens above the adapter were computed
    under the old decision; the seed (no cache) recomputes every token each step. So the rows that
    switched get the whole sequence re-run with the new decision imposed (``fixed``), a fresh cache
    and the next token from it. Only taken (`lax.cond`) at a step where some row switched."""

    def redo(_):
        full = jnp.concatenate([s.prompt_tokens, jnp.maximum(out_tokens, 0)], axis=1)
        fixed = {layer: {name: dict(r, fixed=True) for name, r in rs.items()} for layer, rs in routes.items()}
        out = forward(params, cfg, full, attn_mask=mask, cache=cache, cache_index=0, prompt_len=s.prompt_len,
                      routes=fixed, return_logits=False)
        last = jax.lax.dynamic_slice_in_dim(out.hidden, slot, 1, axis=1)
        again = top_token(unembed(params, cfg, last)[:, -1])
        pick = lambda new, old: jnp.where(switched.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
        return jax.tree_util.tree_map(pick, out.cache, cache), pick(again, nxt)

    return jax.lax.cond(jnp.any(switched), redo, lambda _: (cache, nxt), None)


def _prefill_impl(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, cache: KVCache,
                  prompt_len: jax.Array, prefix: KVCache | None, start: int) -> tuple[KVCache, jax.Array, dict]:
    """The left-padded prompt batch in one forward: the filled cache, each row's first new token and
    the adapters' routes (empty without adapters). Logits at the last position only: over every
    prompt position the LM head would cost more than the whole stack (49k x 576 on the default model)
    and its [B, P, V] float32 output would not fit in cache.

    `tokens` go to slots ``[start, start + T)``, the prompt's last slots, with positions counted over
    the mask's real tokens. `prefix`: the keys / values ``[K, Pk]`` of a prefix every prompt shares
    (`_prefix_cache`, one row per stacked edit): they fill slots ``[0, Pk)`` of every row of their
    member, and `tokens` are then each row's rest -- so every token sees what it would have seen
    with the whole prompt in `tokens`."""
    if prefix is not None:
        cache = _fill_prefix(cache, prefix)
    positions = positions_from_mask(mask[:, :start + tokens.shape[1]])[:, start:]
    out = forward(params, cfg, tokens, attn_mask=mask, positions=positions, cache=cache, cache_index=start,
                  prompt_len=prompt_len, return_logits=False)
    logits = unembed(params, cfg, out.hidden[:, -1:])
    return out.cache, top_token(logits[:, -1]), out.routes


def _fill_prefix(cache: KVCache, prefix: KVCache) -> KVCache:
    """Slots ``[0, Pk)`` of every row of `cache` get the shared prefix's keys / values (`_prefix_cache`,
    ``[K, Pk]``: one row per stacked edit, its member's rows member-major, hence `repeat`, not `tile`)."""
    k = prefix.k[0].shape[0]

    def fill(full: jax.Array, part: jax.Array, axis: int) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(full, jnp.repeat(part, full.shape[0] // k, axis=0), 0, axis)

    return map_slots(fill, cache, prefix)


# The empty cache is donated: filled in place.
_prefill = jax.jit(_prefill_impl, static_argnums=(1, 7), donate_argnums=(4,))


@functools.partial(jax.jit, static_argnums=(1, 7), donate_argnums=(4,))
def _prefill_rows(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, cache: KVCache,
                  prompt_len: jax.Array, prefix: KVCache | None, start: int,
                  row0: jax.Array) -> tuple[KVCache, jax.Array]:
    """`_prefill` of the rows ``[row0, row0 + R)`` of the batch's cache only (R = len(tokens)): one
    block of `_prefill_blocks` (an edit stack's member on its own params), in its own bucket."""
    rows = tokens.shape[0]
    part = jax.tree_util.tree_map(lambda c: jax.lax.dynamic_slice_in_dim(c, row0, rows, 0), cache)
    part, nxt, _ = _prefill_impl(params, cfg, tokens, mask, part, prompt_len, prefix, start)
    return jax.tree_util.tree_map(lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x, row0, 0), cache, part), nxt


PREFILL_BLOCK = 32  # rows of a plain batch prefilled in one call when blocks pay (see `_prefill_blocks`)


def _prefill_blocks(rows: Sequence[Sequence[int]], slots: Sequence[int], batch: int, block: int, shared: int,
                    rest_slots: int) -> list[tuple[int, int]]:
    """How to prefill the batch: (first row, rest width) per call. Each prompt's rest (after a
    `shared` prefix) lies right-aligned in `rest_slots` columns; a call prefills only the last
    `width` of them (the columns before hold padding in every one of its rows), so the width is the
    bucket of its longest rest, not the layout's slots (a 24-token shared prefix and a 62-token rest
    made a 96-column rest where 64 hold every token). Blocks of `block` rows -- a plain batch's
    prompts come sorted by length, an edit stack's member-major, one member per block (its own
    params) -- each prefill in their own bucket where that pays (`split_pays`); else one call for
    the batch. 112 chat-template questions of QAEdit at batch 128: 4608 prefilled positions where
    one call took 12288 (8192 with the width of its longest rest)."""
    longest: dict[int, int] = {}
    for r, slot in zip(rows, slots):
        longest[slot // block] = max(longest.get(slot // block, 0), len(r) - shared)
    width = lambda n: min(bucket(n), rest_slots)  # noqa: E731
    blocks = [(j * block, width(n)) for j, n in sorted(longest.items())]
    whole = width(max(longest.values()))
    if len(blocks) > 1 and split_pays(_block_positions(blocks, block, batch), batch * whole):
        return blocks
    return [(0, whole)]


def _block_positions(blocks: Sequence[tuple[int, int]], block: int, batch: int) -> int:
    """Prompt positions the prefill `blocks` take (rows x width; one block is the whole batch, a
    plain batch's last block may be shorter than `block`)."""
    if len(blocks) == 1:
        return batch * blocks[0][1]
    return sum(min(block, batch - row0) * width for row0, width in blocks)


class _PackedPrompts(NamedTuple):
    """A batch's prompt rests packed into shared rows for one prefill (`_pack_prompts`)."""

    tokens: np.ndarray  # [K'*R, W] the rests, first fit by decreasing length; block j's R rows at j*R
    segments: np.ndarray  # [K'*R, W] the prompt each slot holds, -1 where empty
    positions: np.ndarray  # [K'*R, W] each token's position in its whole prompt (after the shared prefix)
    source: np.ndarray  # [B, rest slots] the packed slot (flat) of each cache slot's token; K'*R*W: none
    last: np.ndarray  # [B] the packed slot (flat) of each row's last prompt token
    # [K'] the edit-stack member each block of rows runs on (`tokens.member_blocks`); None: one block
    # per member in member order (and for plain params)
    members: np.ndarray | None = None


def _pack_prompts(rows: Sequence[Sequence[int]], slots: Sequence[int], batch: int, k: int, shared: int,
                  rest_slots: int, pad_id: int, unpacked: int, max_blocks: int = 1) -> _PackedPrompts | None:
    """The prompt rests (after a `shared` prefix) packed into rows of W = bucket(longest rest) slots,
    each member's (an edit stack's; rows `slots` // (batch / k)) into rows of its own, in blocks of R
    rows (`member_blocks`) -- or None where that does not save a quarter of the `unpacked` positions
    the prefill blocks would take (`split_pays`). `max_blocks`: the most blocks the stack's leaves may
    be repeated to (`_stack_blocks`).

    Why: a CPU prefill is compute-bound (~620 positions/s on the default model), and the blocks pad
    every rest to the longest of its block, up to a power of two: a WILD run's rests of ~20 tokens
    filled 8-row member blocks 32 or 64 wide, ~2.3x their tokens, in 16 calls per stack of 16."""
    per = batch // k
    rests = [len(r) - shared for r in rows]
    width = min(bucket(max(rests)), rest_slots)
    place, _ = first_fit_members(rests, [s // per for s in slots], k, width)
    counts = np.zeros(k, np.int64)
    for m, row, _ in place.values():
        counts[m] = max(counts[m], row + 1)
    r, members = member_blocks(counts, max_blocks)
    n_rows = k * r if members is None else len(members)
    if not split_pays(n_rows * width, unpacked):
        return None
    first_row = np.arange(k) * r if members is None else np.cumsum(counts) - counts  # each member's first row
    tokens, segments = np.full((n_rows, width), pad_id, np.int32), np.full((n_rows, width), -1, np.int32)
    positions = np.zeros((n_rows, width), np.int32)
    source, last = np.full((batch, rest_slots), n_rows * width, np.int32), np.zeros((batch,), np.int32)
    for i, (m, row, slot) in place.items():
        n, row = rests[i], first_row[m] + row
        tokens[row, slot:slot + n], segments[row, slot:slot + n] = rows[i][shared:], i
        positions[row, slot:slot + n] = shared + np.arange(n)
        source[slots[i], rest_slots - n:] = row * width + slot + np.arange(n)
        last[slots[i]] = row * width + slot + n - 1
    return _PackedPrompts(tokens, segments, positions, source, last, members)


REPEAT_BYTES = 1 << 30  # the most bytes of stacked leaves a packed prefill may repeat (`_stack_blocks`)


def _stack_blocks(params: Any) -> int:
    """The most blocks of rows a packed prefill may run an edit stack's members on (`member_blocks`):
    its size, or as many as `REPEAT_BYTES` of repeated leaves allow -- the default model's FT-M
    kernel (3.5 MB) hundreds, a 7B model's (90 MB in bf16) 11, so there the stack's own blocks."""
    if not isinstance(params, EditStack):
        return 1
    per_member = sum(leaf.nbytes for leaf in params.leaves) // params.size
    return max(params.size, REPEAT_BYTES // max(per_member, 1))


class _Bank(NamedTuple):
    """What a keeping prefill (`PromptStates`) computed below the kept layer at each slot of its
    packed rests, flat and token-major, on the device: ``N`` a power of two above the packed slots,
    so that its last rows are zeros ("no token", where `_PackedPrompts.source` says none)."""

    hidden: jax.Array  # [N, D] the hidden state entering the kept layer
    k: jax.Array  # [layer, N, H_kv, hd] keys of the layers below it
    v: jax.Array  # [layer, N, H_kv, hd] values


@dataclasses.dataclass
class PromptStates:
    """What an unedited model's prefill computed below `layer` for each prompt (its token ids): the
    keys / values of layers ``0..layer-1`` and the hidden state entering `layer`, at each token of
    the prompt's rest (after the batch's `shared` prefix) -- kept by one `generate_ids` call
    (``keep_states``) to prefill the same prompts on an edit stack from `layer` on.

    Why: a single-edit run asks every question twice, before the edit and after it, and an edit that
    changes only layers >= `layer` leaves the layers below computing what they computed before (FT-M
    on the default model: one MLP of layer 20 of 30, two thirds of every post-edit prefill). The
    states stay on the device, in the keeping prefill's packed layout (`_Bank`), and each prompt
    records where its tokens lie there: copied out per prompt and back in as whole rest slots, the
    default model's 112 QAEdit prompts moved ~0.4 GB a group through the host (~1.3 s of ~19)."""

    layer: int
    # prompt ids -> (shared prefix tokens, its bank in `banks`, the bank row of each token of its rest)
    rests: dict[tuple[int, ...], tuple[int, int, np.ndarray]] = dataclasses.field(default_factory=dict)
    banks: list[_Bank] = dataclasses.field(default_factory=list)
    # a shared prefix (its tokens and mask, `_shared_cache`) -> its cache and the hidden state entering `layer`
    prefixes: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[KVCache, jax.Array]] = dataclasses.field(
        default_factory=dict)
    # a teacher-forced row's ids (prompt + target, `evaluation.synthetic`) -> the hidden state entering
    # `layer` at each of its tokens: without a cache that is all the layers above need
    rows: dict[tuple[int, ...], np.ndarray] = dataclasses.field(default_factory=dict)

    def start_for(self, params: Any, cfg: ModelConfig) -> int:
        """The layer a pass on `params` may start from with these states: `layer` where an edit
        stack's members change nothing below it, else 0. Plain params are the caller's word: an
        edited pytree does not say what it changed."""
        lowest = stack.lowest_layer(params.paths, cfg.num_layers) if isinstance(params, EditStack) else cfg.num_layers
        return self.layer if self.layer <= lowest else 0

    def covers(self, rows: Sequence[Sequence[int]], shared: int) -> bool:
        """Whether every prompt was kept, with the same shared prefix (its rest then starts where it did)."""
        return all(self.rests.get(tuple(r), (-1,))[0] == shared for r in rows)


def _flat_rests(layer: jax.Array, axis: int, pk: int, size: int) -> jax.Array:
    """A packed prefill's cache layer (`axis` its slots, the first `pk` the prefix) as its rest slots
    one after the other, row by row ``[size, ...]`` -- `_PackedPrompts.source`'s numbering -- with
    zero rows after the last slot."""
    slots = jnp.moveaxis(layer, axis, 1)[:, pk:]
    flat = slots.reshape((-1,) + slots.shape[2:])
    return jnp.pad(flat, [(0, size - flat.shape[0])] + [(0, 0)] * (flat.ndim - 1))


def _scatter_rests(full: jax.Array, flat: jax.Array, source: jax.Array, pk: int, axis: int) -> jax.Array:
    """`full` (a batch cache layer) with the rest slots ``[pk, pk + R)`` of each row taken from the
    rows `source` ``[B, R]`` of `flat` (`_flat_rests`)."""
    return jax.lax.dynamic_update_slice_in_dim(full, jnp.moveaxis(flat[source], 1, axis), pk, axis)


@functools.partial(jax.jit, static_argnums=(1,), static_argnames=("start", "keep"), donate_argnums=(2,))
def _prefill_packed(params: Params, cfg: ModelConfig, cache: KVCache, packed: _PackedPrompts,
                    prefix: KVCache | None, prefix_mask: jax.Array | None, *, start: int = 0, keep: int = 0,
                    below: tuple[_Bank, jax.Array, jax.Array] | None = None
                    ) -> tuple[KVCache, jax.Array, _Bank | None]:
    """`_prefill` of a batch whose rests are packed (`_pack_prompts`): one forward over the packed
    rows (each token sees the member's shared prefix and the earlier tokens of its own prompt), then
    every rest's keys / values gathered into its row's slots of the batch's cache (the same layout as
    `_prefill`'s, so decoding is unchanged) and each row's first new token read at its last token.

    `start` > 0: the layers below it are not run; ``below`` = (a `_Bank` of `PromptStates`, the bank
    row of each packed slot ``[rows * W]``, of each of the cache's rest slots ``[B, R]``): the hidden
    state entering `start` and the keys / values under it. `keep` > 0: also return this prefill's
    `_Bank` below layer `keep` (plain params only), for `PromptStates`."""
    rows, width = packed.tokens.shape
    seg = packed.segments
    own = (seg[:, :, None] == seg[:, None, :]) | jnp.eye(width, dtype=bool)  # an empty slot sees itself
    run, run_prefix, run_mask = params, prefix, prefix_mask  # what the packed rows run on, block by block
    if packed.members is not None:  # blocks of rows, each on its member: stacked leaves and prefixes repeated
        take = lambda x: jnp.take(x, packed.members, axis=0)  # noqa: E731
        run = dataclasses.replace(params, leaves=tuple(map(take, params.leaves)))
        run_prefix, run_mask = jax.tree_util.tree_map(take, (prefix, prefix_mask))
    k, pk = (1, 0) if prefix_mask is None else run_mask.shape
    part = init_cache(cfg, rows, pk + width, cache.k[0].dtype)
    if prefix is not None:  # each packed row sees its member's prefix, then its own prompt's earlier tokens
        part = _fill_prefix(part, run_prefix)
        seen_prefix = jnp.repeat(run_mask.astype(bool), rows // k, axis=0)[:, None]
        own = jnp.concatenate([jnp.broadcast_to(seen_prefix, (rows, width, pk)), own], axis=-1)
    hidden_in = None
    if start:  # the layers below `start` as the unedited model left them
        bank, hidden_at, lower_at = below
        hidden_in = bank.hidden[hidden_at].reshape(rows, width, -1)
        cache = KVCache([_scatter_rests(c, bank.k[i], lower_at, pk, K_SLOT_AXIS) if i < start else c
                         for i, c in enumerate(cache.k)],
                        [_scatter_rests(c, bank.v[i], lower_at, pk, V_SLOT_AXIS) if i < start else c
                         for i, c in enumerate(cache.v)])
    out = forward(run, cfg, None if start else packed.tokens, hidden=hidden_in, start_layer=start, attn_mask=own,
                  positions=packed.positions, cache=part, cache_index=pk, return_logits=False,
                  reads=(("layer_in", keep),) if keep else ())
    slots = rows * width + 1  # + the "none" slot of `packed.source`: zeros
    size = bucket(slots, 1) if keep else slots  # a kept bank: a power of two, few post-edit prefill shapes
    flats = map_slots(lambda done, axis: _flat_rests(done, axis, pk, size), out.cache)
    new = map_slots(lambda full, flat, axis: _scatter_rests(full, flat, packed.source, pk, axis), cache, flats)
    new = KVCache(cache.k[:start] + new.k[start:], cache.v[:start] + new.v[start:])
    new = new if prefix is None else _fill_prefix(new, prefix)
    hidden = out.hidden.reshape(rows * width, -1)[packed.last]
    first = top_token(unembed(params, cfg, hidden[:, None])[:, -1])
    if not keep:
        return new, first, None
    held = jnp.pad(out.reads[("layer_in", keep)].reshape(rows * width, -1), ((0, size - rows * width), (0, 0)))
    return new, first, _Bank(held, jnp.stack(flats.k[:keep]), jnp.stack(flats.v[:keep]))


def _keep_states(states: PromptStates, rows: Sequence[Sequence[int]], slots: Sequence[int], shared: int,
                 packed: _PackedPrompts, bank: _Bank, rest_slots: int) -> None:
    """Each prompt's rest below `states.layer`, from a packed prefill on the unedited model: where
    its tokens lie in that prefill's `bank` (which stays on the device)."""
    states.banks.append(bank)
    for ids, row in zip(rows, slots):
        n = len(ids) - shared
        states.rests[tuple(ids)] = (shared, len(states.banks) - 1, packed.source[row, rest_slots - n:].copy())


def _states_below(states: PromptStates, rows: Sequence[Sequence[int]], slots: Sequence[int], shared: int,
                  packed: _PackedPrompts, batch: int, rest_slots: int) -> tuple[_Bank, np.ndarray, np.ndarray]:
    """`_prefill_packed`'s ``below`` for the prompts of a batch, from `states`: the bank (the kept
    banks its prompts come from, one after the other) and the bank row of each packed slot and of
    each row's rest slots (a zero row where no token is)."""
    used = sorted({states.rests[tuple(ids)][1] for ids in rows})
    banks = [states.banks[b] for b in used]
    sizes = [x.hidden.shape[0] for x in banks]
    offset = dict(zip(used, np.cumsum([0] + sizes[:-1]).tolist()))
    bank = banks[0] if len(banks) == 1 else _concat_banks(banks)
    none = sum(sizes) - 1  # the last bank's last row: zeros
    hidden_at = np.full(packed.tokens.size + 1, none, np.int32)  # + `packed.source`'s none slot, dropped
    lower_at = np.full((batch, rest_slots), none, np.int32)
    for ids, row in zip(rows, slots):
        _, b, at = states.rests[tuple(ids)]
        n = len(ids) - shared
        hidden_at[packed.source[row, rest_slots - n:]] = lower_at[row, rest_slots - n:] = at + offset[b]
    return bank, hidden_at[:-1], lower_at


@jax.jit
def _concat_banks(banks: Sequence[_Bank]) -> _Bank:
    """Banks one after the other (a batch whose prompts were kept by several prefills)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=-3 if xs[0].ndim == 4 else 0), *banks)


@functools.partial(jax.jit, static_argnums=(1,), static_argnames=("start", "keep"))
def _prefix_cache(params: Params, cfg: ModelConfig, prefix: jax.Array, mask: jax.Array, *, start: int = 0,
                  keep: int = 0, below: tuple[KVCache, jax.Array] | None = None) -> tuple[KVCache, jax.Array | None]:
    """Keys / values of a shared prompt prefix ``[K, Pk]`` (left-padded; `mask` its real slots), for
    `_prefill`: its own small program, one per prefix bucket, so that the prefill keeps its shapes.

    `keep` > 0: also the hidden state entering layer `keep` (``[1, Pk, D]``, plain params), for
    `PromptStates.prefixes`; `start` > 0: ``below`` = (such a prefix's cache, that hidden state) of
    the unedited model, its layers below `start` taken as they are and the ones above run from it on
    every member (an edit stack whose members change nothing below `start`)."""
    k, pk = prefix.shape
    cache = init_cache(cfg, k, pk, params_dtype(params))
    rows = lambda x: jnp.broadcast_to(x, (k,) + x.shape[1:])  # noqa: E731  (the kept prefix: one row, K members)
    hidden = None
    if start:
        kept, held = below
        hidden = rows(held)
    out = forward(params, cfg, None if start else prefix, hidden=hidden, start_layer=start, attn_mask=mask,
                  cache=cache, return_logits=False, reads=(("layer_in", keep),) if keep else ())
    new = out.cache
    if start:
        new = KVCache([rows(c) for c in kept.k[:start]] + new.k[start:],
                      [rows(c) for c in kept.v[:start]] + new.v[start:])
    return new, out.reads[("layer_in", keep)] if keep else None


def _shared_cache(params: Params, cfg: ModelConfig, prefix: np.ndarray, mask: np.ndarray,
                  states: PromptStates | None, keep_states: bool) -> KVCache:
    """`_prefix_cache` of a batch's shared prefix, kept in `states` (``keep_states``, the unedited
    model) or started from what they kept below their layer (an edit stack that changes nothing
    there: FT-M's post-edit prefix on the default model ran 30 layers on 16 members, ~0.6 s a group)."""
    args = params, cfg, jnp.asarray(prefix), jnp.asarray(mask)
    key = tuple(int(t) for t in prefix[0]), tuple(int(t) for t in mask[0])
    if states is not None and states.layer and keep_states and not isinstance(params, EditStack):
        cache, held = _prefix_cache(*args, keep=states.layer)
        states.prefixes[key] = cache, held
        return cache
    if states is not None and key in states.prefixes and states.start_for(params, cfg):
        return _prefix_cache(*args, start=states.layer, below=states.prefixes[key])[0]
    return _prefix_cache(*args)[0]


def _decode_impl(params: Params, cfg: ModelConfig, cache: KVCache, state: DecodeState, limit: jax.Array,
                 stop_ids: jax.Array, checks: jax.Array) -> tuple[KVCache, DecodeState]:
    """Greedy steps from `state.step` until step `limit`, until every row is done, or, after at
    least one step, until a running row has written a token of `checks` (``[V]`` bool: tokens a text
    stop can end on) in its last two steps: the host then checks its text (module docstring).

    `limit` is traced, not static, so the last (shorter) chunk of a batch reuses the same program.
    """
    start = state.step

    def check_due(s: DecodeState) -> jax.Array:
        def hit(col: jax.Array) -> jax.Array:  # [B]: the token in column `col` is one to check
            tok = jax.lax.dynamic_index_in_dim(s.out, jnp.maximum(col, 0), axis=1, keepdims=False)
            return (col >= 0) & (tok >= 0) & checks[jnp.clip(tok, 0, checks.shape[0] - 1)]

        return (s.step > start) & jnp.any(~s.done & (hit(s.step - 1) | hit(s.step - 2)))

    def cond(carry: tuple[KVCache, DecodeState]) -> jax.Array:
        _, s = carry
        return (s.step < limit) & ~jnp.all(s.done) & ~check_due(s)

    def body(carry: tuple[KVCache, DecodeState]) -> tuple[KVCache, DecodeState]:
        cache, s = carry
        tok = s.next_token
        out_tokens = s.out.at[:, s.step].set(jnp.where(s.done, -1, tok))
        done = s.done | jnp.isin(tok, stop_ids)
        slot = s.prompt_slots + s.step
        mask = jax.lax.dynamic_update_slice_in_dim(s.mask, jnp.ones((tok.shape[0], 1), jnp.int32), slot, 1)
        pos = (s.prompt_len + s.step)[:, None]
        out = forward(params, cfg, tok[:, None], attn_mask=mask, positions=pos, cache=cache, cache_index=slot,
                      prompt_len=s.prompt_len, routes=s.routes)
        nxt = top_token(out.logits[:, -1])
        new_cache, switched = out.cache, _switched(out.routes)
        if switched is not None:
            new_cache, nxt = _redo_switched(params, cfg, out.cache, s, out_tokens, mask, slot, out.routes, nxt,
                                            switched)
        return new_cache, s._replace(step=s.step + 1, next_token=nxt, out=out_tokens, done=done, mask=mask,
                                     routes=out.routes)

    return jax.lax.while_loop(cond, body, (cache, state))


# The cache is donated: a chunk updates it in place. Without donation every call copies the whole
# cache into the loop's carry first -- on a CPU ~0.3 s per GB, as much as a decode step at 128 rows
# x 160 slots (944 MB), paid at every host check (measured, BUILD_NOTES).
_decode = jax.jit(_decode_impl, static_argnums=(1,), donate_argnums=(2,))


def _first_stop(tokenizer, ids: list[int], stop_strings: Sequence[str], stop_fn: StopFn | None) -> int | None:
    """Smallest n such that the text of ids[:n] hits a stop string or the stop rule."""
    if not stop_strings and stop_fn is None:
        return None
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if not any(s in text for s in stop_strings) and not (stop_fn and stop_fn(text)):
        return None
    for n in range(1, len(ids) + 1):
        t = tokenizer.decode(ids[:n], skip_special_tokens=False)
        if any(s in t for s in stop_strings) or (stop_fn and stop_fn(t)):
            return n
    return None


def stop_chars_of(stop_strings: Sequence[str]) -> str:
    """The characters a stop string can end on: the token that completes it holds its last one."""
    return "".join(s[-1] for s in stop_strings if s)


def _check_table(token_texts: Sequence[str], chars: str, vocab_size: int) -> np.ndarray:
    """``[vocab_size]`` bool: the tokens whose text holds one of `chars` (`_decode_impl`'s early checks;
    ~17 ms over a 49k vocabulary)."""
    table = np.zeros(vocab_size, bool)
    if chars:
        table[:len(token_texts)] = [any(c in t for c in chars) for t in token_texts[:vocab_size]]
    return table


def encode_prompts(tokenizer, prompts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Tokenise; an empty prompt is an error naming its index (nothing to condition on)."""
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise GenerationError(f"prompt {i} is empty; give at least one character")
        ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise GenerationError(f"prompt {i} tokenises to nothing: {p!r}")
        out.append(list(ids))
    return out


MAX_BATCH = 128  # rows of a generation batch at most, when the caller names none (see `default_batch`)
KV_BUDGET = 4 * 1024**3  # bytes of one batch's KV cache at most, when the caller names no batch size


def default_batch(cfg: ModelConfig, dtype: Any, max_new_tokens: int, prompt_slots: int = 128) -> int:
    """Rows of a generation batch when the caller names none: `MAX_BATCH`, halved (down to 8) until
    the KV cache of `prompt_slots` + the new tokens' slots fits `KV_BUDGET`. Why as many as 128: a
    decode step of 128 rows costs less than four of 32 (the weights are read once per step, the
    one-token attention is cheap), on a CPU too: the default model's pre-edit pass of QAEdit 0-19
    (140 questions, chat_temp) decodes in 17.4 s at 128 vs 20.2-21.1 s at 32 (BUILD_NOTES). Why a
    budget: a 7B Llama-2 (no grouped KV heads) caches ~100 MB a row at 192 slots in bf16, 13 GB at
    128 rows beside its 13 GB of weights -- it gets 32 rows, what every model got before; the
    default model (~9 MB a row in float32) and Llama-3-8B (8 KV heads) get 128."""
    per_row = kv_cache_bytes(cfg, 1, prompt_slots + bucket(max_new_tokens, 16), dtype)
    rows = MAX_BATCH
    while rows > 8 and rows * per_row > KV_BUDGET:
        rows //= 2
    return rows


def generate_ids(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 50,
    stop_strings: Sequence[str] = (),
    stop_fn: StopFn | None = None,
    batch_size: int | None = None,
    chunk: int = 16,
    members: Sequence[int] | None = None,
    stop_chars: str = "",
    token_texts: Sequence[str] | None = None,
    states: PromptStates | None = None,
    keep_states: bool = False,
) -> list[Generation]:
    """Greedy-decode every prompt (token ids); results in input order.

    `chunk`: decode steps between two host-side stop checks (see the module docstring).
    `stop_chars`: characters that end a `stop_fn` stop (the last character of each stop string is
    added by itself); a token holding one brings the next check forward. `token_texts`: every token's
    text (`Model.token_texts`, decoded once per model), else the vocabulary is decoded here (~0.2 s).
    `members`: with an `EditStack` as params, the stacked edit each prompt is answered by; one
    batch then holds up to `batch_size` prompts of every member (ignored for plain params).
    `batch_size` None: `default_batch`. `states`: with `keep_states` (`params` then the unedited
    model), keep each prompt's rest below `states.layer` (`PromptStates`); else the prompts kept there
    are prefilled from that layer on -- the caller's word that `params` change nothing below it (an
    edit stack's own leaves are checked).
    """
    if max_new_tokens < 1:
        raise GenerationError("max_new_tokens must be >= 1")
    batch_size = batch_size or default_batch(cfg, params_dtype(params), max_new_tokens)
    stop_ids = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
    chars = stop_chars_of(stop_strings) + stop_chars
    if chars and token_texts is None:
        token_texts = vocab_texts(tokenizer, cfg.vocab_size)
    checks = jnp.asarray(_check_table(token_texts or (), chars, cfg.vocab_size))
    new_bucket = bucket(max_new_tokens, 16)  # one bucket for every batch of this call
    if isinstance(params, EditStack):
        rows_per = functools.partial(member_rows, k=params.size, sizes=decode_rows, alone=False)
        per, rounds = stack.layout(members, params.size, len(prompt_ids), batch_size, rows_per=rows_per)
        batches = [([i for i, _ in r], [slot for _, slot in r], params.size * per) for r in rounds]
    else:
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths together
        batches = [(order[s : s + batch_size], None, None) for s in range(0, len(order), batch_size)]
    results: list[Generation | None] = [None] * len(prompt_ids)
    for idx, slots, rows_in_batch in batches:
        gens = _generate_batch(params=params, cfg=cfg, tokenizer=tokenizer, rows=[list(prompt_ids[i]) for i in idx],
                               max_new=max_new_tokens, new_bucket=new_bucket, stop_ids=stop_ids, checks=checks,
                               stop_strings=stop_strings, stop_fn=stop_fn, batch_size=batch_size, chunk=chunk,
                               slots=slots, rows_in_batch=rows_in_batch, states=states, keep_states=keep_states)
        for i, g in zip(idx, gens):
            results[i] = g
    return results  # type: ignore[return-value]


def _left_padded(rows: Sequence[Sequence[int]], slots: Sequence[int], *, batch: int, prompt_slots: int,
                 new_slots: int, pad_id: int, shared: int = 0, shared_slots: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens `[batch, prompt_slots]` right-aligned (every row's next token goes to the same
    slot), row i at batch row `slots[i]`, and the key mask `[batch, prompt_slots + new_slots]` over
    the whole cache. With a `shared` prefix (the first tokens of every row) it goes right-aligned in
    slots ``[0, shared_slots)`` of every row, filler rows included, and each row's rest after it."""
    tokens = np.full((batch, prompt_slots), pad_id, np.int32)
    mask = np.zeros((batch, prompt_slots + new_slots), np.int32)
    mask[:, prompt_slots - 1] = 1  # filler rows: one visible token keeps softmax finite
    if shared:
        tokens[:, shared_slots - shared:shared_slots] = rows[0][:shared]
        mask[:, shared_slots - shared:shared_slots] = 1
    for r, ids in zip(slots, rows):
        rest = ids[shared:]
        tokens[r, prompt_slots - len(rest):] = rest
        mask[r, prompt_slots - len(rest):prompt_slots] = 1
    return tokens, mask


MIN_SHARED_PREFIX = 8  # fewer common tokens are not worth a second prefill program (see `_shared_prefix`)


def _shared_prefix(params: Any, cfg: ModelConfig, rows: Sequence[Sequence[int]], batch: int, members: int,
                   new_slots: int, packs: bool = True) -> int:
    """How many leading tokens every prompt of the batch shares and `_prefix_cache` should run once
    (0: prefill as usual). Worth it when it cuts the prefilled positions (``members`` prefix rows +
    the rests vs ``batch`` whole prompts in their bucket) and the prefix has at least
    `MIN_SHARED_PREFIX` tokens. Where the batch may be packed (`packs`: not on a mesh) the rests
    count as about their first-fit rows (`_pack_prompts` packs them where that pays), else as
    ``batch`` rows of the layout's rest slots. Counted that way everywhere, a QAEdit batch whose
    longest chat-template prompt fit 64 slots (a 32-slot prefix bucket + rests of up to 33 tokens
    makes 128) prefilled 128 x 64 whole prompts unpacked: 12.3 s where sharing prefills ~40 packed
    rows of 64 (~3.6 s). At least one token of each prompt stays in its rest: the prefill
    picks the first new token at the last one. Not with MLP adapters (their routing looks at the
    last prompt token of the call), nor where a sliding window could bind (it counts cache slots,
    and the padding between a prefix and a shorter rest would widen the gaps)."""
    lengths = [len(r) for r in rows]
    common = min(lengths) - 1
    first = rows[0]
    for r in rows[1:]:
        common = next((i for i in range(common) if r[i] != first[i]), common)
    if common < MIN_SHARED_PREFIX:
        return 0
    longest = max(lengths)
    prompt_slots = bucket(bucket(common) + longest - common)  # `_generate_batch`'s layout
    rest_slots = prompt_slots - bucket(common)
    rests = batch * rest_slots
    if packs:
        width = min(bucket(longest - common), rest_slots)  # a packed row, as `_pack_prompts` makes it
        rests = min(batch * width, first_fit([n - common for n in lengths], width)[1] * width)
    if members * bucket(common) + rests >= batch * bucket(longest):
        return 0
    if cfg.sliding_window is not None and cfg.sliding_window < prompt_slots + new_slots:
        return 0
    return 0 if has_adapters(stack.structure(params)) else common


def _text_stops(tokenizer: Any, out: np.ndarray, step: int, stopped: Sequence[int | None],
                stop_strings: Sequence[str], stop_fn: StopFn | None) -> list[int | None]:
    """Per row, how many generated tokens to keep once a stop string / the stop rule has fired on
    its decoded text, None while none has. A row keeps its first hit."""
    return [hit if hit is not None else _first_stop(tokenizer, [int(t) for t in row[:step] if t >= 0],
                                                    stop_strings, stop_fn)
            for hit, row in zip(stopped, out)]


def _generation(tokenizer: Any, row: np.ndarray, stopped: int | None, eos: set[int]) -> Generation:
    """One row of `DecodeState.out` (already cut to `max_new` columns) as a `Generation`."""
    ids = [int(t) for t in row if t >= 0]
    if stopped is not None:
        ids, why = ids[:stopped], "stop"
    elif ids and ids[-1] in eos:
        why = "eos"
    else:
        why = "length"
    return Generation(tuple(ids), tokenizer.decode(ids, skip_special_tokens=True),
                      tokenizer.decode(ids, skip_special_tokens=False), why)


def _generate_batch(
    *,
    params: Params,
    cfg: ModelConfig,
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    max_new: int,
    new_bucket: int,
    stop_ids: jax.Array,
    checks: jax.Array,
    stop_strings: Sequence[str],
    stop_fn: StopFn | None,
    batch_size: int,
    chunk: int,
    slots: Sequence[int] | None = None,
    rows_in_batch: int | None = None,
    states: PromptStates | None = None,
    keep_states: bool = False,
) -> list[Generation]:
    """Greedy-decode one batch of at most `batch_size` prompts (token ids): prefill, then the
    decode loop in chunks of `chunk` steps with the host's stop checks in between. `slots` /
    `rows_in_batch`: where each prompt goes in a batch of that many rows (an `EditStack`'s
    member-major layout); by default rows 0..n-1 of a bucketed batch."""
    n = len(rows)
    longest = max(len(r) for r in rows)
    # RoPE models extrapolate past their trained context (badly, but it is the user's call); a
    # learned position table simply has no rows there.
    if cfg.learned_positions and longest + max_new > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt of {longest} tokens + {max_new} new exceeds the model's {cfg.max_position_embeddings} positions"
        )
    mesh = sharding.mesh_of(params)
    if rows_in_batch is None:
        if mesh is None:  # a short last batch is not padded to batch_size
            b = decode_rows(n)
        else:  # at least one row per batch shard; powers of two split evenly
            b = max(min(bucket(n, 1), bucket(batch_size, 1)), sharding.batch_axis_size(mesh))
    elif mesh is None:
        b = rows_in_batch
    else:
        raise GenerationError("an edit stack runs without a device mesh; evaluate the edits one by one")
    k = params.size if isinstance(params, EditStack) else 1
    shared = _shared_prefix(params, cfg, rows, b, k, new_bucket, packs=mesh is None)  # (`_pack_prompts` below)
    # prompt slots: a power of two >= 16 (the prefill and decode programs are those of unshared prompts)
    pk = bucket(shared) if shared else 0
    p = bucket(pk + longest - shared)
    slots = list(range(n)) if slots is None else list(slots)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, mask = _left_padded(rows, slots, batch=b, prompt_slots=p, new_slots=new_bucket, pad_id=pad,
                                shared=shared, shared_slots=pk)
    # the shared prefix [K, Pk] and its mask ([K, 0] without one), and what every row prefills itself
    prefix, prefix_mask, tokens = np.repeat(tokens[:1, :pk], k, 0), np.repeat(mask[:1, :pk], k, 0), tokens[:, pk:]
    cache = init_cache(cfg, b, p + new_bucket, params_dtype(params))
    if mesh is not None:  # rows split like the batch axes, the cache also on KV heads; the loop keeps the layout
        rows_on = sharding.batch_sharding(mesh, 2, b)
        tokens, mask = jax.device_put(tokens, rows_on), jax.device_put(mask, rows_on)
        cache = jax.device_put(cache, sharding.cache_sharding(mesh, cfg, b))
    prompt_len = jnp.asarray(mask[:, :p].sum(-1).astype(np.int32))
    prefix_kv = _shared_cache(params, cfg, prefix, prefix_mask, states, keep_states) if shared else None
    # blocks of rows, each in its own bucket: not on a mesh (rows split across devices), nor with
    # adapters (their routing looks at the whole call's last prompt token)
    by = b // k if k > 1 else PREFILL_BLOCK  # a plain batch's last block may be shorter (112 rows: 3 x 32 + 16)
    plain = mesh is not None or has_adapters(stack.structure(params))
    blocks = [(0, p - pk)] if plain else _prefill_blocks(rows, slots, b, by, shared, p - pk)
    packed = None if plain else _pack_prompts(rows, slots, b, k, shared, p - pk, pad,
                                              _block_positions(blocks, by, b),
                                              _stack_blocks(params))
    if packed is not None:  # every rest packed with others into shared rows: one call
        routes = {}
        args = (params, cfg, cache, jax.tree_util.tree_map(jnp.asarray, packed), prefix_kv,
                jnp.asarray(prefix_mask) if shared else None)
        if states is not None and states.layer and keep_states:
            cache, nxt, bank = _prefill_packed(*args, keep=states.layer)
            _keep_states(states, rows, slots, shared, packed, bank, p - pk)
        elif states is not None and states.start_for(params, cfg) and states.covers(rows, shared):
            bank, hidden_at, lower_at = _states_below(states, rows, slots, shared, packed, b, p - pk)
            cache, nxt, _ = _prefill_packed(*args, start=states.layer,
                                            below=(bank, jnp.asarray(hidden_at), jnp.asarray(lower_at)))
        else:
            cache, nxt, _ = _prefill_packed(*args)
    elif len(blocks) == 1:
        width = blocks[0][1]
        cache, nxt, routes = _prefill(params, cfg, jnp.asarray(tokens[:, -width:]), jnp.asarray(mask), cache,
                                      prompt_len, prefix_kv, p - width)
    else:  # each block on its params (a stack member's own), its rest in its own bucket
        nxt, routes = jnp.zeros((b,), jnp.int32), {}
        for row0, width in blocks:
            m, rows_m = row0 // by if k > 1 else 0, slice(row0, min(row0 + by, b))
            part = None if prefix_kv is None else jax.tree_util.tree_map(lambda x: x[m : m + 1], prefix_kv)  # noqa: B023
            cache, first = _prefill_rows(params.member(m) if k > 1 else params, cfg,
                                         jnp.asarray(tokens[rows_m, -width:]), jnp.asarray(mask[rows_m]), cache,
                                         prompt_len[rows_m], part, p - width, jnp.int32(row0))
            nxt = nxt.at[rows_m].set(first)
    state = DecodeState(step=jnp.int32(0), next_token=nxt, out=jnp.full((b, new_bucket), -1, jnp.int32),
                        done=jnp.asarray(~np.isin(np.arange(b), slots)), mask=jnp.asarray(mask),
                        prompt_len=prompt_len, prompt_slots=jnp.int32(p), routes=routes,
                        prompt_tokens=jnp.asarray(tokens)[:, :p] if _switched(routes) is not None else None)
    stopped: list[int | None] = [None] * n  # per prompt: kept tokens once a stop string / rule fired
    row_of = np.asarray(slots)  # per prompt: its row in the batch, -1 once retired by a compaction
    outs: list[np.ndarray | None] = [None] * n  # per prompt: its generated ids, kept when it is retired
    step = 0
    slots_most, slot_rows = _stack_blocks(params), _slot_rows(params)  # what compactions may fill, and its cost
    while step < max_new:
        cache, state = _decode(params, cfg, cache, state, jnp.int32(min(step + chunk, max_new)), stop_ids,
                               checks)
        # Host side: the only values fetched per chunk are `step`, `done` and, to check text stops, `out`.
        step = int(state.step)
        done = distributed.fetch(state.done).copy()  # rows split across processes are gathered first
        out = None
        if stop_strings or stop_fn:
            out = distributed.fetch(state.out)
            here = np.nonzero(row_of >= 0)[0]
            hits = _text_stops(tokenizer, out[row_of[here]], step, [stopped[i] for i in here], stop_strings, stop_fn)
            for i, hit in zip(here, hits):
                stopped[i] = hit
                done[row_of[i]] |= hit is not None
        state = state._replace(done=jnp.asarray(done))
        if done.all():
            break
        plan = None if mesh is not None else _compaction(  # done rows would keep costing a full step
            done, params.size if isinstance(params, EditStack) else 1, max_new - step, slots_most, slot_rows)
        if plan is not None:
            out = distributed.fetch(state.out) if out is None else out
            for i in np.nonzero(row_of >= 0)[0]:
                if done[row_of[i]]:
                    outs[i], row_of[i] = out[row_of[i]], -1
            params, cache, state, row_of = _compact(params, cache, state, row_of, plan)
    out = distributed.fetch(state.out)
    for i in np.nonzero(row_of >= 0)[0]:
        outs[i] = out[row_of[i]]
    eos = set(cfg.eos_token_ids)
    return [_generation(tokenizer, row[:max_new], hit, eos) for row, hit in zip(outs, stopped)]


MIN_COMPACT_ROWS = 8  # the smallest batch a compaction makes (see `_compaction`)
# The least a compaction must save, in rows x steps left: gathering the cache costs about a step, a
# new batch size one more program. 128 -> 64 rows with 16 steps left saves ~2 s on a CPU.
MIN_SAVED_ROW_STEPS = 256


class _Plan(NamedTuple):
    rows: np.ndarray  # [new batch] the old row each new row comes from (filler rows: any row of their member)
    members: np.ndarray  # [new K] the old stack member each new member comes from (filler members repeat one)
    done: np.ndarray  # [new batch] bool: filler rows


def _compaction(done: np.ndarray, k: int, steps_left: int, max_slots: int | None = None,
                slot_rows: float = 0.0) -> _Plan | None:
    """A batch for the rows still running, when it has fewer rows and the rows it drops would have
    cost at least `MIN_SAVED_ROW_STEPS` over the steps left: most answers end well before the
    longest (on the default model under chat_temp ~27 of 50 tokens), and every done row would
    otherwise cost a full forward per step. Batch and member counts step down half octaves (`ladder`:
    ..., 128, 96, 64, 48, 32, 24, ...), so a few programs serve every compaction: with powers of two
    a batch of 112 kept every row until 64 ran (QAEdit's pre-edit pass of 16 samples: 4160 row-steps
    where 3051 ran, now 3584). A batch never shrinks below `MIN_COMPACT_ROWS`: every new
    batch size is one more compiled decode loop (~2 s on a CPU), which a per-sample WILD batch of ~7
    rows never earned back in a 20-sample run (11 decode programs where 4 served before compaction),
    while under ~8 rows a step on a GPU / TPU is bound by reading the weights, not by the rows.

    With an edit stack (`k` members, rows member-major) the members without running rows go, and a
    member with more running rows than the new rows per member is split over several member slots
    (its stacked leaves repeated, at most `max_slots` slots -- `_stack_blocks`, by default the
    stack's bucket; `_compact_shape`). Without the split one member with 5 running rows kept 8 rows
    for every member: a stack of 16 members x 8 rows ran all 50 steps at 128 rows with 10 of them
    running at the end (QAEdit, FT-M); with the slots capped at the stack's 16 it kept 128 rows
    until each member had at most 4 running (QAEdit, FT-M: step 32 of 50, 39 running), where more
    slots held them in 64 rows from step 24 (63 running)."""
    per = len(done) // k
    counts = (~done).reshape(k, per).sum(1)
    max_slots = bucket(k, 1) if max_slots is None else max(bucket(k, 1), max_slots)
    new_k, new_per = _compact_shape(counts, per, min(len(done), MIN_COMPACT_ROWS), max_slots, slot_rows)
    rows_new = new_k * new_per
    saved = len(done) - rows_new - (new_k - k) * slot_rows  # a step's rows, slots counted as rows
    if rows_new >= len(done) or saved * steps_left < MIN_SAVED_ROW_STEPS:
        return None
    parts = []  # per new member slot: (its member, the running rows it holds)
    for m in np.nonzero(counts)[0]:
        live = np.nonzero(~done[m * per : (m + 1) * per])[0] + m * per
        parts += [(m, live[s : s + new_per]) for s in range(0, len(live), new_per)]
    members = np.array([m for m, _ in parts] + [parts[0][0]] * (new_k - len(parts)))  # filler: the first again
    rows = np.repeat(members * per, new_per)  # filler rows: their member's first row
    new_done = np.ones(rows_new, bool)
    for j, (_, live) in enumerate(parts):
        rows[j * new_per : j * new_per + len(live)] = live
        new_done[j * new_per : j * new_per + len(live)] = False
    return _Plan(rows, members, new_done)


def _compact_shape(counts: np.ndarray, per: int, floor: int, max_slots: int,
                   slot_rows: float = 0.0) -> tuple[int, int]:
    """(members, rows per member) of the fewest rows, at least `floor`, that hold `counts[m]` running
    rows of each member m -- each member slot counted as `slot_rows` rows more (its stacked leaves
    copied by the compaction and read every step, `_slot_rows`) -- rows per member a power of two,
    member slots a half octave (`ladder`), at most `max_slots` of them; of equal costs the one with
    more rows per member (fewer copies of stacked leaves)."""
    if len(counts) == 1:  # plain params: one block of rows
        return 1, max(ladder(int(counts[0]), 2), floor)
    shapes = []
    for q in (1 << i for i in range(per.bit_length())):  # rows per member: the powers of two <= per
        k = max(ladder(sum(-(-int(c) // q) for c in counts), 2), -(-floor // q))  # filler members to the floor
        if k <= max_slots:
            shapes.append((k * q + k * slot_rows, -q, k))
    _, neg_q, k = min(shapes)
    return k, -neg_q


SLOT_BYTES_PER_ROW = 14 << 20  # stacked-leaf bytes of a member slot that cost a compaction one row (`_slot_rows`)


def _slot_rows(params: Any) -> float:
    """What one member slot of an edit stack costs a compaction, in decode rows: its stacked leaves
    are copied when the compaction gathers them and read at every later step. Counted as one row
    per `SLOT_BYTES_PER_ROW`: the default model's FT-M kernel (3.5 MB) a quarter row, measured where
    a compaction of 16 members x 7 rows to 96 slots of one row gathered for ~1 s (its 340 MB of
    kernels; the rows alone ~0.04 s) to save 16 rows (~35 ms a step). Rank-one leaves cost ~nothing."""
    if not isinstance(params, EditStack):
        return 0.0
    return sum(leaf.nbytes for leaf in params.leaves) / params.size / SLOT_BYTES_PER_ROW


def _compact(params: Any, cache: KVCache, state: DecodeState, row_of: np.ndarray,
             plan: _Plan) -> tuple[Any, KVCache, DecodeState, np.ndarray]:
    """Everything with a row axis (the cache, the state's per-row fields) gathered to `plan`, an edit
    stack's leaves to its members, and the prompts' rows renumbered (retired prompts stay -1)."""
    rows = (cache, state.next_token, state.out, state.mask, state.prompt_len, state.routes, state.prompt_tokens)
    leaves = params.leaves if isinstance(params, EditStack) else ()
    rows, leaves = _gather(rows, jnp.asarray(plan.rows), leaves, jnp.asarray(plan.members))
    cache, next_token, out, mask, prompt_len, routes, prompt_tokens = rows
    state = state._replace(next_token=next_token, out=out, done=jnp.asarray(plan.done), mask=mask,
                           prompt_len=prompt_len, routes=routes, prompt_tokens=prompt_tokens)
    if isinstance(params, EditStack):
        params = dataclasses.replace(params, leaves=leaves)
    new_row = {int(old): r for r, old in enumerate(plan.rows) if not plan.done[r]}
    return params, cache, state, np.asarray([new_row[r] if r >= 0 else -1 for r in row_of])


@jax.jit
def _gather(rows: Any, src: jax.Array, leaves: Any, members: jax.Array) -> tuple[Any, Any]:
    """`rows`' arrays at rows `src`, `leaves`' at `members`, in one program: gathered leaf by leaf
    in eager mode, a compaction was ~70 dispatches, each a small program compiled per shape and per
    process (too quick to compile for the persistent cache: ~1.3 s of a warm main job)."""
    take = lambda index: lambda x: jnp.take(x, index, axis=0)  # noqa: E731
    return jax.tree_util.tree_map(take(src), rows), jax.tree_util.tree_map(take(members), leaves)


def generate(
    model: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 50,
    stop_strings: Sequence[str] = (),
    stop_fn: StopFn | None = None,
    add_special_tokens: bool = True,
    batch_size: int | None = None,
    chunk: int = 16,
) -> list[Generation]:
    """Greedy continuation of each prompt string with a loaded `Model` (`batch_size` None:
    `default_batch`)."""
    ids = encode_prompts(model.tokenizer, prompts, add_special_tokens)
    return generate_ids(model.params, model.cfg, model.tokenizer, ids, max_new_tokens=max_new_tokens,
                        stop_strings=stop_strings, stop_fn=stop_fn, batch_size=batch_size, chunk=chunk)


def chat_prompt(tokenizer: Any, question: str) -> str:
    """One user turn in the tokenizer's own chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("this tokenizer has no chat template; drop --chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)


def check_cli_args(prompt: str | None, max_new_tokens: int) -> None:
    """The command line's own input, checked before the model loads (seconds, not a traceback later)."""
    if not prompt:
        raise GenerationError("--prompt is empty; give the text to continue (or the question, with --chat)")
    if max_new_tokens < 1:
        raise GenerationError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")


def main(argv: Sequence[str]) -> None:
    from mirage_jax.cli import load_model_from_flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    check_cli_args(f.prompt, f.max_new_tokens)
    model = load_model_from_flags()
    prompt = f.prompt
    add_special = True
    if f.chat:
        prompt = chat_prompt(model.tokenizer, prompt)
        add_special = False  # the template already carries its own special tokens
    [g] = generate(model, [prompt], max_new_tokens=f.max_new_tokens, add_special_tokens=add_special)
    print(g.text)


def _flags() -> None:
    from mirage_jax import cli

    cli.define_model_flags(compile_cache=cli.USER_COMPILE_CACHE)
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_string("prompt", None, "text to continue", required=True)
    flags.DEFINE_integer("max_new_tokens", 50, "number of tokens to generate at most")
    flags.DEFINE_bool("chat", False, "wrap the prompt in the model's chat template as one user turn")


if __name__ == "__main__":
    import sys

    from absl import app

    _flags()
    try:
        app.run(main)
    except ValueError as err:  # bad input (GenerationError, CheckpointError, ...): one line, like launch.py
        sys.exit(f"error: {err}")
