"""ONNX Runtime runner: CPU, and the CUDA / TensorRT execution providers when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import KeyedgeError
from ..keys import Key
from .base import Runner

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRunner(Runner):
    def __init__(self, path: str | Path, key: Key | None = None, *, device: str = "cpu",
                 threads: int | None = None) -> None:
        from ..onnx_export import read_manifest

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.key_input = self.manifest.get("key_input")
        self.check_key(self.manifest, key, f"artifact {self.path}", needs_key=self.needs_key(self.manifest))
        self.key = key
        if device not in PROVIDERS:
            raise KeyedgeError(f"device must be one of {', '.join(PROVIDERS)}")
        self.device, self.threads = device, threads
        self.name = f"onnxruntime-{device}"
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        if self.session is not None:
            return
        available = ort.get_available_providers()
        wanted = [p for p in PROVIDERS[self.device] if p in available]
        if PROVIDERS[self.device][0] not in available:
            raise KeyedgeError(f"ONNX Runtime here has no {PROVIDERS[self.device][0]} "
                               f"(available: {', '.join(available)}); install onnxruntime-gpu")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=wanted)
        self._feed_extra = {}
        if self.key_input is not None:
            self._feed_extra[self.key_input] = np.ascontiguousarray(self.key.perm, dtype=np.int64)

    def deactivate(self) -> None:
        self.session = None

    def infer(self, images: np.ndarray) -> np.ndarray:
        if self.session is None:
            self.activate()
        from ..onnx_export import graph_feed, graph_input_name

        feed = {graph_input_name(self.manifest): np.ascontiguousarray(graph_feed(images, self.manifest, self.key)),
                **self._feed_extra}
        return self.session.run([self.manifest["output"]["name"]], feed)[0].astype(np.float32)
