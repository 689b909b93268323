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


def check_output_dir(path: str | os.PathLike, force: bool, *, alternative: str = "") -> Path:
    """The one rule for an output directory: a missing or empty one is used; a non-empty one
    only with ``force`` (and even then only the files the command writes are replaced); a
    path that is a file is refused."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise KeyedgeError(f"{path} exists and is not a directory")
        if not force and any(path.iterdir()):
            raise KeyedgeError(f"{path} exists and is not empty; pass {alternative}--force to write into it "
                               "(files keyedge does not write there are kept)")
    return path


def _merge_into(src: Path, dest: Path) -> None:
    """Move ``src``'s entries into ``dest``, replacing only the entries of the same name."""
    for entry in src.iterdir():
        target = dest / entry.name
        if entry.is_dir() and target.is_dir() and not target.is_symlink():
            _merge_into(entry, target)
            entry.rmdir()
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Build an output directory under a temporary name; move it into place on success.

    The output rule is :func:`check_output_dir`'s. On any exception the staging
    directory is removed and ``final`` is untouched; on success ``final`` holds the
    new files beside whatever else was there (``force``), never fewer.
    """
    final = check_output_dir(final, force)
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".partial"))
    except OSError as exc:
        raise KeyedgeError(f"cannot create output directory {final}: {exc.strerror}") from None
    try:
        yield stage
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        if final.exists():
            _merge_into(stage, final)
            stage.rmdir()
        else:
            os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
