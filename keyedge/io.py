"""Atomic file writes: a temp file in the target directory, then a rename.

A crash or a refused input never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import KeyedgeError


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644,
                       overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temp file + rename, with file ``mode``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyedgeError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KeyedgeError(f"directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise KeyedgeError(f"cannot write to {parent}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not overwrite and path.exists():
            raise KeyedgeError(f"{path} exists; pass --force to overwrite it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place on success.

    On any exception the staging directory is removed, so ``final`` is either the
    complete result or untouched.
    """
    final = Path(final)
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".partial"))
    except OSError as exc:
        raise KeyedgeError(f"cannot create output directory {final}: {exc.strerror}") from None
    try:
        yield stage
        if final.exists():
            if not overwrite and any(final.iterdir()):
                raise KeyedgeError(f"{final} exists and is not empty; pass --force to replace it")
            shutil.rmtree(final)
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
