"""One interface, several backends: ``with open_runner(path, key) as r: logits = r(images)``.

``images`` are plain images exactly as the artifact's input spec describes; logits
come back as a float32 numpy array. Parity, bench and verification only use this
interface and never special-case a backend.
"""

from __future__ import annotations

from pathlib import Path

from ...core.errors import KeyedgeError
from ...core.keys import Key
from ...core.manifests import ArtifactManifest, Backend, EngineManifest
from ..artifacts import Artifact, open_artifact
from ..bundle import Opener
from .base import Runner
from .ensemble import EnsembleRunner, QueryNoise
from .onnxruntime import OnnxRunner
from .openvino import OpenVinoRunner
from .tensorrt import TensorRTRunner
from .torch import TorchRunner

__all__ = ["Runner", "TorchRunner", "OnnxRunner", "OpenVinoRunner", "TensorRTRunner", "EnsembleRunner", "QueryNoise",
           "open_runner", "runner_for"]


def runner_for(artifact: Artifact, key: Key | None = None, *, device: str = "cpu", draw: int | None = None,
               query_noise: float | None = None, backend: Backend = "onnxruntime",
               inference_precision: str = "fp32") -> Runner:
    """The runner of a resolved artifact: torch for runs, ONNX Runtime (or, ``backend="openvino"``, OpenVINO
    with its ``inference_precision``) for .onnx, OpenVINO for an IR (in ``inference_precision`` with
    ``backend="openvino"``, else in the precision it was verified with), TensorRT for engines, a random
    ensemble's runner for an ensemble (``draw`` of its members answer each query). A sealed artifact is opened in memory at each
    activation, with the key its bundle holds (if any). ``query_noise``: RND, fresh Gaussian noise of that
    standard deviation added to every query."""
    if backend == "openvino" or artifact.kind == "ir":  # an IR runs on OpenVINO only, whatever the default
        runner = _openvino_runner(artifact, key, device, draw, inference_precision if backend == "openvino" else None)
    else:
        runner = _runner(artifact, key, device, draw)
    return runner if query_noise is None else QueryNoise(runner, query_noise)


def _openvino_runner(artifact: Artifact, key: Key | None, device: str, draw: int | None,
                     inference_precision: str | None) -> Runner:
    if device != "cpu":
        raise KeyedgeError(f"OpenVINO (--backend openvino, and OpenVINO IR artifacts) runs on the CPU, not on "
                           f"--device {device}")
    if artifact.kind == "engine":
        raise KeyedgeError(f"{artifact.path} is a TensorRT engine: it runs on TensorRT, not OpenVINO")
    if artifact.is_ensemble:
        raise KeyedgeError(f"{artifact.path} is a random ensemble: its runner is ONNX Runtime's (--backend onnxruntime)")
    if artifact.kind == "run":  # the PyTorch reference is what it is, whatever runs the exports
        return _runner(artifact, key, device, draw)
    if draw not in (None, 1):
        raise KeyedgeError(f"--ensemble-draw applies to a random ensemble's artifact; {artifact.path} is a single model")
    assert isinstance(artifact.manifest, ArtifactManifest)
    return OpenVinoRunner(artifact.path, key, inference_precision=inference_precision, manifest=artifact.manifest,
                          sealed=artifact.sealed)


def _runner(artifact: Artifact, key: Key | None, device: str, draw: int | None) -> Runner:
    if artifact.is_ensemble:
        if key is not None:
            raise KeyedgeError(f"{artifact.path} is a random ensemble: its members' keys are folded in, it takes no key")
        assert isinstance(artifact.manifest, ArtifactManifest)
        return EnsembleRunner(artifact.path, draw=draw or 1, device=device, manifest=artifact.manifest,
                              sealed=artifact.sealed)
    if draw not in (None, 1):
        raise KeyedgeError(f"--ensemble-draw applies to a random ensemble's artifact; {artifact.path} is a single model")
    if artifact.kind == "run":
        return TorchRunner(artifact.path, key, device=device)
    if artifact.kind == "onnx":
        assert isinstance(artifact.manifest, ArtifactManifest)
        return OnnxRunner(artifact.path, key, device=device, manifest=artifact.manifest, sealed=artifact.sealed)
    assert isinstance(artifact.manifest, EngineManifest)
    return TensorRTRunner(artifact.path, key, manifest=artifact.manifest, sealed=artifact.sealed)


def open_runner(path: str | Path, key: Key | None = None, *, device: str = "cpu", opener: Opener | None = None,
                draw: int | None = None, query_noise: float | None = None, backend: Backend = "onnxruntime",
                inference_precision: str = "fp32") -> Runner:
    """A runner (not yet active) for a run directory, an export/build directory, .onnx, .engine, a random
    ensemble's export or a sealed .kes bundle (``opener``: the device's private key and trusted publishers)."""
    return runner_for(open_artifact(path, opener=opener), key, device=device, draw=draw, query_noise=query_noise,
                      backend=backend, inference_precision=inference_precision)
