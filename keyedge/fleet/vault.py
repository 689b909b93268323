"""The fleet's key vault: every device's key file and the publisher's signing key, kept for retraining,
rotation and audits, in one file encrypted under the operator's master key.

Construction (libsodium through PyNaCl, no home-made primitives): XChaCha20-Poly1305 (IETF AEAD,
``crypto_aead_xchacha20poly1305_ietf``) with a fresh random 24-byte nonce per write and the file's
header as additional data::

    0   8   magic "KEYEDGEV"
    8   2   version = 1 (u16 LE)
    10  24  nonce
    34  ..  ciphertext || 16-byte tag of the JSON {"publisher": hex seed, "devices": {id: hex key file},
            "retired": {key fingerprint: hex key file}}

A key file here is a device's key, or, in a fleet of random ensembles, its key set file
(:mod:`keyedge.core.keyset`, fingerprinted by the set's fingerprint).

``retired`` keeps the keys that rotation or revocation took out of use, for audits of old bundles.

The master key file: ``"KEYEDGEM" || u16 version 1 || u8 kind 1 || 32 bytes``, 0600, read from a file,
standard input (``-``) or a command (``--master-key-command`` / ``$KEYEDGE_MASTER_KEY_COMMAND``) whose
output it is, like the device key. Fleet commands open the vault in memory only and write it atomically
(0600). What cannot be wiped: the decoded JSON's Python strings.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, read_secret, wipe

MAGIC, VERSION = b"KEYEDGEV", 1
HEADER = struct.Struct("<8sH24s")
MASTER_MAGIC = b"KEYEDGEM"
MASTER_FILE = 8 + 3 + 32
MASTER_COMMAND_ENV = "KEYEDGE_MASTER_KEY_COMMAND"


class VaultError(KeyedgeError):
    """A vault that cannot be opened: another master key, tampered with, truncated, an unknown version."""


def _aead():
    import nacl.bindings
    import nacl.exceptions

    return nacl.bindings, nacl.exceptions


def new_master_key(path: Path) -> None:
    """A fresh master key file (0600); refused where one exists."""
    key = bytearray(MASTER_MAGIC + struct.pack("<HB", 1, 1) + secrets.token_bytes(32))
    try:
        atomic_write_bytes(path, key, mode=0o600, overwrite=False)
    finally:
        wipe(key)


def _parse_master(data, where: str) -> bytearray:
    if len(data) != MASTER_FILE or bytes(data[:8]) != MASTER_MAGIC or bytes(data[8:11]) != b"\x01\x00\x01":
        raise KeyedgeError(f"{where} is not a keyedge master key (keyedge fleet init makes one)")
    return bytearray(data[11:])


def read_master_key(path: str | Path | None, command: str | None = None) -> bytearray:
    """The operator's master key: a file, standard input (``-``), or a command's output."""
    command = command or (os.environ.get(MASTER_COMMAND_ENV) if path is None else None)
    if path is not None or command:
        with read_secret(path, command, MASTER_FILE, "master key", "master key") as (data, where):
            return _parse_master(data, where)
    raise KeyedgeError(f"the fleet's vault needs the master key: pass --master-key PATH (or -), "
                       f"--master-key-command CMD, or set {MASTER_COMMAND_ENV}")


@dataclass
class Vault:
    """The secrets of a fleet, in memory: the publisher's Ed25519 seed, each device's current key file,
    and the retired keys by fingerprint."""
    publisher: bytes
    devices: dict[str, bytes] = field(default_factory=dict)
    retired: dict[str, bytes] = field(default_factory=dict)

    def retire(self, device_id: str, fingerprint: str) -> None:
        """Take a device's key out of use; it is kept, by fingerprint, for audits."""
        self.retired[fingerprint] = self.devices.pop(device_id)

    def key_file(self, device_id: str, fingerprint: str) -> bytes:
        """The key file of ``fingerprint``: the device's current key (key set), or a retired one."""
        from ..core.keyset import key_or_set_from_bytes

        current = self.devices.get(device_id)
        if current is not None:
            parsed = key_or_set_from_bytes(current, source="a vault entry")
            matches = parsed.fingerprint == fingerprint
            parsed.wipe()
            if matches:
                return current
        if fingerprint in self.retired:
            return self.retired[fingerprint]
        raise VaultError(f"the vault holds no key {fingerprint} of device {device_id}")

    def to_plaintext(self) -> bytes:
        return json.dumps({"publisher": self.publisher.hex(),
                           "devices": {k: v.hex() for k, v in sorted(self.devices.items())},
                           "retired": {k: v.hex() for k, v in sorted(self.retired.items())}}).encode()

    def save(self, path: Path, master: bytearray, *, overwrite: bool = True) -> Path:
        """Encrypt and write atomically (0600), with a fresh nonce."""
        bindings, _ = _aead()
        nonce = secrets.token_bytes(24)
        header = HEADER.pack(MAGIC, VERSION, nonce)
        plain = bytearray(self.to_plaintext())
        try:
            sealed = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(plain), header, nonce, bytes(master))
        finally:
            wipe(plain)
        return atomic_write_bytes(path, header + sealed, mode=0o600, overwrite=overwrite)

    @classmethod
    def open(cls, path: Path, master: bytearray) -> "Vault":
        bindings, exceptions = _aead()
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise VaultError(f"vault {path} does not exist") from None
        except OSError as exc:
            raise VaultError(f"cannot read vault {path}: {exc.strerror}") from None
        if len(data) < HEADER.size + 16 or data[:8] != MAGIC:
            raise VaultError(f"{path} is not a keyedge vault")
        _, version, nonce = HEADER.unpack_from(data)
        if version != VERSION:
            raise VaultError(f"{path} is vault version {version}; this keyedge reads version {VERSION}")
        try:
            plain = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(data[HEADER.size:], data[:HEADER.size],
                                                                        nonce, bytes(master))
        except exceptions.CryptoError:
            raise VaultError(f"cannot open vault {path}: another master key, or the vault was tampered with") from None
        try:
            content = json.loads(plain)
            return cls(bytes.fromhex(content["publisher"]),
                       {k: bytes.fromhex(v) for k, v in content["devices"].items()},
                       {k: bytes.fromhex(v) for k, v in content.get("retired", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VaultError(f"vault {path} holds no keyedge fleet secrets") from None
