"""What an edit changed in a params pytree, as (path -> leaf), and how to put it back.

Two consumers: sequence checkpoints (`mirage_jax.edit_checkpoint` stores only the difference from
the unedited model) and edit stacks (`mirage_jax.model.stack` evaluates many single edits in one
pass by stacking only the leaves they changed). Paths are JSON-friendly tuples of
``("k", dict key)`` / ``("i", list index)`` steps, so they can be written to disk and hashed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PathSteps = tuple[tuple[str, Any], ...]


class DiffError(ValueError):
    """A pytree that cannot be described as leaves changed or added under dicts and lists."""


def flat(tree: Any) -> dict[tuple, Any]:
    """Leaves by jax key path."""
    return {tuple(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def path_steps(path: tuple) -> PathSteps:
    """A jax key path as ``(("k", key) | ("i", index), ...)``."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(("k", k.key if isinstance(k.key, str) else int(k.key)))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(("i", k.idx))
        else:
            raise DiffError(f"a params leaf at {jax.tree_util.keystr(path)} is not under dicts and lists")
    return tuple(out)


def key_path(steps: Any) -> tuple:
    """`path_steps` back to a jax key path (steps may be lists, as JSON gives them back)."""
    return tuple(jax.tree_util.DictKey(k) if kind == "k" else jax.tree_util.SequenceKey(k) for kind, k in steps)


def set_leaf(tree: Any, steps: Any, value: Any) -> Any:
    """`tree` with the leaf at `steps` set to `value`, containers copied along the path only (the
    other leaves are shared, not copied): cheap, also inside a traced function."""
    if not steps:
        return value
    (_, key), rest = steps[0], steps[1:]
    if isinstance(tree, dict):
        return {**tree, key: set_leaf(tree.get(key, {}), rest, value)}
    items = list(tree)
    items[key] = set_leaf(items[key], rest, value)
    return type(tree)(items) if isinstance(tree, tuple) else items


def changed_leaves(base: Any, params: Any) -> dict[tuple, Any]:
    """The leaves of `params` that are not in `base` or differ from it (jax key path -> leaf).

    Identity first (editors share every leaf they do not touch), then value, so that a method that
    rebuilds the whole pytree costs a comparison, not a copy of the model."""
    old, new = flat(base), flat(params)
    if gone := [jax.tree_util.keystr(p) for p in old if p not in new]:
        raise DiffError(f"the edit removed params leaves ({gone[0]}...); it cannot be stored as a difference")
    out = {}
    for p, leaf in new.items():
        prev = old.get(p)
        if prev is leaf:
            continue
        if (prev is not None and jnp.shape(prev) == jnp.shape(leaf) and jnp.result_type(prev) == jnp.result_type(leaf)
                and bool(jnp.array_equal(prev, leaf))):
            continue
        out[p] = leaf
    return out
