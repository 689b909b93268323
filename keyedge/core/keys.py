"""Secret keys: a permutation of the M*M*C values of an M x M pixel block.

Key file format (version 2, all integers little-endian)::

    offset  size  field
    0       8     magic  b"KEYEDGE\\x00"
    8       2     version (uint16) = 2
    10      2     flags (uint16); bit 0 = insecure (drawn from a seeded generator),
                  bit 1 = small key space (below 2**128 keys, allowed with --insecure-small-key)
    12      2     block size M (uint16)
    14      2     channels C (uint16)
    16      4     n = M*M*C (uint32)
    20      16    key ID: random bytes drawn with the permutation
    36      4n    permutation (uint32 each)
    36+4n   32    SHA-256 over bytes [0, 36+4n)

The file is written 0600 and atomically. The *fingerprint* that names a key in manifests,
reports, bundles and C++ packages is a domain-separated SHA-256 of the key ID, M, C and the
permutation, truncated to 128 bits: without the secret 128-bit random ID nothing can be searched
from it (two keys of the same permutation have unrelated fingerprints, and no key space, however
small, can be walked to match one), and with it the fingerprint still names this exact key, so a
key file whose permutation was changed (and its SHA-256 recomputed) no longer matches its models.
A seeded key's ID comes from its seed: a search of seeds finds it (``insecure``).

Version 1 files (no key ID; the fingerprint was a hash of M, C and the permutation, which a
search of a small key space inverts) are still read, with a warning to re-key.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import KeyedgeError, KeyFileError
from .io import atomic_write_bytes, read_secret_file, wipe
from .progress import echo

MAGIC = b"KEYEDGE\x00"
VERSION = 2
FLAG_INSECURE, FLAG_SMALL = 0x1, 0x2
_HEADER = struct.Struct("<8sHHHHI")
_ID = 16
_DIGEST = 32
_FINGERPRINT_V1 = b"keyedge-key-fingerprint-v1\x00"
_FINGERPRINT_V2 = b"keyedge-key-fingerprint-v2\x00"
MIN_KEYSPACE_BITS = 128
MAX_FILE = _HEADER.size + _ID + 4 * 64 * 64 * 16 + _DIGEST  # the largest key: M = 64, C = 16
_warned: set[str] = set()
T = TypeVar("T")


def can_fold(block_size: int | None, patch_size: int) -> bool:
    """Does a key of this block size fold into a patch embedding of this patch size? Only when M divides
    P does every M x M block stay inside one patch (``None``: no key, nothing to fold)."""
    return block_size is None or patch_size % block_size == 0


def keyspace_bits(block_size: int, channels: int) -> float:
    """log2 of the number of keys of this shape, (M*M*C)!."""
    return math.lgamma(block_size * block_size * channels + 1) / math.log(2)


def check_keyspace(block_size: int, channels: int) -> None:
    """Refuse a key shape whose key space is below 2**128 keys."""
    bits = keyspace_bits(block_size, channels)
    if bits < MIN_KEYSPACE_BITS:
        raise KeyFileError(
            f"block size {block_size} with {channels} channel(s) gives ({block_size * block_size * channels})! "
            f"~ 2^{bits:.0f} keys, below 2^{MIN_KEYSPACE_BITS}: a search would find the key; use a larger block "
            "(or --insecure-small-key for experiments, recorded in the key file)")


def _draw(n: int, seed: int | None) -> tuple[np.ndarray, bytes]:
    """A permutation of n values and a key ID, from the OS CSPRNG (or, for tests, from ``seed``)."""
    if seed is not None:
        rng = np.random.default_rng(seed)
        return rng.permutation(n).astype(np.int64), rng.bytes(_ID)
    perm = list(range(n))
    secrets.SystemRandom().shuffle(perm)  # Fisher-Yates on the OS CSPRNG
    return np.asarray(perm, dtype=np.int64), secrets.token_bytes(_ID)


def write_secret_bytes(data: bytearray, path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Write a key file's bytes 0600 and atomically (refusing to replace a file unless asked), then wipe them."""
    try:
        return atomic_write_bytes(path, data, mode=0o600, overwrite=overwrite)
    finally:
        wipe(data)


def read_key_bytes(path: str | os.PathLike, what: str, limit: int, parse: Callable[..., T]) -> T:
    """``parse(data, source=...)`` of a secret file read into a buffer that is wiped once it is parsed; every
    failure (missing, unreadable, too large, malformed) is a :class:`KeyFileError` of one line."""
    try:
        with read_secret_file(path, what, limit, kind=what) as data:
            return parse(data, source=f"{what} {path}")
    except KeyFileError:
        raise
    except KeyedgeError as exc:
        raise KeyFileError(str(exc)) from None


@dataclass(frozen=True, eq=False)
class Key:
    """A block-shuffle key. ``perm[i]`` is the source index of output value ``i``.

    A block flattened in (C, M, M) order as ``v`` becomes ``v[perm]``. ``key_id``: the random
    ID its fingerprint derives from (None for a version 1 file or a permutation built in memory,
    e.g. an attacker's estimate: their fingerprint is the version 1 hash of the permutation).
    """

    perm: np.ndarray
    block_size: int
    channels: int = 3
    insecure: bool = False
    key_id: bytes | None = field(default=None, repr=False)
    _fingerprint: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        perm = np.asarray(self.perm)
        n = self.block_size * self.block_size * self.channels
        if self.block_size < 1 or self.channels < 1:
            raise KeyFileError(f"block size {self.block_size} and channels {self.channels} must be >= 1")
        if perm.ndim != 1 or perm.size != n:
            raise KeyFileError(
                f"permutation has {perm.size} values but block size {self.block_size} x "
                f"{self.block_size} x {self.channels} channels needs {n}")
        if not np.issubdtype(perm.dtype, np.integer) or not np.array_equal(
                np.sort(perm), np.arange(n)):
            raise KeyFileError("the key's values are not a permutation of 0..n-1")
        if self.key_id is not None and len(self.key_id) != _ID:
            raise KeyFileError(f"a key ID has {_ID} bytes, not {len(self.key_id)}")
        perm = perm.astype(np.int64)
        perm.setflags(write=False)
        object.__setattr__(self, "perm", perm)
        shape = struct.pack("<HH", self.block_size, self.channels)
        values = perm.astype("<u4").tobytes()
        if self.key_id is not None:  # the random ID makes it unsearchable; the rest binds it to this key
            digest = hashlib.sha256(_FINGERPRINT_V2 + self.key_id + shape + values).hexdigest()[:32]
        else:
            digest = hashlib.sha256(_FINGERPRINT_V1 + shape + values).hexdigest()[:32]
        object.__setattr__(self, "_fingerprint", digest)

    # -- construction -------------------------------------------------------------
    @classmethod
    def generate(cls, block_size: int, channels: int = 3, *, seed: int | None = None,
                 allow_small: bool | None = None) -> "Key":
        """A uniformly random key and key ID from the OS CSPRNG (or, for tests only, from ``seed``).
        A shape with fewer than 2**128 keys is refused unless ``allow_small`` (recorded in the file; by
        default allowed only for a seeded key, which is insecure anyway)."""
        if block_size < 1 or channels < 1:
            raise KeyFileError("block size and channels must be >= 1")
        if not (seed is not None if allow_small is None else allow_small):
            check_keyspace(block_size, channels)
        perm, key_id = _draw(block_size * block_size * channels, seed)
        return cls(perm, block_size, channels, insecure=seed is not None, key_id=key_id)

    @classmethod
    def identity(cls, block_size: int, channels: int = 3) -> "Key":
        """The identity permutation (no shuffle): the plain, un-keyed model's 'key'."""
        return cls(np.arange(block_size * block_size * channels), block_size, channels, insecure=True)

    # -- properties ---------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def size(self) -> int:
        return int(self.perm.size)

    @property
    def version(self) -> int:
        """The key file format it was read from or will be written in (1: no key ID)."""
        return 1 if self.key_id is None else VERSION

    @property
    def small(self) -> bool:
        """Fewer than 2**128 keys of this shape (only drawn with ``allow_small``)."""
        return keyspace_bits(self.block_size, self.channels) < MIN_KEYSPACE_BITS

    @property
    def log10_keyspace(self) -> float:
        """log10 of the number of keys of this shape, (M*M*C)!."""
        return math.lgamma(self.size + 1) / math.log(10)

    @property
    def inverse(self) -> np.ndarray:
        return np.argsort(self.perm)

    def __repr__(self) -> str:  # never show the permutation
        return (f"Key(block_size={self.block_size}, channels={self.channels}, "
                f"fingerprint={self.fingerprint}{', insecure' if self.insecure else ''})")

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    # -- file I/O -----------------------------------------------------------------
    def to_bytes(self) -> bytearray:
        """The version 2 key file, in a buffer the caller can wipe (a key without a key ID cannot be
        written: draw a new one)."""
        if self.key_id is None:
            raise KeyFileError("this key has no key ID (a version 1 key, or a permutation built in memory): "
                               "draw a new key with keyedge keygen")
        flags = (FLAG_INSECURE if self.insecure else 0) | (FLAG_SMALL if self.small else 0)
        body = _HEADER.pack(MAGIC, VERSION, flags, self.block_size, self.channels, self.size)
        out = bytearray(len(body) + _ID + 4 * self.size + _DIGEST)
        out[:len(body)] = body
        out[len(body):len(body) + _ID] = self.key_id
        np.frombuffer(out, dtype="<u4", count=self.size, offset=len(body) + _ID)[:] = self.perm
        out[-_DIGEST:] = hashlib.sha256(memoryview(out)[:-_DIGEST]).digest()
        return out

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the key file 0600 and atomically; refuse to replace a file unless asked."""
        return write_secret_bytes(self.to_bytes(), path, overwrite=overwrite)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, source: str = "key file") -> "Key":
        if len(data) == 0:
            raise KeyFileError(f"{source} is empty")
        if len(data) < _HEADER.size:
            raise KeyFileError(f"{source} is truncated ({len(data)} bytes, header needs {_HEADER.size})")
        magic, version, flags, m, c, n = _HEADER.unpack_from(data)
        if magic != MAGIC:
            if magic == b"KEYEDGES":  # keyedge.core.keyset's: an ensemble's keys (the count at offset 10)
                raise KeyFileError(f"{source} is a key set of {flags} keys (an ensemble's), not one key")
            raise KeyFileError(f"{source} is not a keyedge key (wrong magic)")
        if version not in (1, VERSION):
            raise KeyFileError(f"{source} has unknown key format version {version} (this keyedge reads 1 and "
                               f"{VERSION})")
        start = _HEADER.size + (_ID if version == VERSION else 0)
        expected = start + 4 * n + _DIGEST
        if len(data) < expected:
            raise KeyFileError(f"{source} is truncated ({len(data)} of {expected} bytes)")
        if len(data) > expected:
            raise KeyFileError(f"{source} has {len(data) - expected} trailing bytes")
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if hashlib.sha256(body).digest() != digest:
            raise KeyFileError(f"{source} failed its integrity check (corrupted or tampered with)")
        if n != m * m * c:
            raise KeyFileError(f"{source}: length {n} does not match block size {m} x {m} x {c} channels")
        if flags & ~(FLAG_INSECURE | FLAG_SMALL):
            raise KeyFileError(f"{source} has unknown flags {flags:#x}")
        perm = np.frombuffer(body, dtype="<u4", count=n, offset=start).astype(np.int64)
        key_id = bytes(body[_HEADER.size:start]) if version == VERSION else None
        key = cls(perm, m, c, insecure=bool(flags & FLAG_INSECURE), key_id=key_id)
        if source not in _warned and (version == 1 or (key.small and not key.insecure)):  # seeded: tests only
            _warned.add(source)
            if version == 1:
                echo(f"WARNING: {source} is a version 1 key file, whose fingerprint (in every manifest) is a hash of "
                     "the permutation: re-key (keyedge keygen) and fine-tune again", err=True)
            else:
                echo(f"WARNING: {source} has a key space below 2^{MIN_KEYSPACE_BITS} keys (--insecure-small-key): a "
                     "search of the key space finds it; for experiments only", err=True)
        return key

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Key":
        """Read into a buffer that is wiped once the key is parsed (the permutation then lives in the Key
        only, until :meth:`wipe`)."""
        return read_key_bytes(path, "key file", MAX_FILE, cls.from_bytes)

    @classmethod
    def given(cls, key: "Key | str | os.PathLike | None") -> "Key | None":
        """A key given as a :class:`Key` (the fleet's, from its vault: never on disk) or a key file's path."""
        return key if key is None or isinstance(key, Key) else cls.load(key)

    def wipe(self) -> None:
        """Overwrite the permutation in place (a key dropped after use: a sealed runner's, at deactivation)."""
        self.perm.setflags(write=True)
        self.perm.fill(0)
        self.perm.setflags(write=False)
