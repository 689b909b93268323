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

The sealed box is anonymous: anyone holding the device's public key can seal to it. So the publisher
signs the bundle (Ed25519, libsodium's ``crypto_sign_detached``) over a hash list of its ciphertext::

    h_i = SHA-256(chunk record i as stored: ciphertext || tag)
    D   = SHA-256(h_0 || h_1 || ... || h_{k-1})
    signature = Ed25519(publisher key, "keyedge-bundle-signature-v3\\0" || header bytes [0, 144) || D)

Every opener checks the header, then that the publisher's key is one it pins and that the signature
verifies, before it opens the content key, decrypts or parses anything inside.

Bundle format (version 3; integers little-endian)::

    0    8   magic "KEYEDGEB"
    8    2   version = 3
    10   2   flags: bit 0 = signed (the other bits are 0)
    12   4   chunk size = 1 MiB
    16   16  recipient fingerprint (first 16 bytes of SHA-256("keyedge-device-fingerprint-v1\\0" || pk))
    32   80  sealed content key (crypto_box_seal: 32-byte key + 48)
    112  32  publisher's Ed25519 public key (zero when unsigned)
    144  64  Ed25519 signature (zero when unsigned)
    208  ..  chunks: AES-256-GCM(chunk, nonce, additional data = bytes [0, 144)) || 16-byte tag;
             every chunk full but the last, which holds at least one byte

Bytes [0, 144) are the additional data of every chunk, so they are authenticated by the content key
as well as signed. The header holds nothing but the magic, the version, the flags, the chunk size, the
recipient's fingerprint, the sealed content key and the publisher's public key and signature.

Payload (plaintext): ``u32 n || index (n bytes of JSON: {"format": "keyedge-bundle", "version": 3,
"files": [{"name", "size"}]})``, then each file at the next 4096-byte boundary (zero padding). Files:
an ONNX model as ``model.onnx`` (the graph) + ``model.onnx.data`` (its large tensors, ONNX's
external-data layout, each tensor 64-byte aligned), or ``model.engine``; the manifest; and for gather
/ kernel artifacts the key (``key.bin``). A runner opens its bundle through a :class:`SealedLoader`
at each activation: it hands ONNX Runtime the tensors where they were decrypted (ONNX Runtime copies
them into its session) or deserializes the engine from the buffer, then wipes the buffer at once, so
nothing stays in plaintext between activations. A file name in the index is a plain name (no
separator, no ``..``, unique); any other is refused with the whole bundle.

Device keys (X25519) and publisher keys (Ed25519; the private one is its 32-byte seed), version 1:
``"KEYEDGED" (device) or "KEYEDGEP" (publisher) || u16 version || u8 kind (1 private, 2 public) || 32 bytes``.

Secrets in memory: the content key, the device's and the publisher's private keys and the plaintext
are kept in buffers keyedge owns and overwrites after use. What keyedge cannot wipe: PyNaCl keeps a
private key it is given as an immutable ``bytes`` inside its key object and returns the opened content
key as ``bytes``, and ``cryptography`` copies the content key into OpenSSL's cipher context; those
copies are freed (not zeroed) when the objects go.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from ..core.errors import KeyedgeError
from ..core.io import BytesLike, atomic_write_bytes, read_secret, reading, wipe
from ..core.keys import Key

MAGIC = b"KEYEDGEB"
VERSION = 3
KEY_MAGIC, PUBLISHER_MAGIC = b"KEYEDGED", b"KEYEDGEP"
KEY_VERSION = 1
PRIVATE, PUBLIC = 1, 2
HEADER = struct.Struct("<8sHHI16s80s32s64s")  # 208 bytes
AAD = 144  # header bytes every chunk authenticates and the signature covers: all but the signature
SIGNED = 0x1
SIGNATURE_DOMAIN = b"keyedge-bundle-signature-v3\0"
PUBLISHER_DOMAIN = b"keyedge-publisher-fingerprint-v1\0"
TRUST_ENV = "KEYEDGE_TRUSTED_PUBLISHERS"
CHUNK = 1 << 20
TAG = 16  # AES-GCM tag
ALIGN = 4096  # files in the payload start on page boundaries; tensors in model.onnx.data on 64 bytes
TENSOR_ALIGN = 64
EXTERNAL_DATA = "model.onnx.data"
FINGERPRINT_DOMAIN = b"keyedge-device-fingerprint-v1\0"
KEY_COMMAND_ENV = "KEYEDGE_DEVICE_KEY_COMMAND"
SUFFIX = ".kes"
KEY_FILE = 8 + 3 + 32  # a device or publisher key file


P = TypeVar("P", bound="_PublicKey")


class BundleError(KeyedgeError):
    """A bundle that cannot be opened: tampered, truncated, another device's, an unknown version."""


def _nacl():
    try:
        import nacl.bindings
        import nacl.exceptions
        import nacl.public
        import nacl.signing
    except ImportError:  # pragma: no cover - a declared dependency
        raise KeyedgeError("sealing needs PyNaCl (libsodium): pip install pynacl") from None
    return nacl


def fingerprint(public: bytes, domain: bytes = FINGERPRINT_DOMAIN) -> str:
    return hashlib.sha256(domain + public).digest()[:16].hex()


def _key_file(magic: bytes, kind: int, raw) -> bytes:
    return magic + struct.pack("<HB", KEY_VERSION, kind) + bytes(raw)


@dataclass(frozen=True)
class _PublicKey:
    """A public key file's 32 bytes: a device's (X25519) or a publisher's (Ed25519)."""
    MAGIC: ClassVar[bytes]
    DOMAIN: ClassVar[bytes]
    WHO: ClassVar[str]
    raw: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw, self.DOMAIN)

    def to_bytes(self) -> bytes:
        return _key_file(self.MAGIC, PUBLIC, self.raw)

    @classmethod
    def load(cls: type[P], path: Path) -> P:
        return cls(bytes(_parse_key(_read(path, f"{cls.WHO} public key"), cls.MAGIC, PUBLIC, str(path))))


@dataclass(frozen=True)
class DevicePublicKey(_PublicKey):
    """What a bundle is sealed to."""
    MAGIC: ClassVar[bytes] = KEY_MAGIC
    DOMAIN: ClassVar[bytes] = FINGERPRINT_DOMAIN
    WHO: ClassVar[str] = "device"


class DeviceKey:
    """A device's X25519 key pair. The private half is never printed, logged or put in metadata."""

    def __init__(self, private) -> None:
        nacl = _nacl()
        self._private = nacl.public.PrivateKey(bytes(private))
        self.public = DevicePublicKey(bytes(self._private.public_key))

    @classmethod
    def generate(cls) -> "DeviceKey":
        return cls(_random_secret(32))

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def save(self, path: Path, *, overwrite: bool = False) -> Path:
        return _save_secret(path, KEY_MAGIC, bytes(self._private), overwrite)

    @classmethod
    def from_bytes(cls, data, where: str) -> "DeviceKey":
        return cls(_parse_key(data, KEY_MAGIC, PRIVATE, where))

    def open_content_key(self, sealed: bytes) -> bytearray:
        nacl = _nacl()
        try:
            opened = nacl.public.SealedBox(self._private).decrypt(sealed)
        except nacl.exceptions.CryptoError:
            raise BundleError("cannot open the bundle: it was tampered with, or this is not its device's "
                              "private key") from None
        return bytearray(opened)  # PyNaCl's bytes copy cannot be wiped (see the module docstring)


@dataclass(frozen=True)
class PublisherPublicKey(_PublicKey):
    """The key a device pins to tell its publisher's bundles from anyone else's."""
    MAGIC: ClassVar[bytes] = PUBLISHER_MAGIC
    DOMAIN: ClassVar[bytes] = PUBLISHER_DOMAIN
    WHO: ClassVar[str] = "publisher"


class PublisherKey:
    """The publisher's Ed25519 signing key: it signs every bundle it seals. Never printed or logged."""

    def __init__(self, seed) -> None:
        nacl = _nacl()
        self._signing = nacl.signing.SigningKey(bytes(seed))
        self.public = PublisherPublicKey(bytes(self._signing.verify_key))

    @classmethod
    def generate(cls) -> "PublisherKey":
        return cls(_random_secret(32))

    @classmethod
    def load(cls, path: str | Path) -> "PublisherKey":
        """From a file, or from standard input (``-``)."""
        with read_secret(path, None, KEY_FILE, "publisher key", "publisher private key") as (data, where):
            return cls(_parse_key(data, PUBLISHER_MAGIC, PRIVATE, where))

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def save(self, path: Path, *, overwrite: bool = False) -> Path:
        return _save_secret(path, PUBLISHER_MAGIC, bytes(self._signing), overwrite)

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def seed(self) -> bytes:
        """The 32-byte Ed25519 seed, for a vault that keeps it (``keyedge fleet``); never print it."""
        return bytes(self._signing)


@dataclass(frozen=True)
class Trust:
    """The publishers whose bundles a device opens (their keys pinned), and whether it also opens unsigned
    bundles (development only)."""
    publishers: tuple[PublisherPublicKey, ...] = ()
    allow_unsigned: bool = False

    def check(self, data, where: str, hashes: list[bytes] | None = None) -> str | None:
        """The fingerprint of the publisher whose signature over the bundle ``data`` verifies (None for an
        unsigned bundle this trust allows); anything else is refused. Reads the ciphertext only
        (``hashes``: its chunk records' SHA-256, computed as it was read)."""
        _, _, flags = read_header(data, where)
        _, _, _, _, _, _, publisher, signature = HEADER.unpack_from(data)
        if not flags & SIGNED:
            if self.allow_unsigned:
                return None
            raise BundleError(f"{where} is not signed by a publisher: seal it with --sign-with PUBLISHER.key "
                              "(--allow-unsigned opens it for development only)")
        known = {p.raw: p for p in self.publishers}
        if publisher not in known:
            raise BundleError(f"{where} is signed by publisher {fingerprint(publisher, PUBLISHER_DOMAIN)}, which "
                              "is not trusted here (pass --trust PUBLISHER.pub or set " + TRUST_ENV + ")")
        nacl = _nacl()
        try:
            nacl.signing.VerifyKey(publisher).verify(_signed_message(data, hashes), signature)
        except nacl.exceptions.BadSignatureError:
            raise BundleError(f"{where}: the publisher's signature does not verify (the bundle was changed, "
                              "truncated or extended, or forged)") from None
        return known[publisher].fingerprint


def read_trust(paths=(), allow_unsigned: bool = False, *, echo=None) -> Trust:
    """Pinned publisher keys: the ``paths`` given (``--trust``, repeatable for rotation) and those of
    ``$KEYEDGE_TRUSTED_PUBLISHERS`` (public key files separated by ``os.pathsep``)."""
    env = [p for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p]
    keys = tuple(dict.fromkeys(PublisherPublicKey.load(Path(p)) for p in [*map(str, paths), *env]))
    if allow_unsigned and echo is not None:
        echo("WARNING: --allow-unsigned: bundles that no publisher signed are opened too (development only: "
             "anyone holding the device's public key can make one)", err=True)
    return Trust(keys, allow_unsigned)


@dataclass(frozen=True)
class Opener:
    """What a device needs to open its bundles: its private key and the publishers it trusts."""
    device: DeviceKey
    trust: Trust

    @property
    def fingerprint(self) -> str:
        return self.device.fingerprint


def _random_secret(n: int) -> bytearray:
    """n bytes from the kernel's CSPRNG, straight into a buffer keyedge can wipe (getrandom(2))."""
    buf = bytearray(n)
    view = (ctypes.c_char * n).from_buffer(buf)
    try:
        got = ctypes.CDLL(None, use_errno=True).getrandom(view, ctypes.c_size_t(n), 0)
    except AttributeError:  # pragma: no cover - a libc without getrandom
        got = -1
    del view
    if got != n:  # pragma: no cover
        buf[:] = os.urandom(n)
    return buf


def _save_secret(path: Path, magic: bytes, raw: bytes, overwrite: bool) -> Path:
    data = bytearray(_key_file(magic, PRIVATE, raw))
    try:
        return atomic_write_bytes(path, data, mode=0o600, overwrite=overwrite)
    finally:
        wipe(data)


def _read(path: Path, what: str) -> bytes:
    with reading(path, what):
        return Path(path).read_bytes()


def _parse_key(data, magic: bytes, kind: int, where: str) -> memoryview:
    """The 32 key bytes of a device or publisher key file (a view into ``data``)."""
    who = "device" if magic == KEY_MAGIC else "publisher"
    name = "private" if kind == PRIVATE else "public"
    if len(data) != 8 + 3 + 32 or bytes(data[:8]) != magic:
        other = {KEY_MAGIC: "a device key", PUBLISHER_MAGIC: "a publisher key"}.get(bytes(data[:8]))
        raise KeyedgeError(f"{where} is not a keyedge {who} {name} key" + (f" (it is {other})" if other else ""))
    version, got = struct.unpack_from("<HB", data, 8)
    if version != KEY_VERSION:
        raise KeyedgeError(f"{where} is a {who} key of unknown version {version}")
    if got != kind:
        raise KeyedgeError(f"{where} is a {who} {'public' if got == PUBLIC else 'private'} key, not a {name} key")
    return memoryview(data)[11:]


def read_device_key(path: str | Path | None = None, command: str | None = None) -> DeviceKey:
    """The device's private key: from a file, from standard input (``-``), or from the output of a
    command (``command``, or the environment's ``KEYEDGE_DEVICE_KEY_COMMAND``) -- e.g. one that unseals
    it from OP-TEE secure storage, the fTPM or a TPM 2.0 -- so it never has to lie on the disk."""
    command = command or (os.environ.get(KEY_COMMAND_ENV) if path is None else None)
    if path is not None or command:
        with read_secret(path, command, KEY_FILE, "device key", "device private key") as (data, where):
            return DeviceKey.from_bytes(data, where)
    raise KeyedgeError("a sealed bundle needs its device's private key: pass --device-key PATH (or -), "
                       f"--device-key-command CMD, or set {KEY_COMMAND_ENV}")


@dataclass(frozen=True)
class DeviceAccess:
    """Where a command gets what opens sealed bundles: the device's private key (a file, ``-`` for standard
    input, or a command: :func:`read_device_key`) and the pinned publisher keys (:func:`read_trust`)."""
    key: str | Path | None = None
    command: str | None = None
    trust: tuple[Path, ...] = ()
    allow_unsigned: bool = False

    def opener(self, echo=None) -> Opener:
        """Reads the trust first (no publisher pinned: only ``allow_unsigned`` opens), then the device key."""
        trust = read_trust(self.trust, self.allow_unsigned, echo=echo)
        if not trust.publishers and not trust.allow_unsigned:
            raise KeyedgeError("a sealed bundle opens only if its publisher is trusted: pass --trust PUBLISHER.pub "
                               f"(repeatable) or set {TRUST_ENV} (--allow-unsigned: development only)")
        return Opener(read_device_key(self.key, self.command), trust)

    def opener_for(self, artifacts: list[Path], echo=None) -> Opener | None:
        """:meth:`opener`, read only when a sealed bundle is among the artifacts."""
        return self.opener(echo) if any(Path(a).suffix == SUFFIX for a in artifacts) else None


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


def _record_spans(size: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk record (ciphertext || tag) in a bundle of ``size`` bytes."""
    return [(lo, min(size, lo + CHUNK + TAG)) for lo in range(HEADER.size, size, CHUNK + TAG)]


def _record_hash(view: memoryview, at: int, n: int) -> bytes:
    with view[at:at + n] as record:
        return hashlib.sha256(record).digest()


def _signed_message(data, hashes: list[bytes] | None = None) -> bytes:
    """What the publisher signs: the domain, header bytes [0, AAD) and the hash list of the chunk records
    (``hashes``: the records' SHA-256, when the reader already computed them)."""
    with memoryview(data) as view:
        if hashes is None:  # SHA-256 releases the GIL: hash the records on all cores
            with ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
                hashes = list(pool.map(lambda span: _record_hash(view, span[0], span[1] - span[0]),
                                       _record_spans(len(view))))
        return SIGNATURE_DOMAIN + bytes(view[:AAD]) + hashlib.sha256(b"".join(hashes)).digest()


def payload(files: Mapping[str, BytesLike]) -> bytearray:
    """The plaintext of a bundle of ``files``: ``u32 n || index || each file at the next page``."""
    check_names(list(files), "the bundle")
    index = json.dumps({"format": "keyedge-bundle", "version": VERSION,
                        "files": [{"name": name, "size": len(data)} for name, data in files.items()]}).encode()
    offsets, total = _layout(len(index), [len(d) for d in files.values()])
    plain = bytearray(total)
    plain[:4 + len(index)] = struct.pack("<I", len(index)) + index
    for offset, data in zip(offsets, files.values()):
        plain[offset:offset + len(data)] = data
    return plain


def seal(files: Mapping[str, BytesLike], recipient: DevicePublicKey, signer: PublisherKey | None = None) -> bytes:
    """Encrypt ``files`` to ``recipient`` and sign the bundle with ``signer`` (None: unsigned, which
    devices refuse unless they allow unsigned bundles); returns the bundle's bytes."""
    plain = payload(files)
    try:
        return seal_payload(plain, recipient, signer)
    finally:
        wipe(plain)


def seal_payload(plain, recipient: DevicePublicKey, signer: PublisherKey | None = None) -> bytes:
    """Encrypt and sign a bundle's plaintext as it is (:func:`payload` makes it from files)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nacl = _nacl()
    content_key = _random_secret(32)
    sealed_key = nacl.public.SealedBox(nacl.public.PublicKey(recipient.raw)).encrypt(bytes(content_key))
    publisher = signer.public.raw if signer is not None else bytes(32)
    header = HEADER.pack(MAGIC, VERSION, SIGNED if signer is not None else 0, CHUNK,
                         bytes.fromhex(recipient.fingerprint), sealed_key, publisher, bytes(64))
    n = max(1, (len(plain) + CHUNK - 1) // CHUNK)
    out = bytearray(HEADER.size + len(plain) + n * TAG)
    out[:HEADER.size] = header
    aead = AESGCM(content_key)
    wipe(content_key)
    with memoryview(plain) as src, memoryview(out) as dst:
        for i in range(n):
            chunk = src[i * CHUNK:(i + 1) * CHUNK]
            at = HEADER.size + i * (CHUNK + TAG)
            aead.encrypt_into(_nonce(i, i == n - 1), chunk, header[:AAD], dst[at:at + len(chunk) + TAG])
            chunk.release()
    if signer is not None:
        out[AAD:HEADER.size] = signer.sign(_signed_message(out))
    return bytes(out)


def read_header(data, where: str = "bundle") -> tuple[int, str, int]:
    """(version, recipient fingerprint, flags) of a bundle, after the checks that need no key."""
    if len(data) < HEADER.size:
        raise BundleError(f"{where} is truncated (or not a keyedge bundle)")
    magic, version, flags, chunk, fp, _, publisher, signature = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"{where} is not a keyedge sealed bundle")
    if version != VERSION:
        raise BundleError(f"{where} is bundle version {version}; this keyedge reads version {VERSION}"
                          + (" (seal the artifact again)" if version < VERSION else ""))
    if chunk != CHUNK or flags & ~SIGNED or (not flags & SIGNED and (any(publisher) or any(signature))):
        raise BundleError(f"{where} was tampered with (its header's chunk size or flags)")
    return version, fp.hex(), flags


def bundle_flags(path: Path) -> int:
    """The flags of a bundle file (``SIGNED``), after the checks that need no key (its header only)."""
    with reading(path, "bundle"), open(path, "rb") as fh:
        return read_header(fh.read(HEADER.size), str(path))[2]


def check_names(names: list[str], where: str) -> None:
    """Names of a bundle's files: plain, relative and unique (``model.onnx``), never a path, no control
    characters (they would be echoed to a terminal), at most 255 characters."""
    for name in names:
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 255):
            raise BundleError(f"{where} names a file {name!r}: a bundle's files have plain names only")
    if len(set(names)) != len(names):
        raise BundleError(f"{where} names a file twice")


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


def _decrypt(body: memoryview, header: bytes, content_key: bytearray, where: str) -> mmap.mmap:
    """Every chunk authenticated and decrypted into one fresh buffer, in parallel; refused as a whole."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    n = (len(body) + CHUNK + TAG - 1) // (CHUNK + TAG)
    total = len(body) - n * TAG
    if n == 0 or len(body) - (n - 1) * (CHUNK + TAG) <= TAG:
        body.release()
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
    publisher: str | None = None  # the fingerprint of the trusted publisher that signed it (None: unsigned)
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


def unseal(data, opener: Opener, where: str = "bundle", hashes: list[bytes] | None = None) -> Plaintext:
    """Verify a bundle's publisher, then decrypt it in memory; returns its files. Any change, truncation
    or extension is refused, and so is a bundle no trusted publisher signed. ``hashes``: the SHA-256 of
    its chunk records, where the reader computed them over ``data`` already."""
    _, fp, _ = read_header(data, where)
    publisher = opener.trust.check(data, where, hashes)  # before anything inside is opened or parsed
    device = opener.device
    if fp != device.fingerprint:
        raise BundleError(f"{where} is sealed to device {fp}, not to this device ({device.fingerprint})")
    header = bytes(data[:HEADER.size])
    content_key = device.open_content_key(HEADER.unpack(header)[5])
    try:
        with memoryview(data) as view:
            buffer = _decrypt(view[HEADER.size:], header[:AAD], content_key, where)
    finally:
        wipe(content_key)
    plain = Plaintext(buffer, {}, publisher)
    try:
        plain.spans = _index(plain.buffer, where)
    except BaseException:
        plain.wipe()
        raise
    return plain


def _index(buffer: mmap.mmap, where: str) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) from the payload's index; anything malformed is refused as a whole."""
    bad = BundleError(f"{where} has an unreadable index")
    if len(buffer) < 4:
        raise bad
    (n,) = struct.unpack_from("<I", buffer)
    try:
        index = json.loads(bytes(buffer[4:4 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad from None
    files = index.get("files") if isinstance(index, dict) else None
    if (not isinstance(files, list) or index.get("format") != "keyedge-bundle" or index.get("version") != VERSION
            or not all(isinstance(f, dict) and isinstance(f.get("size"), int) and not isinstance(f["size"], bool)
                       and 0 <= f["size"] <= len(buffer) for f in files)):
        raise bad
    names = [f.get("name") for f in files]
    check_names(names, where)
    offsets, total = _layout(n, [f["size"] for f in files])
    if 4 + n > len(buffer) or total != len(buffer):
        raise bad
    return {name: (offset, f["size"]) for name, f, offset in zip(names, files, offsets)}


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
    model_name: str  # model.onnx (with model.onnx.data when it has large tensors), model.xml (with model.bin)
    # or model.engine
    manifest_text: str
    plain: Plaintext

    def key(self) -> Key | None:
        """The key a gather / kernel bundle holds (None for the others)."""
        if "key.bin" not in self.plain.spans:
            return None
        with self.plain.view("key.bin") as data:
            return Key.from_bytes(data, source=f"{self.path} (sealed key)")

    def wipe(self) -> None:
        self.plain.wipe()


def _read_private(path: Path) -> tuple[mmap.mmap, list[bytes]]:
    """The bundle's bytes, read once into private memory, and the SHA-256 of each chunk record, hashed on
    the other cores while the next records are read: what is verified is what is decrypted, whatever happens
    to the file meanwhile (a shared mapping would show another process's writes, and a file truncated
    under it would kill the process with SIGBUS)."""
    with reading(path, "bundle"), open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < HEADER.size:
            raise BundleError(f"{path} is truncated (or not a keyedge bundle)")
        buf = mmap.mmap(-1, size + 1, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # ciphertext: nothing to hide
        spans = [(0, HEADER.size)] + _record_spans(size)
        futures, complete = [], True
        with ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool, memoryview(buf) as view:
            for i, (lo, hi) in enumerate(spans):
                at = lo
                while at < hi and (n := fh.readinto(view[at:hi])):
                    at += n
                if at < hi:  # the file is shorter than it was
                    complete = False
                    break
                if i:  # a chunk record: hashed while the next one is read
                    futures.append(pool.submit(_record_hash, view, lo, hi - lo))
            else:
                complete = not fh.readinto(view[size:size + 1])  # and not longer
            hashes = [f.result() for f in futures]
        if not complete:
            buf.close()
            raise BundleError(f"{path} changed while it was read: open it again")
        buf.resize(size)
        return buf, hashes


def open_bundle(path: Path, opener: Opener) -> Bundle:
    data, hashes = _read_private(Path(path))
    try:
        plain = unseal(data, opener, str(path), hashes)
    finally:
        data.close()
    spans = plain.spans
    model_name = next((n for n in ("model.engine", "model.onnx", "model.xml") if n in spans), None)
    manifest_name = {"model.engine": "model.engine.json", "model.onnx": "manifest.json",
                     "model.xml": "manifest.json"}.get(model_name or "")
    try:
        if model_name is None or manifest_name not in spans:
            raise BundleError(f"{path} holds no model and manifest")
        text = plain.read(manifest_name).decode("utf-8")
    except UnicodeDecodeError:
        plain.wipe()
        raise BundleError(f"{path}: its manifest is not UTF-8 text") from None
    except BaseException:
        plain.wipe()
        raise
    return Bundle(Path(path), model_name, text, plain)


@dataclass(frozen=True)
class SealedLoader:
    """Opens a sealed bundle each time it is called, as Polygraphy's loaders build what a runner needs:
    a runner calls it at every activation and wipes what it returned once its model is loaded.
    ``manifest_text``: the manifest the bundle was resolved with; a bundle that no longer holds it (the
    file was replaced since) is refused."""
    path: Path
    opener: Opener
    manifest_text: str | None = None

    def __call__(self) -> Bundle:
        bundle = open_bundle(self.path, self.opener)
        if self.manifest_text is not None and bundle.manifest_text != self.manifest_text:
            bundle.wipe()
            raise BundleError(f"{self.path} changed since it was opened (another manifest): open it again")
        return bundle
