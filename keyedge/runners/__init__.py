"""One interface, several backends: ``with open_runner(path, key) as r: logits = r(images)``.

``images`` are plain images exactly as the artifact's input spec describes; logits
come back as a float32 numpy array. Parity, bench and verification only use this
interface and never special-case a backend.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import Artifact, EngineManifest, open_artifact
from ..keys import Key
from .base import Runner
from .onnxruntime import OnnxRunner
from .torch import TorchRunner

__all__ = ["Runner", "TorchRunner", "OnnxRunner", "open_runner", "runner_for"]


def runner_for(artifact: Artifact, key: Key | None = None, *, device: str = "cpu") -> Runner:
    """The runner of a resolved artifact: torch for runs, ONNX Runtime for .onnx, TensorRT for engines.
    A sealed artifact runs from memory, with the key its bundle holds (if any)."""
    sealed = artifact.sealed
    if sealed is not None and sealed.key_bytes is not None:
        key = Key.from_bytes(sealed.key_bytes, source=f"{artifact.path} (sealed key)")
    if artifact.kind == "run":
        return TorchRunner(artifact.path, key, device=device)
    if artifact.kind == "onnx":
        return OnnxRunner(artifact.path, key, device=device, manifest=artifact.manifest,  # type: ignore[arg-type]
                          sealed=sealed)
    from .tensorrt import TensorRTRunner

    assert isinstance(artifact.manifest, EngineManifest)
    return TensorRTRunner(artifact.path, key, manifest=artifact.manifest, sealed=sealed)


def open_runner(path: str | Path, key: Key | None = None, *, device: str = "cpu", device_key=None) -> Runner:
    """A runner (not yet active) for a run directory, an export/build directory, .onnx, .engine or a
    sealed .kes bundle (``device_key``: the device's private key; the bundle is opened in memory)."""
    return runner_for(open_artifact(path, device_key=device_key), key, device=device)
