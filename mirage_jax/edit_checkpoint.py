"""A sequence's edited params on disk, so that a killed lifelong run resumes where it stopped.

Why: a sequential run of WISE or MEMIT over a thousand edits takes hours, and the edits are the
expensive part. Replaying them from the unedited model on `--resume` is correct (the edits are
deterministic) but throws those hours away; a kill during the final evaluation would even redo
every edit only to evaluate the few rows left. So the runner writes a checkpoint every few edits
and after the last one, and a resumed run starts from it.

What is stored: only what the edits made different from the unedited pytree -- the leaves an edit
replaced (found by identity first: editors share every leaf they do not touch; then by value, so a
method that rebuilds the whole pytree costs a comparison, not a copy of the model) and the leaves
it added (GRACE's codebook, WISE's memories) -- plus the method's carried state (AlphaEdit's
accumulated keys), the per-edit infos and a key of the run's settings. For a 7B model and a
rank-one method that is a few down-projection kernels, not 14 GB. One `.npz` file (a manifest in
JSON plus raw bytes per array, so bfloat16 survives numpy), replaced atomically (`io.savez`).

Multi-host: the arrays are gathered on every process (`distributed.fetch`, a collective) and
written by process 0; on load process 0 reads the file and broadcasts it, so the workers need no
shared disk, and each leaf goes back to the sharding of the unedited leaf it replaces.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax import distributed, io
from mirage_jax.model.diff import DiffError, changed_leaves, flat, key_path, path_steps, set_leaf

log = logging.getLogger(__name__)

FORMAT = "mirage_jax-sequence-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or does not belong to this run (one line)."""


@dataclasses.dataclass(frozen=True)
class SequenceState:
    """Where a sequence stands after `n_chunks` edit calls: the params, the method's carried
    `state` and the `info` of every request edited so far (by case id)."""

    n_chunks: int
    params: Any
    state: Any
    infos: dict[int, dict]


# --- arrays as bytes ---------------------------------------------------------------------------


def _pack(name: str, arr: np.ndarray, arrays: dict, specs: list, **extra: Any) -> None:
    arr = np.asarray(arr, order="C")  # (not ascontiguousarray: it turns a 0-d array into 1-d)
    arrays[f"a{len(specs)}"] = arr.reshape(-1).view(np.uint8)
    specs.append({"name": name, "dtype": jnp.dtype(arr.dtype).name, "shape": list(arr.shape), **extra})


def _unpack(arrays: Any, i: int, spec: dict) -> np.ndarray:
    return np.asarray(arrays[f"a{i}"]).view(jnp.dtype(spec["dtype"])).reshape(spec["shape"])


def _state_items(state: Any) -> list[tuple[str | int, Any]]:
    if state is None:
        return []
    if isinstance(state, dict) and all(isinstance(k, (str, int)) for k in state):
        return list(state.items())
    raise CheckpointError(f"method state of type {type(state).__name__} is not a dict of arrays; cannot store it")


# --- save / load -------------------------------------------------------------------------------


def save(path: Path, key: str, base: Any, seq: SequenceState) -> None:
    """Write `seq` (its params as a difference from `base`) to `path`, atomically.

    A collective in a multi-host run: every process calls it at the same point."""
    try:
        leaves = changed_leaves(base, seq.params)
        paths = [list(map(list, path_steps(p))) for p in leaves]
    except DiffError as err:
        raise CheckpointError(str(err)) from None
    state = _state_items(seq.state)
    host = distributed.fetch({"leaves": list(leaves.values()), "state": [v for _, v in state]})
    arrays: dict[str, np.ndarray] = {}
    specs: list[dict] = []
    for p, arr in zip(paths, host["leaves"]):
        _pack("param", np.asarray(arr), arrays, specs, path=p)
    for (k, _), arr in zip(state, host["state"]):
        _pack("state", np.asarray(arr), arrays, specs, key=k)
    manifest = {"format": FORMAT, "key": key, "n_chunks": seq.n_chunks, "state_is_none": seq.state is None,
                "infos": [[cid, info] for cid, info in seq.infos.items()], "arrays": specs}
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    io.savez(path, **arrays)


def _read(path: Path) -> tuple[dict, list[np.ndarray]] | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            manifest = json.loads(np.asarray(z["manifest"]).tobytes().decode())
            return manifest, [_unpack(z, i, s) for i, s in enumerate(manifest["arrays"])]
    except Exception as err:  # a file from elsewhere or damaged: say so, the run can start over
        raise CheckpointError(f"{path}: not a readable sequence checkpoint ({type(err).__name__}: {err}); "
                              "delete it to replay the sequence from the start") from None


def _read_everywhere(path: Path) -> tuple[dict, list[np.ndarray]] | None:
    """Process 0's reading of `path` on every process (one process: just the reading). A file that
    cannot be read is an error on every process, not only on the one that read it."""
    found, error = None, None
    if distributed.is_writer():
        try:
            found = _read(path)
        except CheckpointError as err:
            error = str(err)
    if not distributed.multi_process():
        if error:
            raise CheckpointError(error)
        return found
    head = distributed.broadcast_json({"error": error, "manifest": found[0] if found else None})
    if head["error"]:
        raise CheckpointError(head["error"])
    if head["manifest"] is None:
        return None
    from jax.experimental import multihost_utils

    manifest = head["manifest"]
    like = found[1] if found else [np.zeros(s["shape"], jnp.dtype(s["dtype"])) for s in manifest["arrays"]]
    return manifest, [np.asarray(a) for a in multihost_utils.broadcast_one_to_all(like)]


def load(path: Path, key: str, base: Any) -> SequenceState | None:
    """The sequence checkpoint at `path` applied to `base`, or None when there is none.

    A checkpoint written under other settings (another method, hyper-parameters, model or request
    order: `key`) is a `CheckpointError`: continuing from it would mix two runs."""
    found = _read_everywhere(path)
    if found is None:
        return None
    manifest, arrays = found
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest["key"] != key:
        raise CheckpointError(f"{path} was written by a run with other settings (method, hyper-parameters, model "
                              "or requests); delete it, or resume with the settings that wrote it")
    old = flat(base)
    params, state = base, None if manifest["state_is_none"] else {}
    for spec, arr in zip(manifest["arrays"], arrays):
        if spec["name"] == "state":
            state[spec["key"]] = jnp.asarray(arr)
            continue
        path_ = spec["path"]
        prev = old.get(key_path(path_))
        leaf = jax.device_put(arr, prev.sharding) if isinstance(prev, jax.Array) else jnp.asarray(arr)
        params = set_leaf(params, path_, leaf)
    return SequenceState(manifest["n_chunks"], params, state, {int(c): info for c, info in manifest["infos"]})
