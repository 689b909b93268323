"""Write the seed corpus of keyedge's C++ fuzz targets (``tests/fuzz/corpus/<target>/``) and the package config
of the fuzz build (``tests/fuzz/keyedge_model_config.hpp``). Run it once from the repository root
(``python tests/fuzz/make_corpus.py``); its outputs are committed.

Seeds named ``ok-*`` must be accepted by their target and ``bad-*`` refused with a keyedge::Error (the
driver's ``--check-names``). The ``ok-artifact-*.json`` and ``ok-build-plan.json`` manifests are from a real
``keyedge export`` / ``keyedge build --plan-only`` of a tiny model, and every other seed is derived from
them. The binary seeds (key files, publisher keys, bundle payloads, sealed bundles) are written from the
formats' specifications with PyNaCl and ``cryptography`` alone, not with keyedge's own writers, so the C++
readers are checked against an independent writer. The bundles are sealed to one fixed device key and
signed with one fixed publisher key (32 bytes of 0x22 and the Ed25519 seed of 32 bytes of 0x11, as in
fuzz.hpp): test keys, public by construction.

Key files are named ``*.keyfile`` (the repository ignores ``*.bin``, the name of real keys). The test that
runs the targets (tests/deploy/test_cpp_fuzz.py) imports :func:`seal`, :func:`payload` and
:func:`regressions` from here for the inputs too large to commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CHUNK, TAG, ALIGN, AAD = 1 << 20, 16, 4096, 144
PUBLISHER_SEED = bytes([0x11]) * 32
DEVICE_SECRET = bytes([0x22]) * 32
KEY_ID = b"keyedge-fuzz-key"  # 16 bytes: the corpus key's id (a v2 key file)


# ---- key files (keyedge.core.keys: version 1 and 2) -----------------------------------------------------

def key_file(perm: list[int], block: int, channels: int, *, version: int = 2, flags: int = 1,
             key_id: bytes = KEY_ID, n: int | None = None, digest: bool = True) -> bytes:
    body = struct.pack("<8sHHHHI", b"KEYEDGE\0", version, flags, block, channels, len(perm) if n is None else n)
    body += (key_id if version == 2 else b"") + b"".join(struct.pack("<I", v) for v in perm)
    return body + (hashlib.sha256(body).digest() if digest else bytes(32))


def key_fingerprint(key_id: bytes = KEY_ID, perm: list[int] | None = None, block: int = 4, channels: int = 3) -> str:
    """A v2 fingerprint: SHA-256 of the domain, the key ID, M, C and the permutation (default: the corpus key)."""
    perm = permutation(48) if perm is None else perm
    return hashlib.sha256(b"keyedge-key-fingerprint-v2\0" + key_id + struct.pack("<HH", block, channels)
                          + b"".join(struct.pack("<I", v) for v in perm)).digest()[:16].hex()


def permutation(n: int, seed: int = 0) -> list[int]:
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return perm


# ---- bundles (keyedge.runtime.bundle: version 3) --------------------------------------------------------

def _nacl():
    import nacl.public
    import nacl.signing

    return nacl


def publisher():
    return _nacl().signing.SigningKey(PUBLISHER_SEED)


def device_public(secret: bytes = DEVICE_SECRET) -> bytes:
    return bytes(_nacl().public.PrivateKey(secret).public_key)


def payload(files: list[tuple[str, bytes]], index: bytes | None = None) -> bytes:
    """u32 n || index JSON || each file at the next 4096-byte boundary (``index``: given as it is)."""
    if index is None:
        index = json.dumps({"format": "keyedge-bundle", "version": 3,
                            "files": [{"name": name, "size": len(data)} for name, data in files]}).encode()
    out = bytearray(struct.pack("<I", len(index)) + index)
    for _, data in files:
        out += bytes(-len(out) % ALIGN) + data
    return bytes(out)


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def seal(plain: bytes, *, signer=None, recipient: bytes | None = None, version: int = 3, flags: int | None = None,
         tamper=None) -> bytes:
    """A sealed bundle of ``plain`` (the payload); ``tamper(records) -> records`` changes the chunk records
    before the bundle is signed (so that the signature verifies and decryption must refuse)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nacl = _nacl()
    recipient = device_public() if recipient is None else recipient
    content_key = os.urandom(32)
    sealed_key = nacl.public.SealedBox(nacl.public.PublicKey(recipient)).encrypt(content_key)
    fingerprint = hashlib.sha256(b"keyedge-device-fingerprint-v1\0" + recipient).digest()[:16]
    flags = (1 if signer is not None else 0) if flags is None else flags
    signer_pk = bytes(signer.verify_key) if signer is not None else bytes(32)
    head = struct.pack("<8sHHI16s80s32s", b"KEYEDGEB", version, flags, CHUNK, fingerprint, sealed_key, signer_pk)
    n = max(1, -(-len(plain) // CHUNK))
    aead = AESGCM(content_key)
    records = [aead.encrypt(_nonce(i, i == n - 1), plain[i * CHUNK:(i + 1) * CHUNK], head) for i in range(n)]
    if tamper is not None:
        records = tamper(records)
    digest = hashlib.sha256(b"".join(hashlib.sha256(r).digest() for r in records)).digest()
    signature = signer.sign(b"keyedge-bundle-signature-v3\0" + head + digest).signature if signer else bytes(64)
    return head + signature + b"".join(records)


# ---- the seeds ------------------------------------------------------------------------------------------

def _manifest(name: str) -> dict:
    return json.loads((CORPUS / "manifest" / name).read_text())


def _engine_manifest() -> dict:
    """The build plan as keyedge.deploy.tensorrt records an engine built from it."""
    return {**_manifest("ok-build-plan.json"), "format": "keyedge-engine", "tensorrt_version": "10.3.0",
            "compute_capability": "8.7", "l4t_release": "R36.3.0"}


def _dump(m: dict) -> bytes:
    return (json.dumps(m, indent=2) + "\n").encode()


def manifests() -> dict[str, bytes]:
    gather, kernel = _manifest("ok-artifact-gather.json"), _manifest("ok-artifact-kernel.json")
    pre = kernel["preprocess"]
    text = _dump(gather).decode()
    return {
        "ok-engine.json": _dump(_engine_manifest()),
        "bad-version-1e300.json": b'{"version": 1e300}',
        "bad-version-1e300-in-manifest.json": text.replace('"version": 1', '"version": 1e300', 1).encode(),
        "bad-version-huge.json": text.replace('"version": 1', '"version": 18446744073709551616', 1).encode(),
        "bad-version-newer.json": text.replace('"version": 1', '"version": 2', 1).encode(),
        "bad-minus.json": b"-",
        "bad-plus.json": b"+",
        "bad-1e400.json": b"1e400",
        "bad-empty.json": b"",
        "bad-nested.json": b"[" * 1000,
        "bad-nested-object.json": b'{"format": "keyedge-artifact", "version": 1, "input": ' + b'{"a": ' * 200,
        "bad-block-size-mismatch.json": _dump({**kernel, "preprocess": {**pre, "block_size": 2}}),
        "bad-block-size-not-dividing.json": _dump({**gather, "block_size": 5}),
        "bad-channels-fraction.json": text.replace('"channels": 3', '"channels": 2.5', 1).encode(),
        "bad-kernel-5-channels.json": _dump({**kernel, "input": {**kernel["input"], "channels": 5},
                                             "preprocess": {**pre, "mean": [0.5] * 5, "std": [0.5] * 5}}),
        "bad-std-zero.json": _dump({**kernel, "preprocess": {**pre, "std": [0.5, 0.0, 0.5]}}),
        "bad-mean-overflow.json": _dump({**kernel, "preprocess": {**pre, "mean": [0.5, 1e39, 0.5]}}),
        "bad-batch-zero.json": _dump({**gather, "input": {**gather["input"], "batch": 0}}),
        "bad-layout.json": _dump({**gather, "input": {**gather["input"], "layout": "HWC"}}),
        "bad-name-newline.json": _dump({**gather, "output": {**gather["output"], "name": "logits\nsecond line"}}),
        "bad-fingerprint.json": _dump({**gather, "key_fingerprint": "../../etc/passwd"}),
        "bad-gather-without-fingerprint.json": _dump({**gather, "key_fingerprint": None}),
    }


def key_files() -> dict[str, bytes]:
    perm = permutation(48)
    good = key_file(perm, 4, 3)
    trailing = good[:-32] + b"\0" + hashlib.sha256(good[:-32] + b"\0").digest()
    not_perm = perm.copy()
    not_perm[1] = not_perm[0]
    signing = publisher()
    return {
        "ok-v1.keyfile": key_file(perm, 4, 3, version=1),
        "ok-v2.keyfile": good,
        "ok-v2-small.keyfile": key_file([0], 1, 1, flags=3),
        "ok-publisher.pub": b"KEYEDGEP" + struct.pack("<HB", 1, 2) + bytes(signing.verify_key),
        "bad-publisher-private.key": b"KEYEDGEP" + struct.pack("<HB", 1, 1) + bytes(32),  # an Ed25519 seed
        "bad-publisher-version.pub": b"KEYEDGEP" + struct.pack("<HB", 2, 2) + bytes(signing.verify_key),
        "bad-m32768-c4-n0.keyfile": key_file([], 32768, 4, n=0),
        "bad-m0.keyfile": key_file([], 0, 3, n=0),
        "bad-n-mismatch.keyfile": key_file(permutation(12), 3, 1),
        "bad-n-huge.keyfile": key_file(perm, 4, 3, n=0xFFFFFFFF),
        "bad-version-3.keyfile": key_file(perm, 4, 3, version=3),
        "bad-digest.keyfile": key_file(perm, 4, 3, digest=False),
        "bad-unknown-flags.keyfile": key_file(perm, 4, 3, flags=0x8004),
        "bad-not-a-permutation.keyfile": key_file(not_perm, 4, 3),
        "bad-value-out-of-range.keyfile": key_file(perm[:-1] + [48], 4, 3),
        "bad-truncated.keyfile": good[:-1],
        "bad-trailing.keyfile": trailing,
        "bad-empty.keyfile": b"",
    }


def _sealed_files(fingerprint: str | None = None, block: int = 4) -> list[tuple[str, bytes]]:
    """What a gather bundle holds: its manifest (keyed to the corpus key), the key and a model's bytes."""
    manifest = {**_manifest("ok-artifact-gather.json"), "key_fingerprint": fingerprint or key_fingerprint(),
                "block_size": block}
    return [("model.onnx", b"\x08\x09onnx-model-bytes" * 4), ("manifest.json", _dump(manifest)),
            ("key.bin", key_file(permutation(48), 4, 3))]


def _engine_files() -> list[tuple[str, bytes]]:
    return [("model.engine", b"engine-bytes" * 8),
            ("model.engine.json", _dump({**_engine_manifest(), "key_fingerprint": key_fingerprint()})),
            ("key.bin", key_file(permutation(48), 4, 3))]


def payloads() -> dict[str, bytes]:
    files = _sealed_files()
    small = [("model.onnx", b"m"), ("manifest.json", b"{}")]

    def index(entries: list[dict]) -> bytes:
        return json.dumps({"files": entries}).encode()

    return {
        "ok-gather.payload": payload(files),
        "ok-engine.payload": payload(_engine_files()),
        "bad-dotdot-name.payload": payload([("../x", b"m")]),
        "bad-slash-name.payload": payload([("a/b", b"m")]),
        "bad-duplicate-names.payload": payload([("model.onnx", b"m"), ("model.onnx", b"m")]),
        "bad-nul-name.payload": payload([("model\0.onnx", b"m")]),
        "bad-empty-name.payload": payload([("", b"m")]),
        "bad-size-outside.payload": payload(small, index([{"name": "model.onnx", "size": 1},
                                                          {"name": "manifest.json", "size": 1 << 30}])),
        "bad-size-fraction.payload": payload(small, index([{"name": "model.onnx", "size": 0.5},
                                                           {"name": "manifest.json", "size": 2}])),
        "bad-size-negative.payload": payload(small, index([{"name": "model.onnx", "size": -1},
                                                           {"name": "manifest.json", "size": 2}])),
        "bad-index-version.payload": payload(small, b'{"version": 1e300, "files": []}'),
        "bad-index-nested.payload": payload([], b"[" * 1000),
        "bad-index-length.payload": struct.pack("<I", 1 << 20) + b"{}",
        "bad-not-filling.payload": payload(small) + b"\0",
        "bad-no-model.payload": payload([("manifest.json", files[1][1])]),
        "bad-key-block-size.payload": payload(_sealed_files(block=2)),
        "bad-other-fingerprint.payload": payload(_sealed_files(fingerprint="0" * 32)),
    }


def bundles() -> dict[str, bytes]:
    signer = publisher()
    other = _nacl().signing.SigningKey(bytes([0x33]) * 32)
    tiny = payload([])  # refused before decryption: the payload does not matter

    def flip_last(records):
        return records[:-1] + [records[-1][:-1] + bytes([records[-1][-1] ^ 1])]

    good = seal(payload(_sealed_files()), signer=signer)
    bad_signature = bytearray(good)
    bad_signature[AAD + 5] ^= 1
    v2 = bytearray(seal(tiny, signer=signer))
    v2[8:10] = struct.pack("<H", 2)
    return {
        "ok-signed.kes": good,
        "bad-unsigned.kes": seal(tiny),
        "bad-other-publisher.kes": seal(tiny, signer=other),
        "bad-signature.kes": bytes(bad_signature),
        "bad-tampered-chunk-resigned.kes": seal(tiny, signer=signer, tamper=flip_last),
        "bad-other-device.kes": seal(tiny, signer=signer, recipient=device_public(bytes([0x44]) * 32)),
        "bad-version-2.kes": bytes(v2),
        "bad-flags.kes": seal(tiny, signer=signer, flags=3),
        "bad-truncated.kes": good[:207],
        "bad-no-chunks.kes": good[:208],
        "bad-extended.kes": good + b"\0",
        "bad-dotdot-name.kes": seal(payload([("../x", b"m")]), signer=signer),
        "bad-duplicate-names.kes": seal(payload([("a", b"m"), ("a", b"m")]), signer=signer),
    }


def regressions() -> dict[str, dict[str, bytes]]:
    """Inputs too large for the committed corpus, per target (written by the test at run time)."""
    deep = b"[" * 300000
    return {"manifest": {"bad-nested-300000.json": deep},
            "bundle_index": {"bad-nested-300000.payload": payload([], deep)}}


def config_header() -> str:
    return "\n".join([
        "// The package config of the fuzz build (written by make_corpus.py): the artifact its corpus's bundles hold.",
        "#pragma once",
        f'#define KEYEDGE_EXPECTED_FINGERPRINT "{key_fingerprint()}"',
        "#define KEYEDGE_EXPECTED_HEIGHT 16",
        "#define KEYEDGE_EXPECTED_WIDTH 16",
        "#define KEYEDGE_EXPECTED_CLASSES 10",
        '#define KEYEDGE_MODEL_FILE "model.kes"',
        f'#define KEYEDGE_TRUSTED_PUBLISHERS {{"{bytes(publisher().verify_key).hex()}"}}',
        "",
    ])


def main() -> None:
    for target, seeds in (("manifest", manifests()), ("key_file", key_files()), ("bundle_index", payloads()),
                          ("bundle_file", bundles())):
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
    (HERE / "keyedge_model_config.hpp").write_text(config_header())
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    print(f"wrote the corpus under {CORPUS} ({total} bytes)")


if __name__ == "__main__":
    main()
