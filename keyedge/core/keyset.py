"""A key set: the keys of a random ensemble's members, one per member, in one file.

Key set file format (version 1, all integers little-endian)::

    offset      size   field
    0           8      magic  b"KEYEDGES"
    8           2      version (uint16) = 1
    10          2      members N (uint16, 2..64)
    12          4      L, the length of each member's key file (uint32; every member has one shape)
    16          N*L    the members' version 2 key files (:mod:`keyedge.core.keys`), each with its own SHA-256
    16+N*L      32     SHA-256 over bytes [0, 16+N*L)

The file is written 0600 and atomically. Each member keeps its own fingerprint (member ``i``'s model names
it); the set's fingerprint is a domain-separated SHA-256 of the members' fingerprints in order, truncated to
128 bits, so it names exactly these members in this order and reveals nothing the members' do not.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KeyFileError
from .io import wipe
from .keys import MAX_FILE, Key, read_key_bytes, write_secret_bytes

SET_MAGIC = b"KEYEDGES"
SET_VERSION = 1
MIN_MEMBERS, MAX_MEMBERS = 2, 64
_HEADER = struct.Struct("<8sHHI")
_DIGEST = 32
_FINGERPRINT = b"keyedge-keyset-fingerprint-v1\x00"


@dataclass(frozen=True, eq=False)
class KeySet:
    """The member keys of an ensemble, in member order (member ``i`` is trained and served with ``members[i]``)."""

    members: tuple[Key, ...]
    _fingerprint: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if not MIN_MEMBERS <= len(members) <= MAX_MEMBERS:
            raise KeyFileError(f"a key set holds at least {MIN_MEMBERS} and at most {MAX_MEMBERS} keys, "
                               f"not {len(members)}")
        shapes = {(k.block_size, k.channels) for k in members}
        if len(shapes) != 1:
            raise KeyFileError(f"a key set's members share one block size and channel count, not "
                               f"{sorted(shapes)}")
        prints = [k.fingerprint for k in members]
        if len(set(prints)) != len(prints):
            raise KeyFileError("a key set holds the same key twice")
        object.__setattr__(self, "members", members)
        digest = hashlib.sha256(_FINGERPRINT + b"".join(bytes.fromhex(p) for p in prints)).hexdigest()[:32]
        object.__setattr__(self, "_fingerprint", digest)

    @classmethod
    def generate(cls, n: int, block_size: int, channels: int = 3, *, seed: int | None = None,
                 allow_small: bool | None = None) -> "KeySet":
        """``n`` independent keys from the OS CSPRNG (``seed``: member ``i`` from ``seed + i``, tests only)."""
        if not MIN_MEMBERS <= n <= MAX_MEMBERS:
            raise KeyFileError(f"an ensemble has at least {MIN_MEMBERS} and at most {MAX_MEMBERS} members, not {n}")
        return cls(tuple(Key.generate(block_size, channels, seed=None if seed is None else seed + i,
                                      allow_small=allow_small) for i in range(n)))

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def fingerprints(self) -> list[str]:
        return [k.fingerprint for k in self.members]

    @property
    def block_size(self) -> int:
        return self.members[0].block_size

    @property
    def channels(self) -> int:
        return self.members[0].channels

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.members)

    def __getitem__(self, i: int) -> Key:
        return self.members[i]

    def __repr__(self) -> str:  # never show a permutation
        return f"KeySet({len(self)} members, block_size={self.block_size}, fingerprint={self.fingerprint})"

    __str__ = __repr__

    def to_bytes(self) -> bytearray:
        parts = [k.to_bytes() for k in self.members]
        try:
            size = len(parts[0])
            out = bytearray(_HEADER.size + len(parts) * size + _DIGEST)
            _HEADER.pack_into(out, 0, SET_MAGIC, SET_VERSION, len(parts), size)
            for i, part in enumerate(parts):
                out[_HEADER.size + i * size:_HEADER.size + (i + 1) * size] = part
            out[-_DIGEST:] = hashlib.sha256(memoryview(out)[:-_DIGEST]).digest()
            return out
        finally:
            for part in parts:
                wipe(part)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the key set 0600 and atomically; refuse to replace a file unless asked."""
        return write_secret_bytes(self.to_bytes(), path, overwrite=overwrite)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, source: str = "key set") -> "KeySet":
        if len(data) < _HEADER.size + _DIGEST:
            raise KeyFileError(f"{source} is {'empty' if not len(data) else 'truncated'}")
        magic, version, n, size = _HEADER.unpack_from(data)
        if magic != SET_MAGIC:
            if bytes(data[:7]) == SET_MAGIC[:7]:
                raise KeyFileError(f"{source} is one key, not a key set: draw an ensemble's keys with "
                                   "keyedge keygen --ensemble N")
            raise KeyFileError(f"{source} is not a keyedge key set (wrong magic)")
        if version != SET_VERSION:
            raise KeyFileError(f"{source} has unknown key set version {version} (this keyedge reads {SET_VERSION})")
        expected = _HEADER.size + n * size + _DIGEST
        if len(data) != expected:
            raise KeyFileError(f"{source} is {len(data)} bytes where its header says {expected}")
        if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
            raise KeyFileError(f"{source} failed its integrity check (corrupted or tampered with)")
        members = [Key.from_bytes(data[_HEADER.size + i * size:_HEADER.size + (i + 1) * size],
                                  source=f"{source}, member {i}") for i in range(n)]
        return cls(tuple(members))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KeySet":
        return read_key_bytes(path, "key set", _HEADER.size + MAX_MEMBERS * MAX_FILE + _DIGEST, cls.from_bytes)

    @classmethod
    def given(cls, keys: "KeySet | Sequence[Key] | str | os.PathLike") -> "KeySet":
        if isinstance(keys, KeySet):
            return keys
        if isinstance(keys, (str, os.PathLike)):
            return cls.load(keys)
        return cls(tuple(keys))

    def wipe(self) -> None:
        for k in self.members:
            k.wipe()


def load_key_or_set(path: str | os.PathLike) -> Key | KeySet:
    """A key file, or a random ensemble's key set file (told apart by its magic)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SET_MAGIC))
    except OSError:  # Key.load says what is wrong with it, in one line
        head = b""
    return KeySet.load(path) if head == SET_MAGIC else Key.load(path)


def key_or_set_from_bytes(data: bytes | bytearray | memoryview, *, source: str) -> Key | KeySet:
    """:func:`load_key_or_set` of bytes in memory (a vault's entry)."""
    return KeySet.from_bytes(data, source=source) if bytes(data[:len(SET_MAGIC)]) == SET_MAGIC else \
        Key.from_bytes(data, source=source)
