"""Secret keys: a permutation of the M*M*C values of an M x M pixel block.

Key file format (version 1, all integers little-endian)::

    offset  size  field
    0       8     magic  b"KEYEDGE\\x00"
    8       2     version (uint16) = 1
    10      2     flags (uint16); bit 0 = insecure (drawn from a seeded generator)
    12      2     block size M (uint16)
    14      2     channels C (uint16)
    16      4     n = M*M*C (uint32)
    20      4n    permutation (uint32 each)
    20+4n   32    SHA-256 over bytes [0, 20+4n)

The file is written 0600 and atomically. The *fingerprint* is a domain-separated
SHA-256 of (M, C, permutation), truncated to 128 bits: it identifies a key in
manifests and reports and cannot be inverted (for a key space far larger than
2**128 it cannot be brute-forced either; ``log10_keyspace`` says how large it is).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import KeyFileError
from .io import atomic_write_bytes

MAGIC = b"KEYEDGE\x00"
VERSION = 1
FLAG_INSECURE = 0x1
_HEADER = struct.Struct("<8sHHHHI")
_DIGEST = 32
_FINGERPRINT_DOMAIN = b"keyedge-key-fingerprint-v1\x00"


def can_fold(block_size: int | None, patch_size: int) -> bool:
    """Does a key of this block size fold into a patch embedding of this patch size? Only when M divides
    P does every M x M block stay inside one patch (``None``: no key, nothing to fold)."""
    return block_size is None or patch_size % block_size == 0


def _draw_permutation(n: int, seed: int | None) -> np.ndarray:
    if seed is not None:
        return np.random.default_rng(seed).permutation(n).astype(np.int64)
    perm = list(range(n))
    secrets.SystemRandom().shuffle(perm)  # Fisher-Yates on the OS CSPRNG
    return np.asarray(perm, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Key:
    """A block-shuffle key. ``perm[i]`` is the source index of output value ``i``.

    A block flattened in (C, M, M) order as ``v`` becomes ``v[perm]``.
    """

    perm: np.ndarray
    block_size: int
    channels: int = 3
    insecure: bool = False
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
        perm = perm.astype(np.int64)
        perm.setflags(write=False)
        object.__setattr__(self, "perm", perm)
        digest = hashlib.sha256(
            _FINGERPRINT_DOMAIN + struct.pack("<HH", self.block_size, self.channels)
            + perm.astype("<u4").tobytes()).hexdigest()[:32]
        object.__setattr__(self, "_fingerprint", digest)

    # -- construction -------------------------------------------------------------
    @classmethod
    def generate(cls, block_size: int, channels: int = 3, *, seed: int | None = None) -> "Key":
        """A uniformly random key from the OS CSPRNG (or, for tests only, from ``seed``)."""
        if block_size < 1 or channels < 1:
            raise KeyFileError("block size and channels must be >= 1")
        n = block_size * block_size * channels
        return cls(_draw_permutation(n, seed), block_size, channels, insecure=seed is not None)

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
    def to_bytes(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, FLAG_INSECURE if self.insecure else 0,
                            self.block_size, self.channels, self.size)
        body += self.perm.astype("<u4").tobytes()
        return body + hashlib.sha256(body).digest()

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the key file 0600 and atomically; refuse to replace a file unless asked."""
        return atomic_write_bytes(path, self.to_bytes(), mode=0o600, overwrite=overwrite)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "key file") -> "Key":
        if len(data) == 0:
            raise KeyFileError(f"{source} is empty")
        if len(data) < _HEADER.size:
            raise KeyFileError(f"{source} is truncated ({len(data)} bytes, header needs {_HEADER.size})")
        magic, version, flags, m, c, n = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise KeyFileError(f"{source} is not a keyedge key (wrong magic)")
        if version != VERSION:
            raise KeyFileError(f"{source} has unknown key format version {version} (this keyedge reads {VERSION})")
        expected = _HEADER.size + 4 * n + _DIGEST
        if len(data) < expected:
            raise KeyFileError(f"{source} is truncated ({len(data)} of {expected} bytes)")
        if len(data) > expected:
            raise KeyFileError(f"{source} has {len(data) - expected} trailing bytes")
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if hashlib.sha256(body).digest() != digest:
            raise KeyFileError(f"{source} failed its integrity check (corrupted or tampered with)")
        if n != m * m * c:
            raise KeyFileError(f"{source}: length {n} does not match block size {m} x {m} x {c} channels")
        perm = np.frombuffer(body, dtype="<u4", count=n, offset=_HEADER.size).astype(np.int64)
        return cls(perm, m, c, insecure=bool(flags & FLAG_INSECURE))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Key":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} does not exist") from None
        except IsADirectoryError:
            raise KeyFileError(f"key file {path} is a directory") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        return cls.from_bytes(data, source=f"key file {path}")
