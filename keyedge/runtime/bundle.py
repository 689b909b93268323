"""Sealed per-device bundles: a device's model (and key) encrypted to that device, opened in memory.

Construction (no home-made primitives): a fresh 32-byte content key encrypts the payload with
AES-256-GCM (OpenSSL, through ``cryptography`` in Python and libcrypto in the C++ runtime) in the
STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizar ("Online Authenticated-Encryption and
its Nonce-Reuse Misuse-Resistance", CRYPTO 2015), with the nonce layout of the age file format: chunk
``i`` of the payload (1 MiB each) is sealed under nonce ``i`` as 11 big-endian bytes || ``0x01`` for
the last chunk, ``0x00`` otherwise, so reordering, truncation and extension are detected. The content
key is encrypted to the device's X25519 public key with libsodium's sealed box (``crypto_box_seal``;
PyNaCl / libsodium). Chunks are independent, so opening decrypts them on all cores, straight into one
page-aligned buffer.

Bundle format (version 2; integers little-endian)::

    0    8   magic "KEYEDGEB"
    8    2   version = 2
    10   2   flags = 0 (reserved)
    12   4   chunk size = 1 MiB
    16   16  recipient fingerprint (first 16 bytes of SHA-256("keyedge-device-fingerprint-v1\\0" || pk))
    32   80  sealed content key (crypto_box_seal: 32-byte key + 48)
    112  ..  chunks: AES-256-GCM(chunk, nonce, additional data = bytes [0, 112)) || 16-byte tag;
             every chunk full but the last, which holds at least one byte

The header is the additional data of every chunk, so it is authenticated. It holds nothing but the
magic, the version, the chunk size, the recipient's fingerprint and the sealed content key.

Payload (plaintext): ``u32 n || index (n bytes of JSON: {"format": "keyedge-bundle", "version": 2,
"files": [{"name", "size"}]})``, then each file at the next 4096-byte boundary (zero padding). Files:
an ONNX model as ``model.onnx`` (the graph) + ``model.onnx.data`` (its large tensors, ONNX's
external-data layout, each tensor 64-byte aligned), or ``model.engine``; the manifest; and for gather
/ kernel artifacts the key (``key.bin``). A runner opens its bundle through a :class:`SealedLoader`
at each activation: it hands ONNX Runtime the tensors where they were decrypted (ONNX Runtime copies
them into its session) or deserializes the engine from the buffer, then wipes the buffer at once, so
nothing stays in plaintext between activations.

Device keys (version 1): ``"KEYEDGED" || u16 version || u8 kind (1 private, 2 public) || 32 bytes``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import shlex
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes
from ..core.keys import Key

MAGIC = b"KEYEDGEB"
VERSION = 2
KEY_MAGIC = b"KEYEDGED"
KEY_VERSION = 1
PRIVATE, PUBLIC = 1, 2
HEADER = struct.Struct("<8sHHI16s80s")  # 112 bytes
CHUNK = 1 << 20
TAG = 16  # AES-GCM tag
ALIGN = 4096  # files in the payload start on page boundaries; tensors in model.onnx.data on 64 bytes
TENSOR_ALIGN = 64
EXTERNAL_DATA = "model.onnx.data"
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


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """File errors as one line."""
    try:
        yield
    except FileNotFoundError:
        raise KeyedgeError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise KeyedgeError(f"cannot read {what} {path}: {exc.strerror}") from None


def _read(path: Path, what: str) -> bytes:
    with _reading(path, what):
        return Path(path).read_bytes()


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


def device_key_for(artifacts: list[Path], path: str | Path | None = None,
                   command: str | None = None) -> DeviceKey | None:
    """The device key, read (:func:`read_device_key`) only when a sealed bundle is among the artifacts."""
    if not any(Path(a).suffix == SUFFIX for a in artifacts):
        return None
    return read_device_key(path, command)


# ---- seal / unseal ---------------------------------------------------------------------------

def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _layout(index_size: int, sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of the files in the payload, and its total size."""
    offsets, end = [], 4 + index_size
    for size in sizes:
        offsets.append(_align(end, ALIGN))
        end = offsets[-1] + size
    return offsets, end


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def seal(files: dict[str, bytes], recipient: DevicePublicKey) -> bytes:
    """Encrypt ``files`` to ``recipient``; returns the bundle's bytes."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nacl = _nacl()
    index = json.dumps({"format": "keyedge-bundle", "version": VERSION,
                        "files": [{"name": name, "size": len(data)} for name, data in files.items()]}).encode()
    offsets, total = _layout(len(index), [len(d) for d in files.values()])
    plain = bytearray(total)
    plain[:4 + len(index)] = struct.pack("<I", len(index)) + index
    for offset, data in zip(offsets, files.values()):
        plain[offset:offset + len(data)] = data
    content_key = AESGCM.generate_key(bit_length=256)
    sealed_key = nacl.public.SealedBox(nacl.public.PublicKey(recipient.raw)).encrypt(content_key)
    header = HEADER.pack(MAGIC, VERSION, 0, CHUNK, bytes.fromhex(recipient.fingerprint), sealed_key)
    n = (total + CHUNK - 1) // CHUNK
    out = bytearray(HEADER.size + total + n * TAG)
    out[:HEADER.size] = header
    aead, src, dst = AESGCM(content_key), memoryview(plain), memoryview(out)
    for i in range(n):
        chunk = src[i * CHUNK:(i + 1) * CHUNK]
        at = HEADER.size + i * (CHUNK + TAG)
        aead.encrypt_into(_nonce(i, i == n - 1), chunk, header, dst[at:at + len(chunk) + TAG])
    src.release()
    wipe(plain)
    dst.release()
    return bytes(out)


def read_header(data, where: str = "bundle") -> tuple[int, str]:
    """(version, recipient fingerprint) of a bundle, after the checks that need no key."""
    if len(data) < HEADER.size:
        raise BundleError(f"{where} is truncated (or not a keyedge bundle)")
    magic, version, _, chunk, fp, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"{where} is not a keyedge sealed bundle")
    if version != VERSION:
        raise BundleError(f"{where} is bundle version {version}; this keyedge reads version {VERSION}"
                          + (" (seal the artifact again)" if version < VERSION else ""))
    if chunk != CHUNK:
        raise BundleError(f"{where} was tampered with (chunk size {chunk})")
    return version, fp.hex()


def bundle_recipient(path: Path) -> str:
    """The recipient fingerprint of a bundle file, after the checks that need no key (its header only)."""
    with _reading(path, "bundle"), open(path, "rb") as fh:
        return read_header(fh.read(HEADER.size), str(path))[1]


def _secret_buffer(size: int) -> mmap.mmap:
    """Private anonymous memory for plaintext: page-aligned, not shared with child processes, on huge
    pages where the kernel allows (far fewer page faults), and left out of core dumps."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in ("MADV_HUGEPAGE", "MADV_DONTDUMP"):
        if hasattr(mmap, advice):
            try:
                buf.madvise(getattr(mmap, advice))
            except OSError:  # pragma: no cover - a kernel without it
                pass
    return buf


def _decrypt(body: memoryview, header: bytes, content_key: bytes, where: str) -> mmap.mmap:
    """Every chunk authenticated and decrypted into one fresh buffer, in parallel; refused as a whole."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    n = (len(body) + CHUNK + TAG - 1) // (CHUNK + TAG)
    total = len(body) - n * TAG
    if n == 0 or len(body) - (n - 1) * (CHUNK + TAG) <= TAG:
        raise BundleError(f"{where} is truncated")
    out = _secret_buffer(total)
    dst, aead = memoryview(out), AESGCM(content_key)

    def run(first: int, stop: int) -> bool:
        for i in range(first, stop):
            chunk = body[i * (CHUNK + TAG):(i + 1) * (CHUNK + TAG)]
            try:
                aead.decrypt_into(_nonce(i, i == n - 1), chunk, header, dst[i * CHUNK:i * CHUNK + len(chunk) - TAG])
            except InvalidTag:
                return False
        return True

    workers = max(1, min(os.cpu_count() or 1, 8, n // 4))
    bounds = [n * w // workers for w in range(workers + 1)]
    try:
        if workers == 1:
            ok = [run(0, n)]
        else:  # AES-GCM releases the GIL: one contiguous range of chunks per core
            with ThreadPoolExecutor(workers) as pool:
                ok = list(pool.map(run, bounds[:-1], bounds[1:]))
    finally:
        dst.release()
        body.release()
    if not all(ok):
        wipe(out)
        out.close()
        raise BundleError(f"{where} was tampered with (authentication failed): changed, truncated or extended")
    return out


@dataclass
class Plaintext:
    """A bundle's files, decrypted into one buffer that only keyedge holds; wiped when done."""
    buffer: mmap.mmap
    spans: dict[str, tuple[int, int]]  # name -> (offset, size) in buffer
    wiped: bool = False

    def read(self, name: str) -> bytes:
        offset, size = self.spans[name]
        return self.buffer[offset:offset + size]

    def view(self, name: str) -> memoryview:
        """The file's bytes where they lie (release the view before :meth:`wipe`)."""
        offset, size = self.spans[name]
        return memoryview(self.buffer)[offset:offset + size]

    def wipe(self) -> None:
        if self.wiped:
            return
        self.wiped = True
        wipe(self.buffer)
        try:
            self.buffer.close()
        except BufferError:  # a library still holds a view: zeroed; unmapped when it lets go
            pass

    def __del__(self) -> None:  # a bundle opened but never run is wiped too
        try:
            self.wipe()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def unseal(data, device: DeviceKey, where: str = "bundle") -> Plaintext:
    """Decrypt a bundle in memory; returns its files. Any change, truncation or extension is refused."""
    _, fp = read_header(data, where)
    if fp != device.fingerprint:
        raise BundleError(f"{where} is sealed to device {fp}, not to this device ({device.fingerprint})")
    header = bytes(data[:HEADER.size])
    content_key = device.open_content_key(HEADER.unpack(header)[5])
    with memoryview(data) as view:
        plain = Plaintext(_decrypt(view[HEADER.size:], header, content_key, where), {})
    try:
        (n,) = struct.unpack_from("<I", plain.buffer)
        index = json.loads(plain.buffer[4:4 + n])
        entries = [(str(f["name"]), int(f["size"])) for f in index["files"]]
        offsets, total = _layout(n, [size for _, size in entries])
        if total != len(plain.buffer) or len({name for name, _ in entries}) != len(entries):
            raise ValueError
    except (ValueError, KeyError, TypeError, struct.error):
        plain.wipe()
        raise BundleError(f"{where} has an unreadable index") from None
    plain.spans = {name: (offset, size) for (name, size), offset in zip(entries, offsets)}
    return plain


def wipe(buffer) -> None:
    """Overwrite a writable buffer keyedge owns (immutable copies made by libraries cannot be wiped)."""
    if len(buffer):
        view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        ctypes.memset(view, 0, len(buffer))
        del view


def external_layout(model: bytes) -> tuple[bytes, bytes]:
    """An ONNX model as (graph, tensors): tensors of 1 KiB and more move to one external-data file
    (``model.onnx.data``, ONNX's external-data layout, each tensor 64-byte aligned)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    proto = onnx.load_model_from_string(model)
    data = bytearray()
    for tensor in proto.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
            offset = _align(len(data), TENSOR_ALIGN)
            data += bytes(offset - len(data)) + tensor.raw_data
            set_external_data(tensor, EXTERNAL_DATA, offset=offset, length=len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    return proto.SerializeToString(), bytes(data)


def inline_layout(graph: bytes, data) -> bytes:
    """The inverse of :func:`external_layout`: one ONNX protobuf with every tensor inside it, for
    parsers that take a model's bytes only (TensorRT's). ``data``: the external tensors' bytes."""
    import onnx

    proto = onnx.load_model_from_string(graph)
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        if data is None or info.get("location") != EXTERNAL_DATA or length < 0 or offset + length > len(data):
            raise BundleError(f"tensor {tensor.name} lies outside {EXTERNAL_DATA}")
        tensor.raw_data = bytes(data[offset:offset + length])
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return proto.SerializeToString()


# ---- bundles opened in memory ------------------------------------------------------------------

@dataclass
class Bundle:
    """An opened bundle, in memory only: the model (and the key, if it has one) in a buffer keyedge
    wipes as soon as the runner has loaded the model, and the manifest."""
    path: Path
    model_name: str  # model.onnx (with model.onnx.data when it has large tensors) or model.engine
    manifest_text: str
    plain: Plaintext

    def key(self) -> Key | None:
        """The key a gather / kernel bundle holds (None for the others)."""
        if "key.bin" not in self.plain.spans:
            return None
        return Key.from_bytes(self.plain.read("key.bin"), source=f"{self.path} (sealed key)")

    def wipe(self) -> None:
        self.plain.wipe()


def _map(path: Path) -> mmap.mmap:
    """The bundle's bytes, mapped read-only (no copy; the file is closed once decrypted)."""
    with _reading(path, "bundle"), open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < HEADER.size:
            raise BundleError(f"{path} is truncated (or not a keyedge bundle)")
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def open_bundle(path: Path, device: DeviceKey) -> Bundle:
    mapped = _map(Path(path))
    try:
        plain = unseal(mapped, device, str(path))
    finally:
        mapped.close()
    spans = plain.spans
    model_name = next((n for n in ("model.engine", "model.onnx") if n in spans), None)
    manifest_name = {"model.engine": "model.engine.json", "model.onnx": "manifest.json"}.get(model_name or "")
    if model_name is None or manifest_name not in spans:
        plain.wipe()
        raise BundleError(f"{path} holds no model and manifest")
    return Bundle(Path(path), model_name, plain.read(manifest_name).decode(), plain)


@dataclass(frozen=True)
class SealedLoader:
    """Opens a sealed bundle each time it is called, as Polygraphy's loaders build what a runner needs:
    a runner calls it at every activation and wipes what it returned once its model is loaded.
    ``manifest_text``: the manifest the bundle was resolved with; a bundle that no longer holds it (the
    file was replaced since) is refused."""
    path: Path
    device: DeviceKey
    manifest_text: str | None = None

    def __call__(self) -> Bundle:
        bundle = open_bundle(self.path, self.device)
        if self.manifest_text is not None and bundle.manifest_text != self.manifest_text:
            bundle.wipe()
            raise BundleError(f"{self.path} changed since it was opened (another manifest): open it again")
        return bundle
