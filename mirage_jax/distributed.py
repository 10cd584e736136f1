"""Several processes, one program: start-up, who writes, and what crosses between processes.

A multi-host run (a TPU VM slice, a GPU cluster, or several CPU processes on one machine) is JAX's
multi-controller SPMD: every process runs this same program over the same global mesh, and each
jitted call is one program across all of them. Three rules follow, each kept in one place here:

* Start-up (`initialize_from_flags`): `jax.distributed.initialize` before any JAX computation, so
  that `jax.devices()` is every process's devices. On CPU the cross-process collectives are gloo
  (this jax's default, set explicitly so a changed default cannot silently break CPU runs).
* One writer (`is_writer`): process 0. `mirage_jax.io` turns every write on the others into a no-op,
  so no caller needs its own guard; the others still *compute* everything, in the same order.
* Same decisions everywhere (`broadcast_json`): what decides the work (the case ids a resumed run
  already finished, the pre-edit cache) is read by process 0 and broadcast, so the processes can
  never disagree about what to compute -- which would hang them in a collective -- and the output
  directory need not be on a shared file system.
* Host fetches (`fetch`): an array split across processes is not fully addressable, so
  `np.asarray` on it fails; `fetch` gathers it first. Every process must call it at the same point
  (it is a collective); on one process it is `jax.device_get`.

With no distributed flags nothing here touches the JAX backend: `is_writer()` is True and
`broadcast_json` is the identity, so single-process runs and tests are unaffected.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np


class DistributedError(ValueError):
    """Inconsistent multi-process flags (one line)."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Join the processes of a multi-host run; False (nothing done) when no flag asks for it.

    `auto`: bare `jax.distributed.initialize()`, which reads the cluster from the environment (TPU
    VM slices, SLURM, Open MPI). Otherwise all three of address, count and id are needed (a GPU
    cluster, or CPU processes on one machine). Idempotent: a second call does nothing.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not auto and not any(given):
        return False
    if not auto and not all(given):
        raise DistributedError("--coordinator_address, --num_processes and --process_id go together "
                               "(or --distributed alone on a TPU VM slice / SLURM)")
    if num_processes is not None and not 0 <= (process_id or 0) < num_processes:
        raise DistributedError(f"--process_id={process_id} is outside 0..{num_processes - 1}")
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def initialize_from_flags(fv: Any = None) -> bool:
    """`initialize` from the --distributed / --coordinator_address / --num_processes / --process_id
    flags (`mirage_jax.cli.define_distributed_flags`); a command without them runs single-process."""
    from absl import flags

    fv = flags.FLAGS if fv is None else fv
    get = lambda name: getattr(fv, name) if name in fv else None  # noqa: E731
    return initialize(get("coordinator_address"), get("num_processes"), get("process_id"),
                      auto=bool(get("distributed")))


def multi_process() -> bool:
    """True when several processes share this run (never starts the JAX backend otherwise)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes files: process 0, or the only process."""
    return not multi_process() or jax.process_index() == 0


def broadcast_json(value: Any) -> Any:
    """Process 0's `value` (anything JSON can carry) on every process; the identity on one process.

    Every process must call it at the same point; the others' `value` is ignored. JSON turns tuples
    into lists and int keys into strings: callers broadcast lists of rows, not arbitrary objects.
    """
    if not multi_process():
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_writer() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = np.zeros(n, np.uint8)
    buf[: data.size] = data[:n]
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return json.loads(buf.tobytes().decode())


def check_same(value: str, what: str) -> None:
    """A one-line `DistributedError` on every process unless all of them hold the same `value`.

    For decisions each process takes from its own disk (a statistics cache, a MEND archive): if
    they differ, one process would compute -- collectives -- while another reads a file, and both
    would hang. Better to stop at once and say what differs. A collective: every process calls it
    at the same point. Nothing happens on one process."""
    if not multi_process():
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    if not np.all(every == every[0]):
        raise DistributedError(f"{what} differs between the processes (process {jax.process_index()}: {value}); "
                               "multi-host runs need the same files on every worker: a shared file system, or copy "
                               "them to each worker first")


def fetch(tree: Any) -> Any:
    """Host numpy copies of the arrays in `tree`, gathered first where they are split across
    processes (a collective: every process calls it at the same point). Non-array leaves pass."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x

    return jax.tree_util.tree_map(one, tree)
