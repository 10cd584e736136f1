"""Crash-safe file writes: the one place that knows how to replace a file or folder atomically.

Long runs (statistics, MEND meta-training, the runner) write partial results and must survive a
kill at any instant: a reader then sees either the old content or the new one, never a torn file.
Everything goes through a temporary sibling and `os.replace`, which is atomic on POSIX when both
paths are on one file system (a sibling always is).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open `<path>.tmp` for writing; on a clean exit flush, fsync and rename it over `path`.

    An exception inside the block removes the temporary file and leaves `path` as it was.
    """
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
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def replace_dir(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_dir)` then put that folder at `path`, replacing what was there.

    Folders cannot be swapped in one rename, so the window between removing the old one and
    renaming the new one leaves `<path>.new` complete and `path` missing: `recover_dir` restores it.
    """
    path = os.fspath(path)
    tmp = path + ".new"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def recover_dir(path: str | os.PathLike) -> str:
    """`path`, restored from `<path>.new` if a kill hit `replace_dir` between its two steps."""
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".new"):
        os.replace(path + ".new", path)
    return path
