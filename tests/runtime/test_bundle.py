"""Sealed per-device bundles: round trips, opened in memory only, and every kind of bad bundle refused."""

import dataclasses
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest

from keyedge import Key
from keyedge.core.errors import KeyedgeError
from keyedge.runtime.artifacts import open_artifact
from keyedge.runtime.bundle import (CHUNK, HEADER, TAG, BundleError, DeviceKey, DevicePublicKey, Opener,
                                    PublisherKey, Trust, open_bundle, seal,
                                    unseal)
from keyedge.runtime.runners import open_runner, runner_for

from ..helpers import keyedge
from .bundles import MODES
from .bundles import opener as _opener
from .bundles import publisher as _publisher
from .bundles import trust as _trust


def test_device_keygen_writes_a_private_key_0600_and_prints_only_the_fingerprint(sealed):
    root, _ = sealed
    device = DeviceKey.from_bytes((root / "device.key").read_bytes(), "device.key")
    assert stat.S_IMODE(os.stat(root / "device.key").st_mode) == 0o600
    assert DevicePublicKey.load(root / "device.pub") == device.public
    assert stat.S_IMODE(os.stat(root / "fused.kes").st_mode) == 0o600
    r = keyedge("device", "keygen", "-o", root / "device.key")
    assert r.returncode == 2 and "--force" in r.stderr


@pytest.mark.parametrize("name", list(MODES))
def test_a_sealed_bundle_runs_from_memory_like_the_plain_file(sealed, name):
    """The runner opens the bundle at each activation (a loader), wipes the plaintext once its model is
    loaded, and holds no plaintext -- nor the sealed key -- between activations."""
    root, key = sealed
    with open_runner(root / name, key) as plain:
        x = plain.input_spec.from_canonical(np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32))
        want = plain(x)
    art = open_artifact(root / f"{name}.kes", opener=_opener(root))
    opened = []

    def loader():
        opened.append(art.sealed())
        return opened[-1]

    runner = runner_for(dataclasses.replace(art, sealed=loader), None)  # the gather / kernel key comes sealed
    for activation in (1, 2):
        with runner:
            assert len(opened) == activation
            assert opened[-1].plain.wiped and opened[-1].plain.buffer.closed  # gone once the model is loaded
            assert np.array_equal(runner(x), want)
        assert runner.key is None


def test_a_failed_activation_leaves_no_sealed_key_behind(sealed, monkeypatch):
    """The bundle is opened, then ONNX Runtime fails: the plaintext is wiped and the key dropped."""
    import onnxruntime

    root, _ = sealed
    art = open_artifact(root / "gather.kes", opener=_opener(root))
    opened = []

    def loader():
        opened.append(art.sealed())
        return opened[-1]

    def broken(*args, **kwargs):
        raise RuntimeError("no session today")

    runner = runner_for(dataclasses.replace(art, sealed=loader), None)
    monkeypatch.setattr(onnxruntime, "InferenceSession", broken)
    with pytest.raises(RuntimeError, match="no session today"):
        runner.activate()
    assert opened and opened[0].plain.wiped and runner.key is None and not runner.is_active


def test_a_bundle_replaced_after_it_was_opened_is_refused(sealed, tmp_path):
    root, key = sealed
    shutil.copyfile(root / "gather.kes", tmp_path / "model.kes")
    runner = open_runner(tmp_path / "model.kes", None, opener=_opener(root))
    shutil.copyfile(root / "fused.kes", tmp_path / "model.kes")  # another artifact, same device
    with pytest.raises(BundleError, match="changed since it was opened"):
        runner.activate()


def test_a_keyed_bundle_without_its_key_says_so(sealed, tmp_path):
    root, _ = sealed
    opener = _opener(root)
    bundle = open_bundle(root / "gather.kes", opener)
    files = {name: bundle.plain.read(name) for name in bundle.plain.spans if name != "key.bin"}
    bundle.wipe()
    (tmp_path / "nokey.kes").write_bytes(seal(files, opener.device.public, _publisher(root)))
    with pytest.raises(BundleError, match="holds no key but its artifact takes one"):
        open_runner(tmp_path / "nokey.kes", None, opener=opener).activate()


def test_the_bundle_bytes_hold_neither_key_nor_model(sealed):
    root, key = sealed
    for name in MODES:
        data = (root / f"{name}.kes").read_bytes()
        for perm in (key.perm, key.inverse):
            assert np.asarray(perm, "<u4").tobytes() not in data and np.asarray(perm, "<i8").tobytes() not in data
        for text in (b"onnx", b"keyedge_manifest", b"key_perm", b"LayerNormalization", b"images", b"logits",
                     key.fingerprint.encode()):
            assert text not in data
        model = (root / name / "model.onnx").read_bytes()
        assert model[1000:1064] not in data  # no 64-byte run of the model either


def _open_files() -> set[str]:
    fds = "/proc/self/fd"
    out = set()
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{fd}")
        except OSError:
            continue
        if target.startswith("/") and os.path.isfile(target):
            out.add(target)
    return out


def test_opening_a_bundle_writes_no_file(sealed, tmp_path, monkeypatch):
    import tempfile

    root, _ = sealed
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    before_tmp, before_root = set(os.listdir(tmp_path)), set(os.listdir(root))
    before_fds = _open_files()
    opener = _opener(root)
    x = np.zeros((1, 3, 16, 16), dtype=np.float32) + 0.5
    with open_runner(root / "gather.kes", None, opener=opener) as runner:
        runner(x)
        during = _open_files() - before_fds
    tempfile.tempdir = None
    assert set(os.listdir(tmp_path)) == before_tmp and set(os.listdir(root)) == before_root
    assert not during, during  # no plaintext file held open while it runs


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def test_every_bad_bundle_is_refused(sealed, tmp_path):
    root, _ = sealed
    data = (root / "fused.kes").read_bytes()
    opener = _opener(root)
    other = Opener(DeviceKey.generate(), opener.trust)
    forged = "signature does not verify"  # any change to what the publisher signed
    cases = {
        "magic": (_flip(data, 0), "not a keyedge sealed bundle"),
        "old version": (data[:8] + struct.pack("<H", 2) + data[10:], r"bundle version 2; .*\(seal the artifact again\)"),
        "new version": (data[:8] + struct.pack("<H", 4) + data[10:], "bundle version 4"),
        "flags": (_flip(data, 10), "tampered"),
        "unknown flag": (_flip(data, 11), "tampered"),
        "chunk size": (_flip(data, 13), "tampered"),
        "fingerprint": (_flip(data, 16), forged),
        "sealed key": (_flip(data, 40), forged),
        "publisher key": (_flip(data, 120), "not trusted"),
        "signature": (_flip(data, 150), forged),
        "first chunk": (_flip(data, HEADER.size + 10), forged),
        "middle": (_flip(data, len(data) // 2), forged),
        "tag": (_flip(data, len(data) - 1), forged),
        "truncated": (data[:len(data) - 30], forged),
        "truncated to the tag": (data[:HEADER.size + TAG], forged),
        "truncated header": (data[:50], "truncated"),
        "extended": (data + b"\0" * 8, forged),
        "extended by a chunk": (data + bytes(CHUNK + TAG), forged),
    }
    for name, (bad, needle) in cases.items():
        with pytest.raises(BundleError, match=needle):
            unseal(bad, opener, name)
    with pytest.raises(BundleError, match="sealed to device"):
        unseal(data, other)


def test_the_stream_refuses_reordered_dropped_and_appended_chunks():
    """STREAM: each chunk's nonce is its index and whether it is the last, so chunks cannot move."""
    device, publisher = DeviceKey.generate(), PublisherKey.generate()
    opener = Opener(device, Trust((publisher.public,), allow_unsigned=True))
    payload = np.random.default_rng(0).integers(0, 256, 9 * CHUNK + 5, dtype=np.uint8).tobytes()
    data = seal({"blob": payload}, device.public)  # unsigned, 10 chunks: opened on several threads
    opened = unseal(data, opener)
    assert opened.read("blob") == payload
    opened.wipe()
    body, step = data[HEADER.size:], CHUNK + TAG
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    header = data[:HEADER.size]
    cases = {
        "swapped": header + b"".join([chunks[1], chunks[0], *chunks[2:]]),
        "last chunk dropped": header + b"".join(chunks[:-1]),
        "a middle chunk dropped": header + b"".join(chunks[:4] + chunks[5:]),
        "a chunk repeated": header + b"".join(chunks[:5] + chunks[4:]),
        "bit flipped in chunk 7": _flip(data, HEADER.size + 7 * step + 3),
    }
    for name, bad in cases.items():  # the AEAD alone refuses them (here unsigned, for development)
        with pytest.raises(BundleError, match="tampered"):
            unseal(bad, opener, name)


def test_an_onnx_bundle_holds_the_graph_and_its_tensors_aligned(sealed):
    """model.onnx (graph) + model.onnx.data (tensors of 1 KiB and more, 64-byte aligned); files start
    on page boundaries; the runner's arrays lie in the decrypted buffer itself (no copy)."""
    import onnx

    from keyedge.runtime.runners.onnxruntime import sealed_tensors

    root, _ = sealed
    bundle = open_bundle(root / "fused.kes", _opener(root))
    spans = bundle.plain.spans
    assert set(spans) == {"model.onnx", "model.onnx.data", "manifest.json"}
    assert all(offset % 4096 == 0 for offset, _ in spans.values())
    tensors = sealed_tensors(bundle)
    original = {t.name: onnx.numpy_helper.to_array(t)
                for t in onnx.load(root / "fused" / "model.onnx").graph.initializer}
    assert tensors and all(np.array_equal(a, original[name]) for name, a in tensors.items())
    for a in tensors.values():
        assert not a.flags.owndata and a.ctypes.data % 64 == 0
    del tensors, a  # the views go before the buffer can be unmapped
    bundle.wipe()
    assert bundle.plain.wiped and bundle.plain.buffer.closed


def test_cli_refusals_are_one_line_and_write_nothing(sealed, tmp_path, trained_keyed):
    root, _ = sealed
    run, key_path, _, _ = trained_keyed
    (tmp_path / "bad.kes").write_bytes(_flip((root / "fused.kes").read_bytes(), 300))
    DeviceKey.generate().save(tmp_path / "other.key")
    (tmp_path / "junk.key").write_bytes(b"not a key at all")
    out = tmp_path / "p"
    cases = [
        ([tmp_path / "bad.kes", "--device-key", root / "device.key", *_trust(root)], "does not verify"),
        ([root / "fused.kes", "--device-key", tmp_path / "other.key", *_trust(root)], "sealed to device"),
        ([root / "fused.kes", "--device-key", tmp_path / "junk.key", *_trust(root)], "not a keyedge device private key"),
        ([root / "fused.kes", "--device-key", root / "device.pub", *_trust(root)], "public key, not a private key"),
        ([root / "fused.kes", *_trust(root)], "--device-key"),
        ([root / "fused.kes", "--device-key", root / "device.key"], "--trust"),
    ]
    for args, needle in cases:
        r = keyedge("parity", "--reference", run, "--key", key_path, *args, "--n", "8", "-o", out)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
        assert not out.exists()
    r = keyedge("seal", root / "gather", "--to", root / "device.pub", "-o", tmp_path / "g.kes",
                "--sign-with", root / "publisher.key")  # no key
    assert r.returncode == 2 and "--key" in r.stderr and not (tmp_path / "g.kes").exists()


def test_parity_bench_and_audit_take_bundles(sealed, tmp_path, trained_keyed):
    root, key = sealed
    run, key_path, _, _ = trained_keyed
    r = keyedge("parity", "--reference", run, "--key", key_path, root / "gather.kes", "--device-key",
                root / "device.key", *_trust(root), "--n", "32")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    r = keyedge("bench", root / "fused.kes", "--device-key", root / "device.key", *_trust(root), "--batch", "1",
                "--rounds", "1",
                "--iters", "2", "-o", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    r = keyedge("audit", root / "fused.kes", "--base", run / "model.safetensors", "--key", key_path,
                "--device-key", root / "device.key", *_trust(root), "--fail-above", "0.0", "-o", tmp_path / "a")
    assert r.returncode == 0, r.stdout + r.stderr
    finding = json.loads((tmp_path / "a" / "audit.json").read_text())["artifacts"][0]
    assert finding["kind"] == "sealed-bundle" and finding["fraction"] == 0.0 and not finding["holds_key"]
    assert "opens, authenticated" in finding["note"]


def test_the_release_gate_passes_every_mode_once_sealed(sealed, tmp_path, trained_keyed):
    """A copy of a bundle, without the device key, yields none of the key, whatever the mode (the plain
    files of the same modes leak it: tests/test_audit.py)."""
    root, _ = sealed
    run, key_path, _, _ = trained_keyed
    r = keyedge("audit", *(root / f"{name}.kes" for name in MODES), "--base", run / "model.safetensors",
                "--key", key_path, "--fail-above", "0.0", "-o", tmp_path / "a")
    assert r.returncode == 0, r.stdout + r.stderr
    findings = json.loads((tmp_path / "a" / "audit.json").read_text())["artifacts"]
    assert len(findings) == len(MODES)
    assert all(f["kind"] == "sealed-bundle" and f["fraction"] == 0.0 and not f["holds_key"] for f in findings)


def test_device_key_from_stdin_and_from_a_command(sealed, tmp_path):
    root, _ = sealed
    key_bytes = (root / "device.key").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "keyedge.cli", "unseal", str(root / "fused.kes"), "--device-key", "-",
                           "--trust", str(root / "publisher.pub")], input=key_bytes, capture_output=True)
    assert proc.returncode == 0 and b"opens on this device" in proc.stdout, proc.stderr
    command = f"{sys.executable} -c \"import sys; sys.stdout.buffer.write(open('{root / 'device.key'}', 'rb').read())\""
    r = keyedge("unseal", root / "fused.kes", "--device-key-command", command, *_trust(root))
    assert r.returncode == 0 and "opens on this device" in r.stdout, r.stderr


def test_unseal_writes_plaintext_only_when_asked(sealed, tmp_path):
    root, key = sealed
    r = keyedge("unseal", root / "gather.kes", "--device-key", root / "device.key", *_trust(root), "-o", tmp_path / "u")
    assert r.returncode == 2 and "--write-plaintext" in r.stderr and not (tmp_path / "u").exists()
    r = keyedge("unseal", root / "gather.kes", "--device-key", root / "device.key", *_trust(root), "-o", tmp_path / "u",
                "--write-plaintext")
    assert r.returncode == 0
    assert {p.name for p in (tmp_path / "u").iterdir()} == {"model.onnx", "model.onnx.data", "manifest.json",
                                                             "key.bin"}
    x = np.random.default_rng(1).random((3, 3, 16, 16), dtype=np.float32)
    with open_runner(tmp_path / "u", Key.load(tmp_path / "u" / "key.bin")) as written, \
            open_runner(root / "gather", key) as plain:  # ONNX's external-data layout: loads from disk too
        assert np.array_equal(written(x), plain(x))


def test_engine_identity_is_checked_before_deserializing(sealed, tmp_path):
    from keyedge.core.manifests import EngineManifest
    from keyedge.runtime.runners.tensorrt import check_engine_identity

    from ..helpers import fake_engine

    root, _ = sealed
    fake_engine(root / "fused", tmp_path, tensorrt_version="100300")
    manifest = EngineManifest.read(tmp_path / "model.engine.json")
    check_engine_identity(manifest, "10.3.0", "8.7", "e")  # the same: accepted
    with pytest.raises(KeyedgeError, match="built with TensorRT 10.3.0, this machine has TensorRT 10.7.0"):
        check_engine_identity(manifest, "10.7.0", "8.7", "e")
    with pytest.raises(KeyedgeError, match="compute capability 8.7, this GPU is 9.0"):
        check_engine_identity(manifest, "10.3.0", "9.0", "e")
    jetson = EngineManifest(**{**manifest.fields_of(EngineManifest), "l4t_release": "R36.3.0"})
    check_engine_identity(jetson, "10.3.0", "8.7", "e", "R36.3.0")
    check_engine_identity(jetson, "10.3.0", "8.7", "e", None)  # not known here: not compared
    with pytest.raises(KeyedgeError, match="built on Jetson Linux R36.3.0, this device runs R35.4.1"):
        check_engine_identity(jetson, "10.3.0", "8.7", "e", "R35.4.1")


def test_the_jetson_linux_release_is_read_from_nv_tegra_release(tmp_path):
    from keyedge.runtime.platform import local_l4t_release

    (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, "
                                               "EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    assert local_l4t_release(tmp_path / "nv_tegra_release") == "R36.4.3"
    assert local_l4t_release(tmp_path / "absent") is None


def test_a_bundle_opened_but_never_run_is_wiped_when_dropped(sealed):
    import ctypes
    import gc

    root, _ = sealed
    bundle = open_bundle(root / "gather.kes", _opener(root))
    buffer = bundle.plain.buffer
    view = (ctypes.c_char * len(buffer)).from_buffer(buffer)  # a second holder keeps it mapped
    assert any(bytes(view[:64]))
    del bundle
    gc.collect()
    assert not any(bytes(view)), "the plaintext outlived its bundle"
    del view


def test_bindings_ship_the_bundle_and_no_plaintext_model(sealed, tmp_path):
    """keyedge bindings --bundle: the C++ package's model/ holds the device's bundle only; a file that is
    not a bundle is refused with one line and nothing written."""
    root, key = sealed
    r = keyedge("bindings", root / "fused", "-o", tmp_path / "cpp", "--bundle", root / "fused.kes", *_trust(root))
    assert r.returncode == 0 and "no plaintext model" in r.stdout and "WARNING" not in r.stderr, r.stderr
    assert {p.name for p in (tmp_path / "cpp" / "model").iterdir()} == {"model.kes"}
    assert (tmp_path / "cpp" / "model" / "model.kes").read_bytes() == (root / "fused.kes").read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "cpp" / "model" / "model.kes").st_mode) == 0o600
    model = (root / "fused" / "model.onnx").read_bytes()
    for path in (tmp_path / "cpp").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert model[1000:1064] not in data and np.asarray(key.perm, "<u4").tobytes() not in data, path
    assert '"model.kes"' in (tmp_path / "cpp" / "src" / "keyedge_model_config.hpp").read_text()
    r = keyedge("bindings", root / "fused", "-o", tmp_path / "bad", "--bundle", root / "fused" / "model.onnx",
                *_trust(root))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a sealed bundle" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_inline_layout_undoes_the_bundle_layout(sealed):
    """TensorRT's parser takes one protobuf: graph + tensors put back together give the same model."""
    import onnxruntime as ort

    from keyedge.runtime.bundle import external_layout, inline_layout

    root, _ = sealed
    model = (root / "fused" / "model.onnx").read_bytes()
    graph, data = external_layout(model)
    assert len(data) > len(model) // 2  # the tensors did move out
    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)
    runs = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
            for m in (model, inline_layout(graph, memoryview(data)))]
    assert np.array_equal(*runs)
    with pytest.raises(BundleError, match="lies outside"):
        inline_layout(graph, memoryview(data)[:len(data) // 2])


def test_build_refuses_a_file_that_is_no_bundle_as_such(sealed, tmp_path):
    root, _ = sealed
    (tmp_path / "junk.kes").write_bytes(b"not a bundle at all")
    r = keyedge("build", tmp_path / "junk.kes", "--target", "desktop", "-o", tmp_path / "out",
                "--device-key", root / "device.key", *_trust(root), "--sign-with", root / "publisher.key")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a keyedge" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_bundle_is_built_into_an_engine_on_its_device_only(sealed, tmp_path, trained_keyed):
    """keyedge build on a bundle: an engine built in memory and sealed again to the device, where
    TensorRT and the target's GPU are; elsewhere one line, exit 2, nothing written (never a plan:
    a plan is plaintext)."""
    from keyedge.deploy.targets import load_target
    from keyedge.runtime.platform import local_gpu_capability, tensorrt_available

    root, _ = sealed
    run, key_path, _, _ = trained_keyed
    assert keyedge("export", run, "--key", key_path, "-o", tmp_path / "fp16", "--precision", "fp16").returncode == 0
    r = keyedge("seal", tmp_path / "fp16", "--to", root / "device.pub", "-o", tmp_path / "fp16.kes",
                "--sign-with", root / "publisher.key")
    assert r.returncode == 0, r.stderr  # the desktop target is strongly typed, fp16
    args = ("build", tmp_path / "fp16.kes", "--device-key", root / "device.key", *_trust(root),
            "--sign-with", root / "publisher.key", "--target", "desktop")
    r = keyedge(*args, "--plan-only", "-o", tmp_path / "plan")
    assert r.returncode == 2 and "--plan-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "plan").exists()
    r = keyedge(*args, "-o", tmp_path / "engine")
    if tensorrt_available() and local_gpu_capability() in load_target("desktop").compute_capabilities:
        assert r.returncode == 0, r.stderr
        opened = open_bundle(tmp_path / "engine" / "model.kes", _opener(root))
        assert opened.plain.publisher == _publisher(root).fingerprint
        assert opened.model_name == "model.engine"
        opened.wipe()
    else:
        assert r.returncode == 2 and "TensorRT" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "engine").exists()
