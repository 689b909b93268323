"""Who made a bundle: publisher signatures checked before anything inside is opened, forgeries made with
the device's public key alone refused by every opener, hostile indexes and manifests refused in one line,
and plaintext written only under the directory asked for."""

import json
import os
import stat
import struct

import numpy as np
import pytest

from keyedge.runtime import bundle as bundle_module
from keyedge.runtime.bundle import (CHUNK, HEADER, TAG, BundleError, DeviceAccess, DeviceKey, DevicePublicKey,
                                    Opener, PublisherKey, Trust, open_bundle, payload, read_trust, seal, seal_payload,
                                    unseal)
from keyedge.runtime.runners import open_runner

from ..helpers import keyedge
from .bundles import opener, publisher, trust


def _files(root, name="fused"):
    """The plaintext files of a genuine bundle (what a forger would put in one of their own)."""
    opened = open_bundle(root / f"{name}.kes", opener(root))
    try:
        return {n: opened.plain.read(n) for n in opened.plain.spans}
    finally:
        opened.wipe()


@pytest.fixture(scope="module")
def forged(sealed, tmp_path_factory):
    """Bundles made with the device's public key alone: unsigned, and signed by another publisher."""
    root, _ = sealed
    out = tmp_path_factory.mktemp("forged")
    device = DevicePublicKey.load(root / "device.pub")
    files = _files(root)
    (out / "unsigned.kes").write_bytes(seal(files, device))
    (out / "other.kes").write_bytes(seal(files, device, PublisherKey.generate()))
    return out


def _one_line_exit_2(r, needle):
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_genuine_bundle_opens_and_names_its_publisher(sealed):
    root, _ = sealed
    opened = open_bundle(root / "fused.kes", opener(root))
    assert opened.plain.publisher == publisher(root).fingerprint
    opened.wipe()
    r = keyedge("unseal", root / "fused.kes", "--device-key", root / "device.key", *trust(root))
    assert r.returncode == 0 and f"signed by trusted publisher {publisher(root).fingerprint}" in r.stdout


@pytest.mark.parametrize("forgery,needle", [("unsigned", "not signed by a publisher"), ("other", "not trusted")])
def test_a_forged_bundle_is_refused_by_every_opener(sealed, forged, tmp_path, trained_keyed, forgery, needle):
    root, _ = sealed
    run, key_path, _, _ = trained_keyed
    bad = forged / f"{forgery}.kes"
    with pytest.raises(BundleError, match=needle):
        open_runner(bad, None, opener=opener(root))
    device = ("--device-key", root / "device.key", *trust(root))
    _one_line_exit_2(keyedge("unseal", bad, *device), needle)
    _one_line_exit_2(keyedge("unseal", bad, *device, "-o", tmp_path / "u", "--write-plaintext"), needle)
    _one_line_exit_2(keyedge("parity", "--reference", run, "--key", key_path, bad, *device, "--n", "8",
                             "-o", tmp_path / "p"), needle)
    _one_line_exit_2(keyedge("bench", bad, *device, "--batch", "1", "--rounds", "1", "--iters", "1",
                             "-o", tmp_path / "b"), needle)
    r = keyedge("build", bad, "--target", "desktop", *device, "--sign-with", root / "publisher.key",
                "-o", tmp_path / "e")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr  # refused (TensorRT or trust)
    _one_line_exit_2(keyedge("bindings", root / "fused", "-o", tmp_path / "cpp", "--bundle", bad, *trust(root)),
                     needle)
    assert not any((tmp_path / d).exists() for d in ("u", "p", "b", "e", "cpp"))


def test_allow_unsigned_opens_unsigned_bundles_only_and_says_so(sealed, forged):
    root, _ = sealed
    device = ("--device-key", root / "device.key")
    r = keyedge("unseal", forged / "unsigned.kes", *device, "--allow-unsigned")
    assert r.returncode == 0 and "UNSIGNED" in r.stdout and "development only" in r.stderr, r.stdout + r.stderr
    r = keyedge("unseal", forged / "other.kes", *device, "--allow-unsigned")
    assert r.returncode == 2 and "not trusted" in r.stderr.splitlines()[-1] and len(r.stderr.splitlines()) == 2


def test_trust_from_the_environment_and_rotation(sealed, monkeypatch, tmp_path):
    root, _ = sealed
    new = PublisherKey.generate()
    (tmp_path / "new.pub").write_bytes(new.public.to_bytes())
    monkeypatch.setenv("KEYEDGE_TRUSTED_PUBLISHERS", f"{tmp_path / 'new.pub'}{os.pathsep}{root / 'publisher.pub'}")
    t = read_trust()
    assert {p.fingerprint for p in t.publishers} == {new.fingerprint, publisher(root).fingerprint}
    r = keyedge("unseal", root / "fused.kes", "--device-key", root / "device.key")  # pinned by the environment
    assert r.returncode == 0, r.stderr
    rotated = seal(_files(root), DevicePublicKey.load(root / "device.pub"), new)
    (tmp_path / "rotated.kes").write_bytes(rotated)
    monkeypatch.delenv("KEYEDGE_TRUSTED_PUBLISHERS")
    both = ("--trust", root / "publisher.pub", "--trust", tmp_path / "new.pub")
    for b in (root / "fused.kes", tmp_path / "rotated.kes"):  # old and new publisher during a rotation
        assert keyedge("unseal", b, "--device-key", root / "device.key", *both).returncode == 0
    _one_line_exit_2(keyedge("unseal", tmp_path / "rotated.kes", "--device-key", root / "device.key", *trust(root)),
                     "not trusted")


def test_the_signature_covers_every_byte_but_itself(sealed):
    """Flip any byte of the header (but the signature's own), of any chunk or tag: refused before the
    content key is opened."""
    root, _ = sealed
    data = (root / "fused.kes").read_bytes()
    calls = []

    class Spy(DeviceKey):
        def open_content_key(self, sealed_key):
            calls.append(1)
            return super().open_content_key(sealed_key)

    spy = Opener(Spy.from_bytes((root / "device.key").read_bytes(), "device.key"), opener(root).trust)
    rng = np.random.default_rng(0)
    for at in [12, 16, 31, 32, 60, 111, 112, 143, 144, 207, *rng.integers(HEADER.size, len(data), 12)]:
        bad = bytearray(data)
        bad[at] ^= 0x10
        with pytest.raises(BundleError):
            unseal(bytes(bad), spy, f"byte {at}")
    assert not calls  # refused on the signature or the header alone
    unseal(data, spy).wipe()
    assert calls == [1]


def test_opening_and_signing_need_no_secret_beyond_the_device_key(sealed):
    """The header names only fingerprints and public keys; the signed message is public data."""
    root, _ = sealed
    data = (root / "fused.kes").read_bytes()
    magic, version, flags, chunk, fp, _, pub, _ = HEADER.unpack_from(data)
    assert (magic, version, flags, chunk) == (b"KEYEDGEB", 3, 1, CHUNK)
    assert fp.hex() == DevicePublicKey.load(root / "device.pub").fingerprint
    assert pub == publisher(root).public.raw


def _hostile(root, plain: bytes, tmp_path, name="hostile.kes"):
    """A bundle of any plaintext, signed by the trusted publisher (so the checks inside are reached)."""
    path = tmp_path / name
    path.write_bytes(seal_payload(bytearray(plain), DevicePublicKey.load(root / "device.pub"), publisher(root)))
    return path


def _raw_payload(index: bytes, body: bytes = b"") -> bytes:
    start = bundle_module._align(4 + len(index), bundle_module.ALIGN)
    return struct.pack("<I", len(index)) + index + bytes(start - 4 - len(index)) + body


@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", "..", ".", "", "a\\b", "x\x00y", "\x1b[2J\nmodel.onnx", "x" * 256])
def test_unseal_writes_nothing_outside_the_directory(sealed, tmp_path, name):
    root, _ = sealed
    index = json.dumps({"format": "keyedge-bundle", "version": 3, "files": [{"name": name, "size": 3}]}).encode()
    bad = _hostile(root, _raw_payload(index, b"abc"), tmp_path)
    (tmp_path / "u").mkdir()
    before = sorted(p for p in tmp_path.rglob("*"))
    r = keyedge("unseal", bad, "--device-key", root / "device.key", *trust(root), "-o", tmp_path / "u" / "out",
                "--write-plaintext")
    _one_line_exit_2(r, "plain names only")
    assert sorted(p for p in tmp_path.rglob("*")) == before and not os.path.exists("/abs/x")


def test_unseal_never_overwrites(sealed, tmp_path):
    root, _ = sealed
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "manifest.json").write_text("mine")
    r = keyedge("unseal", root / "fused.kes", "--device-key", root / "device.key", *trust(root),
                "-o", tmp_path / "u", "--write-plaintext")
    _one_line_exit_2(r, "never over files")
    assert (tmp_path / "u" / "manifest.json").read_text() == "mine"
    r = keyedge("unseal", root / "fused.kes", "--device-key", root / "device.key", *trust(root),
                "-o", tmp_path / "new", "--write-plaintext")
    assert r.returncode == 0
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in (tmp_path / "new").iterdir())


HOSTILE_INDEXES = {
    "not UTF-8": b"\xff\xfe{}",
    "not JSON": b"{files: [}",
    "deep nesting": b"[" * 100_000,
    "a list": b"[]",
    "files not a list": json.dumps({"format": "keyedge-bundle", "version": 3, "files": {"a": 1}}).encode(),
    "size a string": json.dumps({"format": "keyedge-bundle", "version": 3,
                                 "files": [{"name": "a", "size": "3"}]}).encode(),
    "size a bool": json.dumps({"format": "keyedge-bundle", "version": 3, "files": [{"name": "a", "size": True}]}).encode(),
    "size negative": json.dumps({"format": "keyedge-bundle", "version": 3, "files": [{"name": "a", "size": -1}]}).encode(),
    "size huge": json.dumps({"format": "keyedge-bundle", "version": 3, "files": [{"name": "a", "size": 10**30}]}).encode(),
    "name a number": json.dumps({"format": "keyedge-bundle", "version": 3, "files": [{"name": 7, "size": 3}]}).encode(),
    "duplicate names": json.dumps({"format": "keyedge-bundle", "version": 3,
                                   "files": [{"name": "a", "size": 1}, {"name": "a", "size": 1}]}).encode(),
    "another version": json.dumps({"format": "keyedge-bundle", "version": 9, "files": []}).encode(),
    "sizes do not fill the payload": json.dumps({"format": "keyedge-bundle", "version": 3,
                                                 "files": [{"name": "a", "size": 1}]}).encode(),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_INDEXES))
def test_a_hostile_index_is_one_line(sealed, tmp_path, case):
    root, _ = sealed
    index = HOSTILE_INDEXES[case]
    body = b"abc" if case != "sizes do not fill the payload" else b"abcdef"
    bad = _hostile(root, _raw_payload(index, body), tmp_path)
    with pytest.raises(BundleError):
        open_bundle(bad, opener(root))
    r = keyedge("unseal", bad, "--device-key", root / "device.key", *trust(root))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("manifest", [b"\xff\xfe", b"{not json", b"[" * 100_000, b"[]",
                                      b'{"format": "keyedge-artifact", "version": 1}',
                                      b'{"format": "keyedge-artifact", "version": "1"}'])
def test_a_hostile_manifest_inside_a_bundle_is_one_line(sealed, tmp_path, trained_keyed, manifest):
    root, _ = sealed
    run, key_path, _, _ = trained_keyed
    files = {**_files(root), "manifest.json": manifest}
    bad = tmp_path / "m.kes"
    bad.write_bytes(seal(files, DevicePublicKey.load(root / "device.pub"), publisher(root)))
    _one_line_exit_2(keyedge("parity", "--reference", run, "--key", key_path, bad, "--device-key",
                             root / "device.key", *trust(root), "--n", "8"), str(bad))


def test_a_manifest_with_wrong_types_inside_a_bundle_is_refused(sealed, tmp_path, trained_keyed):
    root, _ = sealed
    run, key_path, _, _ = trained_keyed
    good = json.loads(_files(root)["manifest.json"])
    for field, value in (("input", {**good["input"], "channels": "3"}), ("block_size", 2.5),
                         ("output", {**good["output"], "num_classes": True}), ("mean", "0.5"),
                         ("input", {**good["input"], "size": [16, -16]})):
        files = {**_files(root), "manifest.json": json.dumps({**good, field: value}).encode()}
        bad = tmp_path / "t.kes"
        bad.write_bytes(seal(files, DevicePublicKey.load(root / "device.pub"), publisher(root)))
        _one_line_exit_2(keyedge("bench", bad, "--device-key", root / "device.key", *trust(root), "--batch", "1",
                                 "--rounds", "1", "--iters", "1", "-o", tmp_path / "b"), str(bad))
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("last", [1, 8, 16, 17])
def test_a_bundle_truncated_in_its_last_chunk_is_one_line(tmp_path, last):
    """The last record holds ``last`` bytes (16 or fewer: not even a tag) -- the buffers are released, no
    BufferError on the way out."""
    device, pub = DeviceKey.generate(), PublisherKey.generate()
    data = seal({"blob": os.urandom(CHUNK + 1000)}, device.public, pub)
    cut = HEADER.size + CHUNK + TAG + last
    (tmp_path / "t.kes").write_bytes(data[:cut])
    for trust_ in (Trust((pub.public,)), Trust((), allow_unsigned=True)):
        with pytest.raises(BundleError):
            open_bundle(tmp_path / "t.kes", Opener(device, trust_))


def test_seal_refuses_unsigned_without_asking_and_a_bad_signing_key(sealed, tmp_path):
    root, _ = sealed
    base = ("seal", root / "fused", "--to", root / "device.pub", "-o", tmp_path / "x.kes")
    _one_line_exit_2(keyedge(*base), "--sign-with")
    _one_line_exit_2(keyedge(*base, "--sign-with", root / "device.key"), "it is a device key")
    _one_line_exit_2(keyedge(*base, "--sign-with", root / "publisher.pub"), "public key, not a private key")
    assert not (tmp_path / "x.kes").exists()
    r = keyedge(*base, "--allow-unsigned")
    assert r.returncode == 0 and "UNSIGNED" in r.stdout


def test_publisher_keygen(tmp_path):
    r = keyedge("publisher", "keygen", "-o", tmp_path / "p.key")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "p.key").st_mode) == 0o600
    key = PublisherKey.load(tmp_path / "p.key")
    assert key.fingerprint in r.stdout and (tmp_path / "p.pub").read_bytes() == key.public.to_bytes()
    assert (tmp_path / "p.key").read_bytes()[11:].hex() not in r.stdout + r.stderr
    _one_line_exit_2(keyedge("publisher", "keygen", "-o", tmp_path / "p.key"), "--force")
    _one_line_exit_2(keyedge("publisher", "keygen", "-o", tmp_path / "nope" / "p.key"), "does not exist")


def test_payload_refuses_unsafe_names():
    for name in ("../x", "/x", "a/b", ".."):
        with pytest.raises(BundleError, match="plain names only"):
            payload({name: b"x"})


def test_device_access_reads_trust_before_the_device_key(tmp_path):
    (tmp_path / "k").write_bytes(b"junk")
    with pytest.raises(Exception, match="--trust"):
        DeviceAccess(tmp_path / "k").opener()  # no publisher pinned: refused before the key is read


def test_a_sealed_runners_key_is_wiped_at_deactivation(sealed):
    root, key = sealed
    runner = open_runner(root / "gather.kes", None, opener=opener(root))
    with runner:
        held = runner.key
        assert held is not None and np.array_equal(held.perm, key.perm)
    assert runner.key is None and not held.perm.any()  # overwritten in place, not only dropped


def test_what_is_verified_is_what_is_decrypted(sealed, tmp_path, monkeypatch):
    """A bundle swapped on disk right after its signature was checked (a forgery claiming the trusted
    publisher) changes nothing: the opener verified and decrypts one private copy. Truncating it then
    kills nothing either (no shared mapping: no SIGBUS)."""
    root, _ = sealed
    genuine = (root / "fused.kes").read_bytes()
    forged = bytearray(seal({"model.onnx": b"ATTACKER", "manifest.json": b"{}"},
                            DevicePublicKey.load(root / "device.pub")))
    forged[10:12] = struct.pack("<H", 1)  # "signed" ...
    forged[112:144] = publisher(root).public.raw  # ... by the trusted publisher, with no valid signature
    path = tmp_path / "model.kes"
    path.write_bytes(genuine)
    check = Trust.check

    def check_then_swap(self, data, where, hashes=None):
        publisher_fp = check(self, data, where, hashes)
        path.write_bytes(bytes(forged) if not calls else genuine[:HEADER.size + 10])
        calls.append(1)
        return publisher_fp

    calls: list[int] = []
    monkeypatch.setattr(Trust, "check", check_then_swap)
    for _ in range(2):  # swapped, then truncated, after the check
        opened = open_bundle(path, opener(root))
        assert json.loads(opened.manifest_text)["format"] == "keyedge-artifact"
        assert opened.plain.read("model.onnx") == _files(root)["model.onnx"]
        opened.wipe()
        path.write_bytes(genuine)


def test_build_does_not_sign_what_no_publisher_signed(sealed, forged, tmp_path):
    root, _ = sealed
    r = keyedge("build", forged / "unsigned.kes", "--target", "desktop", "--device-key", root / "device.key",
                "--allow-unsigned", "--sign-with", root / "publisher.key", "-o", tmp_path / "e")
    assert r.returncode == 2 and "is unsigned" in r.stderr.splitlines()[-1], r.stderr
    assert not (tmp_path / "e").exists()


def test_plaintext_never_goes_through_a_symlink_that_appears(tmp_path):
    from keyedge.core.errors import KeyedgeError
    from keyedge.core.io import new_dir, write_new_file

    production = tmp_path / "production"
    production.mkdir()
    (production / "model.onnx").write_bytes(b"production model")
    out = tmp_path / "out"
    with pytest.raises(KeyedgeError, match="appeared while it was written"):
        with new_dir(out) as stage:
            write_new_file(stage / "model.onnx", b"debug plaintext")
            out.symlink_to(production)  # raced in between the check and the rename
    assert (production / "model.onnx").read_bytes() == b"production model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "production"]  # the stage is gone
    out.unlink()
    (tmp_path / "empty").mkdir()
    out.symlink_to(tmp_path / "empty")
    with pytest.raises(KeyedgeError, match="not an empty directory"):
        with new_dir(out):
            pass
