"""Crash-safe file writes: the one place that knows how to replace a file or folder atomically.

Long runs (statistics, MEND meta-training, the runner) write partial results and must survive a
kill at any instant: a reader then sees either the old content or the new one, never a torn file.
Everything goes through a temporary sibling and `os.replace`, which is atomic on POSIX when both
paths are on one file system (a sibling always is).

In a multi-host run only process 0 writes (`mirage_jax.distributed.is_writer`): every function here
is a no-op on the other processes, so callers need no guard of their own. They still run the same
code (and so the same collectives) up to the write itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from mirage_jax.distributed import is_writer


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open `<path>.tmp` for writing; on a clean exit flush, fsync and rename it over `path`.

    An exception inside the block removes the temporary file and leaves `path` as it was. On a
    process other than 0 the block writes to the null device.
    """
    if not is_writer():
        with open(os.devnull, mode, **kwargs) as f:
            yield f
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by `text` (UTF-8) atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """Replace `path` by `obj` as JSON atomically."""
    write_text(path, json.dumps(obj, **dump_kwargs))


def savez(path: str | os.PathLike, **arrays: Any) -> None:
    """`np.savez` to `path` atomically (a kill mid-write leaves the old file intact)."""
    if not is_writer():  # (a zip archive cannot be written to the null device: it seeks back)
        return
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` and a newline to `path` (creating it and its folder) and flush: streamed
    results survive a kill up to the last whole line (readers drop a torn last line)."""
    if not is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()


def makedirs(path: str | os.PathLike) -> None:
    """`mkdir -p`, on the writing process only."""
    if is_writer():
        Path(path).mkdir(parents=True, exist_ok=True)


def replace_dir(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_dir)` then put that folder at `path`, replacing what was there.

    Folders cannot be swapped in one rename, so the window between removing the old one and
    renaming the new one leaves `<path>.new` complete and `path` missing: `recover_dir` restores it.
    """
    if not is_writer():  # `write` still runs (it may gather sharded arrays: a collective), into a scratch folder
        with tempfile.TemporaryDirectory() as scratch:
            write(os.path.join(scratch, "out"))
        return
    path = os.fspath(path)
    tmp = path + ".new"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def recover_dir(path: str | os.PathLike) -> str:
    """`path`, restored from `<path>.new` if a kill hit `replace_dir` between its two steps."""
    path = os.fspath(path)
    if is_writer() and not os.path.exists(path) and os.path.exists(path + ".new"):
        os.replace(path + ".new", path)
    return path
