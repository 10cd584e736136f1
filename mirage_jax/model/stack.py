"""Many single edits of one model, evaluated in one batched pass.

Why: the paper's protocol is single editing -- every sample is evaluated on its own edited model --
and a sample has only a handful of questions, so evaluating edits one by one runs the generation
loop at batch ~4-8, far below what the hardware does in the same time. But the K edited models
differ from the original in a few leaves (a down-projection kernel for ROME / FT-M, a few for
MEMIT / MEND, an adapter for GRACE / WISE). An `EditStack` holds the original pytree once and only
those leaves stacked on a leading K axis; `transformer.forward` / `unembed` given a stack run
member k's rows on `original + member k's leaves` (`per_member`: a `jax.vmap` over K inside one
forward, the shared leaves unbatched, so one matmul over all K x B rows reads each shared weight
once). Rows are laid out member-major, the same number per member (`layout`). Everything around
the forward -- the jitted decode loop, its early exit, the host's stop checks, a WISE route switch
-- is unchanged and sees one batch of K x B rows: the loop's control flow stays outside the vmap,
so no `lax.cond` turns into a both-branches `select`.

Its answers are those of one-by-one evaluation up to float rounding, not bit for bit: XLA's CPU
matmul sums a row in an order that depends on the row count (a row of ``x @ W`` on the default
model's shapes differs by up to 6e-5 between 1, 2-32 and >= 64 rows), as a plain batch's answers depend on
its size; a near-tie token can go either way (one answer of 896 did in a 128-sample FT-M run).

Members must change the same leaves with the same shapes (`signature`); `group` sorts a set of
edits into such groups, `stacks` also builds their stacks. A stack needs every leaf on one device
set without a multi-device sharding: the runner evaluates one by one on a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.model.diff import PathSteps, changed_leaves, path_steps, set_leaf
from mirage_jax.tokens import bucket

Signature = tuple[tuple[PathSteps, tuple[int, ...], str], ...]


@dataclasses.dataclass(frozen=True)
class EditStack:
    """`base` (the unedited params, shared) and, per changed leaf, its K members' values ``[K, ...]``.

    A pytree: `base` and `leaves` are traced, `paths` is static, so a jitted function compiles once
    per set of changed leaves and K, whatever their values."""

    base: Any
    leaves: tuple[jax.Array, ...]
    paths: tuple[PathSteps, ...]

    @property
    def size(self) -> int:
        return int(self.leaves[0].shape[0])

    def params_of(self, member_leaves: Sequence[jax.Array]) -> Any:
        """The full pytree of one member, given its own leaves (one slice of each of `leaves`)."""
        params = self.base
        for steps, leaf in zip(self.paths, member_leaves):
            params = set_leaf(params, steps, leaf)
        return params

    def member(self, k: int) -> Any:
        return self.params_of([leaf[k] for leaf in self.leaves])


jax.tree_util.register_dataclass(EditStack, data_fields=["base", "leaves"], meta_fields=["paths"])


def lowest_layer(paths: Iterable[PathSteps], num_layers: int) -> int:
    """The lowest decoder layer that changed leaves (`paths`) touch: the layers below it compute what
    the unedited model computes (an embedding counts as layer 0; the final norm and the LM head as
    `num_layers`, past every layer)."""
    def layer(steps: PathSteps) -> int:
        if steps[0] == ("k", "layers"):
            return int(steps[1][1])
        return 0 if steps[0] in (("k", "embed"), ("k", "pos_embed")) else num_layers

    return min((layer(steps) for steps in paths), default=num_layers)


def structure(params: Any) -> Any:
    """A pytree of the model's structure: `params` itself, or for an `EditStack` one holding its
    stacked leaves (which adapters it has, say, whatever the members' values)."""
    return params.params_of(params.leaves) if isinstance(params, EditStack) else params


def mlp_stacks(st: EditStack) -> dict[int, EditStack] | None:
    """Per layer with stacked leaves, an `EditStack` of that layer's ``mlp`` subtree -- when every
    stacked leaf lies under some layer's ``mlp`` (FT, ROME, MEMIT, GRACE, WISE edits); else None.

    Why: then only those MLPs need running per member. A vmap of the whole forward over the members
    also vmaps the attention and its KV cache, and XLA's CPU backend copies the whole member-split
    cache several times per layer and step for it (a decode step at 128 rows x 192 slots: 800 ms
    stacked vs 350 ms plain, measured); the attention is the same for every member anyway."""
    by_layer: dict[int, list[tuple[PathSteps, jax.Array]]] = {}
    for steps, leaf in zip(st.paths, st.leaves):
        if len(steps) < 4 or steps[0] != ("k", "layers") or steps[2] != ("k", "mlp"):
            return None
        by_layer.setdefault(int(steps[1][1]), []).append((steps[3:], leaf))
    return {layer: EditStack(st.base["layers"][layer]["mlp"], tuple(x for _, x in items), tuple(p for p, _ in items))
            for layer, items in by_layer.items()}


def signature(base: Any, params: Any) -> Signature:
    """Which leaves `params` changed or added relative to `base`, with their shapes and dtypes:
    edits with equal signatures can share a stack."""
    return _signature(changed_leaves(base, params))


def _signature(changed: dict[tuple, Any]) -> Signature:
    return tuple((path_steps(p), tuple(jnp.shape(leaf)), jnp.result_type(leaf).name) for p, leaf in changed.items())


def group(base: Any, edited: Sequence[Any], max_bytes: int | None = None) -> list[list[int]]:
    """Indices of `edited` in groups of equal `signature`, in first-seen order; with `max_bytes`, a
    group whose stacked leaves would take more is split (a stack costs K x the changed leaves, and
    the K edited pytrees hold as much again: MEMIT's five 7B kernels are 0.45 GB a member). A single
    edit is its own group: no leaf is compared."""
    if len(edited) < 2:
        return [[i] for i in range(len(edited))]
    return [idx for idx, _ in _split([signature(base, p) for p in edited], max_bytes)]


def stacks(base: Any, edited: Sequence[Any], max_bytes: int | None = None,
           max_members: int | None = None) -> list[tuple[list[int], Any]]:
    """`group`'s groups, each with the pytree that evaluates it: the edited params of a lone member,
    else its `EditStack` (or `base` where no member changed anything). Every member's leaves are
    compared with the original once, for its signature and its stacked leaves together. A group
    holds at most `max_members` edits and `max_bytes` of stacked leaves."""
    if len(edited) < 2 or max_members == 1:
        return [([i], p) for i, p in enumerate(edited)]
    flat = [changed_leaves(base, p) for p in edited]
    return [(idx, edited[idx[0]] if len(idx) == 1 else _stack(base, [flat[i] for i in idx], sig))
            for idx, sig in _split([_signature(f) for f in flat], max_bytes, max_members)]


def _split(sigs: Sequence[Signature], max_bytes: int | None,
           max_members: int | None = None) -> list[tuple[list[int], Signature]]:
    """Indices grouped by equal signature (first-seen order), each group cut to `max_bytes` of stacked
    leaves and `max_members` members."""
    groups: dict[Signature, list[int]] = {}
    for i, sig in enumerate(sigs):
        groups.setdefault(sig, []).append(i)
    out = []
    for sig, members in groups.items():
        each = sum(int(np.prod(shape)) * np.dtype(jnp.dtype(dtype)).itemsize for _, shape, dtype in sig)
        k = len(members) if max_bytes is None or each == 0 else max(1, max_bytes // each)
        k = k if max_members is None else min(k, max_members)
        out += [(members[s : s + k], sig) for s in range(0, len(members), k)]
    return out


def nbytes(tree: Any) -> int:
    """Bytes of the arrays in `tree`."""
    return sum(int(np.prod(np.shape(x))) * jnp.result_type(x).itemsize for x in jax.tree_util.tree_leaves(tree))


def build(base: Any, edited: Sequence[Any]) -> Any:
    """One pytree for evaluating every member of `edited` (equal signatures): an `EditStack`, or
    `base` itself when no member changed anything (then every member *is* the original model)."""
    if not edited:
        raise ValueError("an edit stack needs at least one edited pytree")
    flat = [changed_leaves(base, p) for p in edited]
    sigs = {_signature(f) for f in flat}
    if len(sigs) != 1:
        raise ValueError("the edits of one stack must change the same leaves with the same shapes; use group()")
    return _stack(base, flat, sigs.pop())


def _stack(base: Any, flat: Sequence[dict[tuple, Any]], sig: Signature) -> Any:
    if not sig:
        return base
    keys = list(flat[0])
    return EditStack(base, tuple(jnp.stack([f[k] for f in flat]) for k in keys), tuple(s[0] for s in sig))


def per_member(fn: Callable[..., Any], stack: EditStack, batched: dict[str, Any], **shared: Any) -> Any:
    """``fn(member params, **batched, **shared)`` for every member at once.

    Every array in `batched` has ``K x B`` rows, member-major; the outputs come back the same way.
    Non-array leaves of `batched` (None, a Python flag in a route) are passed to every member as they
    are, like `shared`."""
    k = stack.size
    leaves, treedef = jax.tree_util.tree_flatten(batched)
    is_rows = [isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) >= 1 for x in leaves]
    rows = []
    for x, r in zip(leaves, is_rows):
        if r:
            if x.shape[0] % k:
                raise ValueError(f"{x.shape[0]} rows cannot be split over {k} stacked edits")
            rows.append(jnp.reshape(x, (k, x.shape[0] // k) + tuple(x.shape[1:])))

    def one(member_leaves, member_rows):
        it = iter(member_rows)
        args = jax.tree_util.tree_unflatten(treedef, [next(it) if r else x for x, r in zip(leaves, is_rows)])
        return fn(stack.params_of(member_leaves), **args, **shared)

    out = jax.vmap(one)(stack.leaves, rows)
    return jax.tree_util.tree_map(lambda x: jnp.reshape(x, (-1,) + tuple(x.shape[2:])), out)


def layout(members: Sequence[int] | None, n_members: int, n_items: int, per_cap: int,
           rows_per: Callable[[int], int] | None = None) -> tuple[int, list[list[tuple[int, int]]]]:
    """Where each item goes in member-major batches: ``(rows per member, rounds)``, each round a list
    of ``(item index, row slot)``; a round has ``n_members x rows per member`` slots, the empty ones
    are filler. Rows per member are `rows_per` of the most items a member has (at most `per_cap`),
    by default a power of two (a bucket) of at most `per_cap`'s bucket, so a handful of programs
    serve every stack."""
    if members is None or len(members) != n_items:
        raise ValueError("evaluating an edit stack needs the member of every prompt")
    if any(not 0 <= m < n_members for m in members):
        raise ValueError(f"a prompt's member is outside the stack's 0..{n_members - 1}")
    by_member: list[list[int]] = [[] for _ in range(n_members)]
    for i, m in enumerate(members):
        by_member[m].append(i)
    most = max((len(b) for b in by_member), default=0)
    per = (rows_per or functools.partial(bucket, minimum=1))(min(max(most, 1), per_cap))
    rounds = []
    for start in range(0, most, per):
        rounds.append([(i, m * per + j) for m, items in enumerate(by_member)
                       for j, i in enumerate(items[start : start + per])])
    return per, rounds
