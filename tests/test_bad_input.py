"""Every command refuses bad input the same way: one line on stderr, exit code 2, no traceback, nothing
written, and a non-empty output directory untouched -- with the check made before the work. A table of
bad inputs per command (at least 15 each)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from keyedge import Key
from keyedge.core.resources import resource

from .helpers import keyedge

UNWRITABLE = Path("/proc/self/keyedge-out")  # no user (root neither) can create anything there


@pytest.fixture(scope="module")
def w(tmp_path_factory, trained_keyed):
    """A world of good and bad files: a run, exports, keys, a bundle; junk, empty files, directories,
    runs and artifacts broken in one place each, broken target profiles."""
    run, key_path, _, _ = trained_keyed
    w = tmp_path_factory.mktemp("world")
    ok = lambda r: (r.returncode == 0) or pytest.fail(r.stderr)  # noqa: E731
    ok(keyedge("export", run, "--key", key_path, "-o", w / "fused"))
    ok(keyedge("export", run, "--key", key_path, "-o", w / "gather", "--mode", "gather"))
    ok(keyedge("device", "keygen", "-o", w / "device.key"))
    ok(keyedge("publisher", "keygen", "-o", w / "publisher.key"))
    ok(keyedge("seal", w / "fused", "--to", w / "device.pub", "-o", w / "fused.kes", "--sign-with",
               w / "publisher.key"))
    ok(keyedge("seal", w / "fused", "--to", w / "device.pub", "-o", w / "unsigned.kes", "--allow-unsigned"))
    rng = np.random.default_rng(0)
    (w / "junk.bin").write_bytes(rng.bytes(4096))
    (w / "junk.kes").write_bytes(rng.bytes(4096))
    (w / "junk.safetensors").write_bytes(rng.bytes(4096))
    (w / "junk.toml").write_bytes(b"\xff\xfe" + rng.bytes(300))
    (w / "empty").write_bytes(b"")
    (w / "a_dir").mkdir()
    (w / "a_dir.kes").mkdir()
    (w / "truncated.kes").write_bytes((w / "fused.kes").read_bytes()[:5000])
    Key.generate(4).save(w / "other.bin")
    _key_files(w)
    (w / "file.txt").write_text("a file")
    text = resource("export", "targets", "desktop.toml").read_text()
    (w / "incomplete.toml").write_text('name = "x"\ntensorrt = 11\n')
    (w / "escape.toml").write_text(text.replace('timing_cache = "timing.cache"', 'timing_cache = "../escape.cache"'))
    (w / "types.toml").write_text(text.replace("workspace_mib = 4096", 'workspace_mib = "big"'))
    (w / "dla.toml").write_text(text.replace("enabled = false", "enabled = 3"))
    # runs broken in one place each
    for name in ("run_types", "run_weights", "run_manifest_dir", "run_manifest_junk", "run_version"):
        shutil.copytree(run, w / name)
    manifest = json.loads((run / "manifest.json").read_text())
    (w / "run_types" / "manifest.json").write_text(json.dumps({**manifest, "block_size": "four",
                                                               "input": {**manifest["input"], "size": "16x16"}}))
    (w / "run_weights" / "model.safetensors").write_bytes(rng.bytes(8192))
    (w / "run_manifest_dir" / "manifest.json").unlink()
    (w / "run_manifest_dir" / "manifest.json").mkdir()
    (w / "run_manifest_junk" / "manifest.json").write_bytes(b"\x00\xff{{{")
    (w / "run_version" / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    (w / "empty_dir").mkdir()
    # artifacts broken in one place each
    shutil.copytree(w / "fused", w / "art_junk_onnx")
    (w / "art_junk_onnx" / "model.onnx").write_bytes(rng.bytes(4096))
    (w / "precious").mkdir()
    (w / "precious" / "keep.txt").write_text("mine")
    (w / "out_file").write_text("not a directory")
    return w, run, key_path


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if "pycache" not in str(p)}


def _refused(w: Path, args: list, needle: str | None) -> None:
    before = _snapshot(w)
    r = keyedge(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}: {r.stdout[-500:]} {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("keyedge: error: "), r.stderr
    if needle:
        assert needle.lower() in lines[0].lower(), lines[0]
    after = _snapshot(w)
    assert after == before, f"written or changed: {set(after.items()) ^ set(before.items())}"
    assert not UNWRITABLE.exists()


# (name, args with placeholders: W = the world, R = the run, K = its key, O = a fresh output; needle)
CASES: dict[str, list[tuple[str, list, str | None]]] = {
    "keygen": [
        ("block size 0", ["keygen", "-o", "O/k.bin", "-m", "0"], "block-size"),
        ("block size 65", ["keygen", "-o", "O/k.bin", "-m", "65"], "block-size"),
        ("small key space 2", ["keygen", "-o", "W/k.bin", "-m", "2"], "2^128"),
        ("small key space 3", ["keygen", "-o", "W/k.bin", "-m", "3"], "2^128"),
        ("small key space gray", ["keygen", "-o", "W/k.bin", "-m", "4", "--channels", "1"], "2^128"),
        ("channels 0", ["keygen", "-o", "W/k.bin", "-m", "4", "--channels", "0"], "channels"),
        ("channels 17", ["keygen", "-o", "W/k.bin", "-m", "4", "--channels", "17"], "channels"),
        ("exists", ["keygen", "-o", "W/other.bin", "-m", "4"], "--force"),
        ("a directory", ["keygen", "-o", "W/a_dir", "-m", "4"], "directory"),
        ("missing directory", ["keygen", "-o", "W/nope/k.bin", "-m", "4"], "does not exist"),
        ("unwritable", ["keygen", "-o", f"{UNWRITABLE}/k.bin", "-m", "4"], None),
        ("seed not a number", ["keygen", "-o", "W/k.bin", "-m", "4", "--insecure-seed", "x"], "insecure-seed"),
        ("no output", ["keygen", "-m", "4"], "--out"),
        ("no block size", ["keygen", "-o", "W/k.bin"], "block-size"),
        ("unknown option", ["keygen", "-o", "W/k.bin", "-m", "4", "--colour"], "--colour"),
    ],
    "key inspect": [
        (name, ["key", "inspect", path], needle) for name, path, needle in [
            ("missing", "W/nope.bin", "does not exist"), ("a directory", "W/a_dir", "directory"),
            ("empty", "W/empty", "empty"), ("random bytes", "W/junk.bin", "not a keyedge key"),
            ("truncated", "W/truncated.kes", "not a keyedge key"), ("a device key", "W/device.key", "not a keyedge key"),
            ("a device public key", "W/device.pub", "not a keyedge key"),
            ("a publisher key", "W/publisher.key", "not a keyedge key"),
            ("a bundle", "W/fused.kes", "not a keyedge key"), ("an onnx file", "W/fused/model.onnx", "not a keyedge"),
            ("a manifest", "W/fused/manifest.json", "not a keyedge key"),
            ("bad version", "W/bad_version.bin", "version"), ("broken integrity", "W/tampered.bin", "integrity"),
            ("trailing bytes", "W/trailing.bin", "trailing"), ("unknown flags", "W/flags.bin", "flags"),
        ]
    ] + [("no argument", ["key", "inspect"], "missing")],
    "export": [
        ("run missing", ["export", "W/nope", "--key", "K", "-o", "O"], "does not exist"),
        ("run is a file", ["export", "W/file.txt", "--key", "K", "-o", "O"], "does not exist"),
        ("run without manifest", ["export", "W/empty_dir", "--key", "K", "-o", "O"], "does not exist"),
        ("manifest a directory", ["export", "W/run_manifest_dir", "--key", "K", "-o", "O"], "directory"),
        ("manifest junk", ["export", "W/run_manifest_junk", "--key", "K", "-o", "O"], "UTF-8"),
        ("manifest types", ["export", "W/run_types", "--key", "K", "-o", "O"], "expected"),
        ("manifest newer", ["export", "W/run_version", "--key", "K", "-o", "O"], "newer"),
        ("weights junk", ["export", "W/run_weights", "--key", "K", "-o", "O"], "model.safetensors"),
        ("no key", ["export", "R", "-o", "O"], "--key"),
        ("key missing", ["export", "R", "--key", "W/nope.bin", "-o", "O"], "does not exist"),
        ("key junk", ["export", "R", "--key", "W/junk.bin", "-o", "O"], "not a keyedge key"),
        ("another key", ["export", "R", "--key", "W/other.bin", "-o", "O"], "fingerprint"),
        ("output a file", ["export", "R", "--key", "K", "-o", "W/out_file"], "not a directory"),
        ("output not empty", ["export", "R", "--key", "K", "-o", "W/precious"], "--force"),
        ("output unwritable", ["export", "R", "--key", "K", "-o", str(UNWRITABLE)], "cannot write"),
        ("precision", ["export", "R", "--key", "K", "-o", "O", "--precision", "fp64"], "precision"),
        ("mode", ["export", "R", "--key", "K", "-o", "O", "--mode", "scramble"], "mode"),
        ("kernel without uint8", ["export", "R", "--key", "K", "-o", "W/precious", "--force", "--mode", "kernel"],
         "--mode kernel"),
    ],
    "seal": [
        ("artifact missing", ["seal", "W/nope", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/publisher.key"], "does not exist"),
        ("artifact a run", ["seal", "R", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/publisher.key"], "training run"),
        ("artifact junk onnx", ["seal", "W/art_junk_onnx", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/publisher.key"], "onnx"),
        ("to missing", ["seal", "W/fused", "--to", "W/nope.pub", "-o", "O.kes", "--sign-with", "W/publisher.key"], "does not exist"),
        ("to junk", ["seal", "W/fused", "--to", "W/junk.bin", "-o", "O.kes", "--sign-with", "W/publisher.key"], "not a keyedge device"),
        ("to a private key", ["seal", "W/fused", "--to", "W/device.key", "-o", "O.kes", "--sign-with", "W/publisher.key"], "private key, not a public"),
        ("to a publisher key", ["seal", "W/fused", "--to", "W/publisher.pub", "-o", "O.kes", "--sign-with", "W/publisher.key"], "publisher key"),
        ("not .kes", ["seal", "W/fused", "--to", "W/device.pub", "-o", "O.bin", "--sign-with", "W/publisher.key"], ".kes"),
        ("exists", ["seal", "W/fused", "--to", "W/device.pub", "-o", "W/fused.kes", "--sign-with", "W/publisher.key"], "--force"),
        ("missing directory", ["seal", "W/fused", "--to", "W/device.pub", "-o", "W/nope/x.kes", "--sign-with", "W/publisher.key"], "does not exist"),
        ("unwritable", ["seal", "W/fused", "--to", "W/device.pub", "-o", f"{UNWRITABLE}/x.kes", "--sign-with", "W/publisher.key"], None),
        ("gather without its key", ["seal", "W/gather", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/publisher.key"], "--key"),
        ("another key", ["seal", "W/gather", "--to", "W/device.pub", "-o", "O.kes", "--key", "W/other.bin", "--sign-with", "W/publisher.key"], "fingerprint"),
        ("unsigned", ["seal", "W/fused", "--to", "W/device.pub", "-o", "O.kes"], "--sign-with"),
        ("signing key missing", ["seal", "W/fused", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/nope.key"], "does not exist"),
        ("signing key junk", ["seal", "W/fused", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/junk.bin"], "not a keyedge publisher"),
        ("signing key public", ["seal", "W/fused", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/publisher.pub"], "public key, not a private"),
        ("signing key a device's", ["seal", "W/fused", "--to", "W/device.pub", "-o", "O.kes", "--sign-with", "W/device.key"], "device key"),
    ],
    "unseal": [
        ("missing", ["unseal", "W/nope.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "does not exist"),
        ("junk", ["unseal", "W/junk.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "not a keyedge sealed bundle"),
        ("truncated", ["unseal", "W/truncated.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "does not verify"),
        ("a directory", ["unseal", "W/a_dir.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "directory"),
        ("unsigned", ["unseal", "W/unsigned.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "not signed"),
        ("no trust", ["unseal", "W/fused.kes", "--device-key", "W/device.key"], "--trust"),
        ("trust junk", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/junk.bin"], "not a keyedge publisher"),
        ("trust a device key", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/device.pub"], "device key"),
        ("trust missing", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/nope.pub"], "does not exist"),
        ("no device key", ["unseal", "W/fused.kes", "--trust", "W/publisher.pub"], "--device-key"),
        ("device key junk", ["unseal", "W/fused.kes", "--device-key", "W/junk.bin", "--trust", "W/publisher.pub"], "not a keyedge device"),
        ("device key public", ["unseal", "W/fused.kes", "--device-key", "W/device.pub", "--trust", "W/publisher.pub"], "public key"),
        ("out without asking", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "-o", "O"], "--write-plaintext"),
        ("asking without out", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "--write-plaintext"], "--out"),
        ("out not empty", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "-o", "W/precious", "--write-plaintext"], "never over"),
        ("out a file", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "-o", "W/out_file", "--write-plaintext"], "not an empty directory"),
        ("out unwritable", ["unseal", "W/fused.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "-o", str(UNWRITABLE), "--write-plaintext"], "cannot write"),
    ],
    "bench": [
        ("missing", ["bench", "W/nope.onnx", "-o", "O"], "does not exist"),
        ("junk onnx", ["bench", "W/art_junk_onnx", "-o", "O"], "onnx"),
        ("empty dir", ["bench", "W/empty_dir", "-o", "O"], "holds no keyedge artifact"),
        ("junk bundle", ["bench", "W/junk.kes", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "-o", "O"], "not a keyedge sealed"),
        ("bundle without device key", ["bench", "W/fused.kes", "--trust", "W/publisher.pub", "-o", "O"], "--device-key"),
        ("bundle without trust", ["bench", "W/fused.kes", "--device-key", "W/device.key", "-o", "O"], "--trust"),
        ("gather without key", ["bench", "W/gather", "-o", "O"], "--key"),
        ("key junk", ["bench", "W/gather", "--key", "W/junk.bin", "-o", "O"], "not a keyedge key"),
        ("batch not numbers", ["bench", "W/fused", "--batch", "a,b", "-o", "O"], "--batch"),
        ("batch 0", ["bench", "W/fused", "--batch", "0", "-o", "O"], "--batch"),
        ("rounds 0", ["bench", "W/fused", "--rounds", "0", "-o", "O"], "--rounds"),
        ("device", ["bench", "W/fused", "--device", "tpu", "-o", "O"], "--device"),
        ("out a file", ["bench", "W/fused", "-o", "W/out_file"], "not a directory"),
        ("out not empty", ["bench", "W/fused", "-o", "W/precious"], "--force"),
        ("out unwritable", ["bench", "W/fused", "-o", str(UNWRITABLE)], "cannot write"),
        ("estimate junk target", ["bench", "W/fused", "--estimate", "--target", "W/junk.toml"], "UTF-8"),
        ("estimate unknown target", ["bench", "W/fused", "--estimate", "--target", "gameboy"], "unknown target"),
        ("estimate incomplete target", ["bench", "W/fused", "--estimate", "--target", "W/incomplete.toml"], "missing field"),
    ],
    "parity": [
        ("reference missing", ["parity", "W/fused", "--reference", "W/nope", "--key", "K", "-o", "O"], "does not exist"),
        ("reference not a run", ["parity", "W/fused", "--reference", "W/empty_dir", "--key", "K", "-o", "O"], "does not exist"),
        ("reference manifest a dir", ["parity", "W/fused", "--reference", "W/run_manifest_dir", "--key", "K", "-o", "O"], "directory"),
        ("reference types", ["parity", "W/fused", "--reference", "W/run_types", "--key", "K", "-o", "O"], "expected"),
        ("reference weights junk", ["parity", "W/fused", "--reference", "W/run_weights", "--key", "K", "-o", "O"], "safetensors"),
        ("key junk", ["parity", "W/fused", "--reference", "R", "--key", "W/junk.bin", "-o", "O"], "not a keyedge key"),
        ("another key", ["parity", "W/fused", "--reference", "R", "--key", "W/other.bin", "-o", "O"], "fingerprint"),
        ("artifact missing", ["parity", "W/nope.onnx", "--reference", "R", "--key", "K", "-o", "O"], "does not exist"),
        ("artifact junk", ["parity", "W/art_junk_onnx", "--reference", "R", "--key", "K", "-o", "O"], "onnx"),
        ("bundle without trust", ["parity", "W/fused.kes", "--reference", "R", "--key", "K", "--device-key", "W/device.key", "-o", "O"], "--trust"),
        ("bundle unsigned", ["parity", "W/unsigned.kes", "--reference", "R", "--key", "K", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "-o", "O"], "not signed"),
        ("n 0", ["parity", "W/fused", "--reference", "R", "--key", "K", "--n", "0", "-o", "O"], "--n"),
        ("data missing", ["parity", "W/fused", "--reference", "R", "--key", "K", "--data", "W/nope", "-o", "O"], "nope"),
        ("base junk", ["parity", "W/fused", "--reference", "R", "--key", "K", "--base", "W/junk.safetensors", "-o", "O"], "junk.safetensors"),
        ("out a file", ["parity", "W/fused", "--reference", "R", "--key", "K", "-o", "W/out_file"], "not a directory"),
        ("out not empty", ["parity", "W/fused", "--reference", "R", "--key", "K", "-o", "W/precious"], "--force"),
        ("out unwritable", ["parity", "W/fused", "--reference", "R", "--key", "K", "-o", str(UNWRITABLE)], "cannot write"),
    ],
    "audit": [
        ("artifact missing", ["audit", "W/nope", "--base", "R/model.safetensors", "-o", "O"], "does not exist"),
        ("artifact junk", ["audit", "W/art_junk_onnx", "--base", "R/model.safetensors", "-o", "O"], "onnx"),
        ("base missing", ["audit", "W/fused", "--base", "W/nope.safetensors", "-o", "O"], "does not exist"),
        ("base junk", ["audit", "W/fused", "--base", "W/junk.safetensors", "-o", "O"], "junk.safetensors"),
        ("base a file of another kind", ["audit", "W/fused", "--base", "W/file.txt", "-o", "O"], "file.txt"),
        ("base an empty dir", ["audit", "W/fused", "--base", "W/empty_dir", "-o", "O"], "does not exist"),
        ("key junk", ["audit", "W/fused", "--base", "R/model.safetensors", "--key", "W/junk.bin", "-o", "O"], "not a keyedge key"),
        ("run with junk weights", ["audit", "W/run_weights", "--base", "R/model.safetensors", "-o", "O"], "safetensors"),
        ("run with bad manifest", ["audit", "W/run_types", "--base", "R/model.safetensors", "-o", "O"], "expected"),
        ("fail-above 2", ["audit", "W/fused", "--base", "R/model.safetensors", "--fail-above", "2", "-o", "O"], "--fail-above"),
        ("n 0", ["audit", "W/fused", "--base", "R/model.safetensors", "--n", "0", "-o", "O"], "--n"),
        ("queries -1", ["audit", "W/fused", "--base", "R/model.safetensors", "--queries", "-1", "-o", "O"], "--queries"),
        ("device key junk", ["audit", "W/fused.kes", "--base", "R/model.safetensors", "--device-key", "W/junk.bin", "--trust", "W/publisher.pub", "-o", "O"], "not a keyedge device"),
        ("out a file", ["audit", "W/fused", "--base", "R/model.safetensors", "-o", "W/out_file"], "not a directory"),
        ("out not empty", ["audit", "W/fused", "--base", "R/model.safetensors", "-o", "W/precious"], "--force"),
        ("out unwritable", ["audit", "W/fused", "--base", "R/model.safetensors", "-o", str(UNWRITABLE)], "cannot write"),
    ],
    "build": [
        ("artifact missing", ["build", "W/nope", "--target", "desktop", "-o", "O"], "does not exist"),
        ("artifact a run", ["build", "R", "--target", "desktop", "-o", "O"], "not an exported artifact"),
        ("artifact junk onnx", ["build", "W/art_junk_onnx", "--target", "desktop", "-o", "O"], "onnx"),
        ("unknown target", ["build", "W/fused", "--target", "gameboy", "-o", "O"], "unknown target"),
        ("target junk bytes", ["build", "W/fused", "--target", "W/junk.toml", "-o", "O"], "UTF-8"),
        ("target missing", ["build", "W/fused", "--target", "W/nope.toml", "-o", "O"], "does not exist"),
        ("target incomplete", ["build", "W/fused", "--target", "W/incomplete.toml", "-o", "O"], "missing field"),
        ("target escapes", ["build", "W/fused", "--target", "W/escape.toml", "-o", "O"], "timing_cache"),
        ("target types", ["build", "W/fused", "--target", "W/types.toml", "-o", "O"], "workspace_mib"),
        ("target dla types", ["build", "W/fused", "--target", "W/dla.toml", "-o", "O"], "[dla]"),
        ("out a file", ["build", "W/fused", "--target", "desktop", "-o", "W/out_file"], "not a directory"),
        ("out not empty", ["build", "W/fused", "--target", "desktop", "-o", "W/precious"], "--force"),
        ("out unwritable", ["build", "W/fused", "--target", "desktop", "-o", str(UNWRITABLE)], "cannot write"),
        ("junk bundle", ["build", "W/junk.kes", "--target", "desktop", "-o", "O", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "not a keyedge"),
        ("bundle a directory", ["build", "W/a_dir.kes", "--target", "desktop", "-o", "O", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "directory"),
        ("bundle as a plan", ["build", "W/fused.kes", "--target", "desktop", "-o", "O", "--plan-only", "--device-key", "W/device.key", "--trust", "W/publisher.pub", "--sign-with", "W/publisher.key"], "plan"),
        ("bundle without a signing key", ["build", "W/fused.kes", "--target", "desktop", "-o", "O", "--device-key", "W/device.key", "--trust", "W/publisher.pub"], "--sign-with"),
    ],
    "bindings": [
        ("artifact missing", ["bindings", "W/nope", "-o", "O"], "does not exist"),
        ("artifact a run", ["bindings", "R", "-o", "O"], "training run"),
        ("artifact junk onnx", ["bindings", "W/art_junk_onnx", "-o", "O"], "onnx"),
        ("artifact an empty dir", ["bindings", "W/empty_dir", "-o", "O"], "holds no keyedge artifact"),
        ("name not an identifier", ["bindings", "W/fused", "-o", "O", "--name", "my package"], "C identifier"),
        ("name starts with a digit", ["bindings", "W/fused", "-o", "O", "--name", "1pkg"], "C identifier"),
        ("name too long", ["bindings", "W/fused", "-o", "O", "--name", "a" * 65], "C identifier"),
        ("bundle missing", ["bindings", "W/fused", "-o", "O", "--bundle", "W/nope.kes", "--trust", "W/publisher.pub"], "nope.kes"),
        ("bundle junk", ["bindings", "W/fused", "-o", "O", "--bundle", "W/junk.kes", "--trust", "W/publisher.pub"], "not a keyedge sealed"),
        ("bundle not a .kes", ["bindings", "W/fused", "-o", "O", "--bundle", "W/fused/model.onnx", "--trust", "W/publisher.pub"], "not a sealed bundle"),
        ("bundle unsigned", ["bindings", "W/fused", "-o", "O", "--bundle", "W/unsigned.kes", "--trust", "W/publisher.pub"], "not signed"),
        ("bundle without trust", ["bindings", "W/fused", "-o", "O", "--bundle", "W/fused.kes"], "--trust"),
        ("trust junk", ["bindings", "W/fused", "-o", "O", "--bundle", "W/fused.kes", "--trust", "W/junk.bin"], "not a keyedge publisher"),
        ("out a file", ["bindings", "W/fused", "-o", "W/out_file"], "not a directory"),
        ("out not empty", ["bindings", "W/fused", "-o", "W/precious"], "--force"),
        ("out unwritable", ["bindings", "W/fused", "-o", str(UNWRITABLE)], "cannot write"),
    ],
}


def _key_files(w: Path) -> None:
    """Key files broken in one place each (the integrity hash resealed where the test needs it)."""
    good = bytearray((w / "other.bin").read_bytes())
    body = good[:-32]
    reseal = lambda b: bytes(b) + hashlib.sha256(bytes(b)).digest()  # noqa: E731
    (w / "bad_version.bin").write_bytes(reseal(body[:8] + (7).to_bytes(2, "little") + body[10:]))
    tampered = bytearray(good)
    tampered[40] ^= 1
    (w / "tampered.bin").write_bytes(bytes(tampered))
    (w / "trailing.bin").write_bytes(bytes(good) + b"\0")
    flags = bytearray(body)
    flags[10] = 0x40
    (w / "flags.bin").write_bytes(reseal(flags))


def _expand(arg, w: Path, run: Path, key: Path, out: Path) -> str:
    """R: the run, K: its key, W/...: the world, R/...: inside the run, O...: the fresh output."""
    s = str(arg)
    if s in ("R", "K"):
        return str(run if s == "R" else key)
    for mark, base in (("W/", w), ("R/", run)):
        if s.startswith(mark):
            return str(base / s[2:])
    if s == "O" or s.startswith(("O/", "O.")):
        return str(out) + s[1:]
    return s


@pytest.mark.parametrize("command,case", [(c, i) for c, cases in CASES.items() for i in range(len(cases))],
                         ids=[f"{c}-{n}" for c, cases in CASES.items() for n, _, _ in cases])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(w, tmp_path, command, case):
    world, run, key = w
    name, args, needle = CASES[command][case]
    out = tmp_path / "out"
    _refused(world, [_expand(a, world, run, key, out) for a in args], needle)
    assert not out.exists() and not out.with_suffix(".kes").exists() and not out.with_suffix(".bin").exists()


def test_every_command_has_at_least_15_bad_inputs():
    assert all(len(cases) >= 15 for cases in CASES.values()), {c: len(v) for c, v in CASES.items()}
