"""ONNX Runtime runner: CPU, and the CUDA / TensorRT execution providers when present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactManifest, read_onnx_manifest
from ..errors import KeyedgeError
from ..keys import Key
from .base import Runner, checked_key, graph_feed

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    # TensorRT-RTX through ONNX Runtime's NV execution provider (onnxruntime-ep-nv-tensorrt-rtx)
    "nv-tensorrt-rtx": ["NvTensorRTRTXExecutionProvider", "CPUExecutionProvider"],
}


def gpu_backends(available: list[str]) -> list[str]:
    """The ONNX Runtime devices a GPU bench measures beside the CPU, from the providers present."""
    return [d for d in ("cuda", "nv-tensorrt-rtx") if PROVIDERS[d][0] in available]


class OnnxRunner(Runner):
    manifest: ArtifactManifest

    def __init__(self, path: str | Path, key: Key | None = None, *, device: str = "cpu",
                 threads: int | None = None, manifest: ArtifactManifest | None = None,
                 model_bytes: bytearray | None = None) -> None:
        super().__init__()
        self.model_bytes = model_bytes  # a sealed artifact, opened in memory: wiped once the session holds it
        if device not in PROVIDERS:
            raise KeyedgeError(f"device must be one of {', '.join(PROVIDERS)}")
        self.path = Path(path)
        self.manifest = manifest or read_onnx_manifest(self.path)
        self.input_spec = self.manifest.input
        self.key = checked_key(self.manifest, key, f"artifact {self.path}")
        self.device, self.threads = device, threads
        self.name = f"onnxruntime-{device}"
        self.session: Any = None
        self._feed_extra: dict[str, np.ndarray] = {}

    def _activate(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if PROVIDERS[self.device][0] not in available:
            raise KeyedgeError(f"ONNX Runtime here has no {PROVIDERS[self.device][0]} "
                               f"(available: {', '.join(available)}); install onnxruntime-gpu")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        wanted = [p for p in PROVIDERS[self.device] if p in available]
        if self.model_bytes is None:
            self.session = ort.InferenceSession(str(self.path), opts, providers=wanted)
        else:
            if not any(self.model_bytes):
                raise KeyedgeError(f"{self.path} was opened once and its buffer wiped: open the bundle again")
            self.session = ort.InferenceSession(bytes(self.model_bytes), opts, providers=wanted)
            from ..seal import wipe

            wipe(self.model_bytes)
        if self.manifest.key_input is not None:
            assert self.key is not None  # checked_key
            self._feed_extra = {self.manifest.key_input: np.ascontiguousarray(self.key.perm, dtype=np.int64)}

    def _deactivate(self) -> None:
        self.session = None
        self._feed_extra = {}

    def infer(self, images: np.ndarray) -> np.ndarray:
        feed = {self.manifest.graph_input.name: graph_feed(images, self.manifest, self.key), **self._feed_extra}
        return self.session.run([self.manifest.output.name], feed)[0].astype(np.float32)
