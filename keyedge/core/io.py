"""Atomic file writes: a temp file in the target directory, then a rename.

A crash or a refused input never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import KeyedgeError


BytesLike = bytes | bytearray | memoryview


@contextlib.contextmanager
def read_secret(path: str | os.PathLike | None, command: str | None, limit: int, what: str,
                kind: str) -> Iterator[tuple[memoryview, str]]:
    """A small secret (a key file) from a file, standard input (``-``) or the output of ``command``, read
    into a buffer that is wiped afterwards; yields (its bytes, where they came from). ``what``: "device
    key", ...; ``kind``: what a file too large is not ("device private key")."""
    if path is not None and str(path) == "-":
        with secret_bytes(stdin_readinto(), limit,
                          f"standard input is not a keyedge {kind} (more than {limit:,} bytes)") as data:
            yield data, "standard input"
    elif path is not None:
        with read_secret_file(path, what, limit, kind) as data:
            yield data, str(path)
    else:
        assert command is not None
        with _command_secret(command, limit, what, kind) as data:
            yield data, f"the {what.replace(' ', '-')} command's output"


@contextlib.contextmanager
def _command_secret(command: str, limit: int, what: str, kind: str) -> Iterator[memoryview]:
    """What a command prints, read from its pipe straight into a wiped buffer (no ``bytes`` copy)."""
    name = f"the {what.replace(' ', '-')} command"
    try:
        proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    except OSError as exc:
        raise KeyedgeError(f"{name} failed to run: {exc.strerror}") from None
    try:
        assert isinstance(proc.stdout, io.FileIO)  # bufsize=0: the pipe itself
        with secret_bytes(proc.stdout.readinto, limit,
                          f"{name}'s output is not a keyedge {kind} (more than {limit:,} bytes)") as data:
            code = proc.wait(timeout=60)
            if code != 0:
                raise KeyedgeError(f"{name} exited with {code}")
            yield data
    except subprocess.TimeoutExpired:
        raise KeyedgeError(f"{name} did not finish within 60 s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def atomic_write_bytes(path: str | os.PathLike, data: BytesLike, *, mode: int = 0o644,
                       overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temp file + rename, with file ``mode``."""
    path = check_output_file(path, overwrite)
    parent = path.parent if str(path.parent) else Path(".")
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


SECRET = 0o600  # every file that holds a key or a model's weights


def wipe(buffer) -> None:
    """Overwrite a writable buffer keyedge owns (immutable copies made by libraries cannot be wiped)."""
    if len(buffer):
        view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        ctypes.memset(view, 0, len(buffer))
        del view


def stdin_readinto() -> Callable[[memoryview], int | None]:
    """Standard input's ``readinto`` (reads into a caller's buffer: no ``bytes`` copy)."""
    return typing.cast(io.BufferedReader, sys.stdin.buffer).readinto


@contextlib.contextmanager
def secret_bytes(readinto: Callable[[memoryview], int | None], limit: int, too_large: str) -> Iterator[memoryview]:
    """Read a secret (``readinto`` of a raw file, a pipe or standard input) into one buffer keyedge owns,
    with no intermediate ``bytes`` copy; yields a view of what was read; the buffer is wiped afterwards.
    More than ``limit`` bytes is refused with the message ``too_large``."""
    buf = bytearray(limit + 1)
    got = 0
    try:
        with memoryview(buf) as view:
            while got <= limit:
                n = readinto(view[got:])
                if not n:
                    break
                got += n
            if got > limit:
                raise KeyedgeError(too_large)
            with view[:got] as data:
                yield data
    finally:
        wipe(buf)


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """File errors while reading ``what`` at ``path`` as one line."""
    try:
        yield
    except FileNotFoundError:
        raise KeyedgeError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise KeyedgeError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise KeyedgeError(f"cannot read {what} {path}: {exc.strerror}") from None


@contextlib.contextmanager
def read_secret_file(path: str | os.PathLike, what: str, limit: int, kind: str = "key file") -> Iterator[memoryview]:
    """:func:`secret_bytes` of a file, read unbuffered; file errors as one line."""
    path = Path(path)
    with reading(path, what):
        fh = open(path, "rb", buffering=0)
    with fh, secret_bytes(fh.readinto, limit, f"{path} is not a keyedge {kind} (more than {limit:,} bytes)") as data:
        yield data


def make_secret(*paths: str | os.PathLike) -> None:
    """Files a library wrote with the umask's mode (ONNX, safetensors, peft): readable by their owner only."""
    for path in paths:
        os.chmod(path, SECRET)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def _check_writable(path: Path) -> None:
    """``path``, or the nearest directory above it that exists, can be written (checked before any work)."""
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise KeyedgeError(f"cannot write under {path}: {target} is not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise KeyedgeError(f"cannot write to {target}: permission denied")


def check_output_dir(path: str | os.PathLike, force: bool, *, alternative: str = "") -> Path:
    """The one rule for an output directory: a missing or empty one is used; a non-empty one
    only with ``force`` (and even then only the files the command writes are replaced); a
    path that is a file is refused, and so is one where this user cannot write."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise KeyedgeError(f"{path} exists and is not a directory")
        try:
            entries = any(path.iterdir())
        except OSError as exc:
            raise KeyedgeError(f"cannot read output directory {path}: {exc.strerror}") from None
        if not force and entries:
            raise KeyedgeError(f"{path} exists and is not empty; pass {alternative}--force to write into it "
                               "(files keyedge does not write there are kept)")
    _check_writable(path)
    return path


def check_output_file(path: str | os.PathLike, force: bool) -> Path:
    """An output file: refused when it exists (without ``force``) or is a directory, or when its directory
    is missing or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise KeyedgeError(f"{path} is a directory, not a file to write")
    if path.exists() and not force:
        raise KeyedgeError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KeyedgeError(f"directory {parent} does not exist")
    _check_writable(parent)
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


def check_new_dir(path: str | os.PathLike) -> Path:
    """An output that must be a new (or empty) directory, not a symlink: :func:`new_dir`'s rule."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
        raise KeyedgeError(f"{path} exists and is not an empty directory: this output goes only into a new or "
                           "empty one, never over files")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KeyedgeError(f"directory {parent} does not exist")
    _check_writable(path)
    return path


@contextlib.contextmanager
def new_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory (0700) under a temporary name, then rename it to ``final``: the rename replaces at
    most an empty directory, never a file, a symlink or a non-empty directory, and is never merged, so
    nothing is written over anything -- even if ``final`` changes meanwhile. Files go in with
    :func:`write_new_file`."""
    final = check_new_dir(final)
    parent = final.parent if str(final.parent) else Path(".")
    try:
        stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".partial"))
    except OSError as exc:
        raise KeyedgeError(f"cannot create output directory {final}: {exc.strerror}") from None
    try:
        yield stage
        try:
            os.rename(stage, final)
        except OSError as exc:
            raise KeyedgeError(f"{final} appeared while it was written ({exc.strerror}): nothing written") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def private_dir(path: str | os.PathLike) -> Path:
    """A directory for keyed weights: every directory this creates on the way is 0700 (existing ones are
    the user's, and left as they are)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700)
    return Path(missing[0]) if missing else path


def write_new_file(path: Path, data: BytesLike, mode: int = SECRET) -> None:
    """A file that must not exist yet (never through a symlink), written and flushed to the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
