"""Sealed per-device bundles: a device's model (and key) encrypted to that device, opened in memory.

Construction (libsodium, through PyNaCl in Python and libsodium in the C++ runtime; no home-made
primitives): a fresh 32-byte content key encrypts the payload with ``crypto_secretstream_xchacha20poly1305``
(1 MiB messages, the last tagged FINAL, so truncation and reordering are detected); the content key
is encrypted to the device's X25519 public key with libsodium's sealed box (``crypto_box_seal``).

Bundle format (version 1; integers little-endian)::

    0    8   magic "KEYEDGEB"
    8    2   version = 1
    10   2   flags = 0 (reserved)
    12   16  recipient fingerprint (first 16 bytes of SHA-256("keyedge-device-fingerprint-v1\\0" || pk))
    28   80  sealed content key (crypto_box_seal: 32-byte key + 48)
    108  24  secretstream header
    132  ..  messages: u32 ciphertext length || ciphertext; the first message's additional data is
             bytes [0, 132), which authenticates the plaintext header

Plaintext: message 0 is a JSON index ``{"format": "keyedge-bundle", "version": 1, "files": [{"name",
"size"}]}``; the files' bytes follow in 1 MiB messages; an empty FINAL message ends the stream.
The plaintext header holds nothing but the magic, the version, the recipient's fingerprint and what
the construction needs. Files in a bundle: the model (``model.onnx`` or ``model.engine``), its
manifest, and for gather / kernel artifacts the key file (``key.bin``).

Device keys (version 1): ``"KEYEDGED" || u16 version || u8 kind (1 private, 2 public) || 32 bytes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import KeyedgeError
from .io import atomic_write_bytes

MAGIC = b"KEYEDGEB"
VERSION = 1
KEY_MAGIC = b"KEYEDGED"
KEY_VERSION = 1
PRIVATE, PUBLIC = 1, 2
HEADER = struct.Struct("<8sHH16s80s24s")  # 132 bytes
CHUNK = 1 << 20
FINGERPRINT_DOMAIN = b"keyedge-device-fingerprint-v1\0"
KEY_COMMAND_ENV = "KEYEDGE_DEVICE_KEY_COMMAND"
SUFFIX = ".kes"


class BundleError(KeyedgeError):
    """A bundle that cannot be opened: tampered, truncated, another device's, an unknown version."""


def _nacl():
    try:
        import nacl.bindings
        import nacl.exceptions
        import nacl.public
    except ImportError:  # pragma: no cover - a declared dependency
        raise KeyedgeError("sealing needs PyNaCl (libsodium): pip install pynacl") from None
    return nacl


def fingerprint(public: bytes) -> str:
    return hashlib.sha256(FINGERPRINT_DOMAIN + public).digest()[:16].hex()


@dataclass(frozen=True)
class DevicePublicKey:
    raw: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    def to_bytes(self) -> bytes:
        return KEY_MAGIC + struct.pack("<HB", KEY_VERSION, PUBLIC) + self.raw

    @classmethod
    def load(cls, path: Path) -> "DevicePublicKey":
        return cls(_parse_key(_read(path, "device public key"), PUBLIC, str(path)))


class DeviceKey:
    """A device's X25519 key pair. The private half is never printed, logged or put in metadata."""

    def __init__(self, private: bytes) -> None:
        nacl = _nacl()
        self._private = nacl.public.PrivateKey(private)
        self.public = DevicePublicKey(bytes(self._private.public_key))

    @classmethod
    def generate(cls) -> "DeviceKey":
        nacl = _nacl()
        return cls(bytes(nacl.public.PrivateKey.generate()))

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def to_bytes(self) -> bytes:
        return KEY_MAGIC + struct.pack("<HB", KEY_VERSION, PRIVATE) + bytes(self._private)

    def save(self, path: Path, *, overwrite: bool = False) -> Path:
        return atomic_write_bytes(path, self.to_bytes(), mode=0o600, overwrite=overwrite)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "DeviceKey":
        return cls(_parse_key(data, PRIVATE, where))

    def open_content_key(self, sealed: bytes) -> bytes:
        nacl = _nacl()
        try:
            return nacl.public.SealedBox(self._private).decrypt(sealed)
        except nacl.exceptions.CryptoError:
            raise BundleError("cannot open the bundle: it was tampered with, or this is not its device's "
                              "private key") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyedgeError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise KeyedgeError(f"cannot read {what} {path}: {exc.strerror}") from None


def _parse_key(data: bytes, kind: int, where: str) -> bytes:
    name = "private" if kind == PRIVATE else "public"
    if len(data) != 8 + 3 + 32 or data[:8] != KEY_MAGIC:
        raise KeyedgeError(f"{where} is not a keyedge device {name} key")
    version, got = struct.unpack_from("<HB", data, 8)
    if version != KEY_VERSION:
        raise KeyedgeError(f"{where} is a device key of unknown version {version}")
    if got != kind:
        raise KeyedgeError(f"{where} is a device {'public' if got == PUBLIC else 'private'} key, not a {name} key")
    return data[11:]


def read_device_key(path: str | Path | None = None, command: str | None = None) -> DeviceKey:
    """The device's private key: from a file, from standard input (``-``), or from the output of a
    command (``command``, or the environment's ``KEYEDGE_DEVICE_KEY_COMMAND``) -- e.g. one that unseals
    it from OP-TEE secure storage, the fTPM or a TPM 2.0 -- so it never has to lie on the disk."""
    command = command or (os.environ.get(KEY_COMMAND_ENV) if path is None else None)
    if path is not None and str(path) == "-":
        return DeviceKey.from_bytes(sys.stdin.buffer.read(), "standard input")
    if path is not None:
        return DeviceKey.from_bytes(_read(Path(path), "device key"), str(path))
    if command:
        try:
            proc = subprocess.run(shlex.split(command), capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeyedgeError(f"the device-key command failed to run: {exc}") from None
        if proc.returncode != 0:
            raise KeyedgeError(f"the device-key command exited with {proc.returncode}")
        return DeviceKey.from_bytes(proc.stdout, "the device-key command's output")
    raise KeyedgeError("a sealed bundle needs its device's private key: pass --device-key PATH (or -), "
                       f"--device-key-command CMD, or set {KEY_COMMAND_ENV}")


# ---- seal / unseal ---------------------------------------------------------------------------

def seal(files: dict[str, bytes], recipient: DevicePublicKey) -> bytes:
    """Encrypt ``files`` to ``recipient``; returns the bundle's bytes."""
    nacl = _nacl()
    b = nacl.bindings
    content_key = b.crypto_secretstream_xchacha20poly1305_keygen()
    sealed_key = nacl.public.SealedBox(nacl.public.PublicKey(recipient.raw)).encrypt(content_key)
    state = b.crypto_secretstream_xchacha20poly1305_state()
    stream_header = b.crypto_secretstream_xchacha20poly1305_init_push(state, content_key)
    header = HEADER.pack(MAGIC, VERSION, 0, bytes.fromhex(recipient.fingerprint), sealed_key, stream_header)
    out = [header]

    def push(message: bytes, ad: bytes | None = None, final: bool = False) -> None:
        tag = b.crypto_secretstream_xchacha20poly1305_TAG_FINAL if final else 0
        c = b.crypto_secretstream_xchacha20poly1305_push(state, message, ad, tag)
        out.append(struct.pack("<I", len(c)) + c)

    index = {"format": "keyedge-bundle", "version": VERSION,
             "files": [{"name": name, "size": len(data)} for name, data in files.items()]}
    push(json.dumps(index).encode(), ad=header)
    for data in files.values():
        for i in range(0, len(data), CHUNK):
            push(bytes(data[i:i + CHUNK]))
    push(b"", final=True)
    return b"".join(out)


def read_header(data: bytes | bytearray, where: str = "bundle") -> tuple[int, str]:
    """(version, recipient fingerprint) of a bundle, after the checks that need no key."""
    if len(data) < HEADER.size:
        raise BundleError(f"{where} is truncated (or not a keyedge bundle)")
    magic, version, _, fp, _, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"{where} is not a keyedge sealed bundle")
    if version != VERSION:
        raise BundleError(f"{where} is bundle version {version}; this keyedge reads version {VERSION}")
    return version, fp.hex()


def unseal(data: bytes | bytearray, device: DeviceKey, where: str = "bundle") -> dict[str, bytearray]:
    """Decrypt a bundle in memory; returns its files. Any change, truncation or extension is refused."""
    nacl = _nacl()
    b = nacl.bindings
    _, fp = read_header(data, where)
    if fp != device.fingerprint:
        raise BundleError(f"{where} is sealed to device {fp}, not to this device ({device.fingerprint})")
    header = bytes(data[:HEADER.size])
    _, _, _, _, sealed_key, stream_header = HEADER.unpack(header)
    content_key = device.open_content_key(sealed_key)
    state = b.crypto_secretstream_xchacha20poly1305_state()
    b.crypto_secretstream_xchacha20poly1305_init_pull(state, stream_header, content_key)
    view, pos = memoryview(data), HEADER.size

    def pull(ad: bytes | None = None) -> tuple[bytes, int]:
        nonlocal pos
        if pos + 4 > len(view):
            raise BundleError(f"{where} is truncated")
        (n,) = struct.unpack_from("<I", view, pos)
        if n > CHUNK + b.crypto_secretstream_xchacha20poly1305_ABYTES or pos + 4 + n > len(view):
            raise BundleError(f"{where} is truncated or corrupted")
        try:
            message, tag = b.crypto_secretstream_xchacha20poly1305_pull(state, bytes(view[pos + 4:pos + 4 + n]), ad)
        except nacl.exceptions.CryptoError:
            raise BundleError(f"{where} was tampered with (authentication failed)") from None
        pos += 4 + n
        return message, tag

    first, tag = pull(ad=header)
    try:
        index = json.loads(first)
        entries = [(str(f["name"]), int(f["size"])) for f in index["files"]]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{where} has an unreadable index") from None
    files: dict[str, bytearray] = {}
    for name, size in entries:
        buf, filled = bytearray(size), 0  # allocated once, filled in place
        while filled < size:
            message, tag = pull()
            if tag == b.crypto_secretstream_xchacha20poly1305_TAG_FINAL or filled + len(message) > size:
                raise BundleError(f"{where} is truncated or corrupted ({name})")
            buf[filled:filled + len(message)] = message
            filled += len(message)
        files[name] = buf
    message, tag = pull()
    if tag != b.crypto_secretstream_xchacha20poly1305_TAG_FINAL or message or pos != len(view):
        raise BundleError(f"{where} has data after its end, or is missing its end")
    return files


def wipe(buffer: bytearray) -> None:
    """Overwrite a buffer keyedge owns (immutable copies made by libraries cannot be wiped)."""
    import ctypes

    if buffer:
        ctypes.memset((ctypes.c_char * len(buffer)).from_buffer(buffer), 0, len(buffer))


# ---- artifacts ---------------------------------------------------------------------------------

@dataclass
class Bundle:
    """An opened bundle, in memory only: the model's bytes, its manifest, and the key if it has one."""
    path: Path
    model_name: str
    model: bytearray
    manifest_text: str
    key_bytes: bytearray | None

    def wipe(self) -> None:
        wipe(self.model)
        if self.key_bytes is not None:
            wipe(self.key_bytes)


def open_bundle(path: Path, device: DeviceKey) -> Bundle:
    files = unseal(_read(path, "bundle"), device, str(path))
    model_name = next((n for n in ("model.engine", "model.onnx") if n in files), None)
    manifest_name = {"model.engine": "model.engine.json", "model.onnx": "manifest.json"}.get(model_name or "")
    if model_name is None or manifest_name not in files:
        raise BundleError(f"{path} holds no model and manifest")
    manifest = files.pop(manifest_name)
    return Bundle(Path(path), model_name, files[model_name], manifest.decode(), files.get("key.bin"))


def seal_artifact(artifact_dir: Path, recipient: DevicePublicKey, key=None) -> tuple[bytes, dict]:
    """The bundle for an export or build directory: model, manifest and (if it takes one) the key."""
    from .artifacts import ArtifactManifest, check_key, needs_key, open_artifact

    art = open_artifact(artifact_dir)
    if art.kind == "run":
        raise KeyedgeError(f"{artifact_dir} is a training run: export it first; a device gets an artifact")
    manifest = art.manifest
    assert isinstance(manifest, ArtifactManifest)
    check_key(manifest, key, f"artifact {artifact_dir}", strict=True)
    files = {art.path.name: art.path.read_bytes(), art.manifest_path.name: manifest.to_json().encode()}
    if needs_key(manifest):
        files["key.bin"] = key.to_bytes()
    summary = {"model": art.path.name, "fold_mode": manifest.fold_mode, "precision": manifest.precision,
               "holds_key": needs_key(manifest) or manifest.contains_key, "recipient": recipient.fingerprint}
    return seal(files, recipient), summary
