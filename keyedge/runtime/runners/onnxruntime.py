"""ONNX Runtime runner: CPU, and the CUDA / TensorRT execution providers when present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import KeyedgeError
from ...core.keys import Key
from ...core.manifests import ArtifactManifest, read_onnx_manifest
from ..bundle import EXTERNAL_DATA, Bundle, BundleError, SealedLoader
from .base import Runner, graph_feed, key_feed, wipe_feed

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
                 sealed: SealedLoader | None = None) -> None:
        super().__init__(sealed)
        if device not in PROVIDERS:
            raise KeyedgeError(f"device must be one of {', '.join(PROVIDERS)}")
        self.path = Path(path)
        self.manifest = manifest or read_onnx_manifest(self.path)
        self.input_spec = self.manifest.input
        self._check_key(key, f"artifact {self.path}")
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
        if self.sealed is None:
            self.session = ort.InferenceSession(str(self.path), opts, providers=wanted)
        else:  # ONNX Runtime copies the tensors into the session, so the plaintext can go at once
            bundle = self._open(f"artifact {self.path}")
            try:
                tensors = sealed_tensors(bundle)
                values = [ort.OrtValue.ortvalue_from_numpy(t) for t in tensors.values()]
                opts.add_external_initializers(list(tensors), values)
                self.session = ort.InferenceSession(bundle.plain.read("model.onnx"), opts, providers=wanted)
                del opts, values, tensors  # the views go before the buffer is unmapped
            finally:
                bundle.wipe()
        self._feed_extra = key_feed(self.manifest, self.key)

    def _deactivate(self) -> None:
        self.session = None
        wipe_feed(self._feed_extra)

    def infer(self, images: np.ndarray) -> np.ndarray:
        feed = {self.manifest.graph_input.name: graph_feed(images, self.manifest, self.key), **self._feed_extra}
        return self.session.run([self.manifest.output.name], feed)[0].astype(np.float32)


def sealed_tensors(sealed: Bundle) -> dict[str, np.ndarray]:
    """The graph's external tensors as arrays over the buffer they were decrypted into (no copy of
    keyedge's own). ONNX Runtime copies them into its session as initializers (as its API documents),
    without parsing them out of a protobuf; that copy is ONNX Runtime's, and keyedge cannot wipe it."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    if EXTERNAL_DATA not in sealed.plain.spans:
        return {}
    graph = onnx.load_model_from_string(sealed.plain.read("model.onnx"))
    base, size = sealed.plain.spans[EXTERNAL_DATA]
    tensors = {}
    for t in graph.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(tensor_dtype_to_np_dtype(t.data_type))
        offset, length, count = int(info.get("offset", 0)), int(info.get("length", -1)), int(np.prod(t.dims))
        if info.get("location") != EXTERNAL_DATA or length != count * dtype.itemsize or offset + length > size:
            raise BundleError(f"{sealed.path}: tensor {t.name} lies outside {EXTERNAL_DATA}")
        tensors[t.name] = np.frombuffer(sealed.plain.buffer, dtype, count, base + offset).reshape(tuple(t.dims))
    return tensors
