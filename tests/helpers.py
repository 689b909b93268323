"""Helpers shared by the tests (one module; test modules never import each other)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from keyedge import Key, create_vit

ROOT = Path(__file__).resolve().parent.parent
# the shared third-party headers (TensorRT 10.3 / 11.1, ONNX Runtime) beside the checkout
THIRD_PARTY = Path(os.environ.get("KEYEDGE_THIRD_PARTY", ROOT.parent / "shared" / "third_party"))


@dataclass
class Completed:
    """What a finished ``keyedge`` command left: exit code and the two streams."""
    returncode: int
    stdout: str
    stderr: str


def keyedge(*args, cwd=None) -> Completed:
    """Run ``keyedge ARGS`` in this process (Typer's CliRunner): fast, and exactly the CLI's code."""
    from typer.testing import CliRunner

    from keyedge.cli import app

    with contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
        result = CliRunner().invoke(app, [str(a) for a in args], prog_name="keyedge")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return Completed(result.exit_code, result.stdout, stderr)


def keyedge_process(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m keyedge.cli ARGS`` as its own process (the smoke tests of the real entry point)."""
    return subprocess.run([sys.executable, "-m", "keyedge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def tiny_vit(**overrides):
    """A small random-init ViT (no network): 32x32 input, patch 8, depth 2."""
    kwargs = dict(num_classes=10, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    kwargs.update(overrides)
    return create_vit("vit_tiny_patch16_224", **kwargs).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


TINY = dict(model="vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=10,
            model_kwargs=dict(depth=2, embed_dim=48, num_heads=3), data="digits", progress=False)


def tiny_train_config(out, **overrides):
    from keyedge.training.config import TrainConfig

    kwargs = dict(TINY, out=str(out), epochs=2, lr=3e-3, batch_size=64, force=True)
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def malformed_key_files() -> dict[str, tuple[bytes, str]]:
    """Broken key files, each with the words its refusal must contain."""
    good = Key.generate(2, seed=0).to_bytes()
    body = good[:-32]
    perm_offset = 36  # after the 20-byte header and the 16-byte key ID
    not_perm = bytearray(body)
    not_perm[perm_offset:perm_offset + 4] = not_perm[perm_offset + 4:perm_offset + 8]  # duplicate value
    bad_dims = bytearray(body)
    bad_dims[12:14] = struct.pack("<H", 3)  # block size 3 but 12 values
    tampered = bytearray(good)
    tampered[perm_offset] ^= 1
    return {
        "empty": (b"", "empty"),
        "truncated header": (good[:10], "truncated"),
        "truncated body": (good[:-5], "truncated"),
        "wrong magic": (b"NOTAKEY\x00" + good[8:], "wrong magic"),
        "unknown version": (_reseal(body[:8] + struct.pack("<H", 9) + body[10:]), "version 9"),
        "integrity": (bytes(tampered), "integrity"),
        "not a permutation": (_reseal(bytes(not_perm)), "not a permutation"),
        "dimension mismatch": (_reseal(bytes(bad_dims)), "does not match"),
    }


def listing(root: Path) -> set[str]:
    """Every path under ``root`` (to show that a refused command wrote nothing)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def fake_engine(export_dir: Path, dest: Path, tensorrt_version: str = "10.3.0") -> Path:
    """A file that is *not* a TensorRT engine, with a valid engine manifest beside it (the manifest
    an on-device build of ``export_dir`` for jetson-orin would write)."""
    from keyedge.core.manifests import BuildPlan, EngineManifest, read_onnx_manifest
    from keyedge.deploy.targets import load_target
    from keyedge.deploy.tensorrt import build_plan

    plan = build_plan(read_onnx_manifest(export_dir / "model.onnx"), load_target("jetson-orin"))
    engine = dest / "model.engine"
    engine.write_bytes(b"not an engine")
    EngineManifest(**plan.fields_of(BuildPlan), tensorrt_version=tensorrt_version,
                   compute_capability="8.7").write(dest / "model.engine.json")
    return engine


def runner_images(runner, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random images as ``runner``'s input spec takes them (uint8 or float in [0, 1])."""
    rng = np.random.default_rng(seed)
    shape = runner.input_spec.shape(n)
    if runner.input_spec.dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def max_rel_err(a, b) -> float:
    """The largest absolute difference relative to the largest magnitude of ``b`` (numpy arrays)."""
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
