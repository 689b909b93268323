"""OpenVINO runner: an exported ONNX artifact compiled by OpenVINO's CPU plugin (x86 edge CPUs).

``inference_precision`` is OpenVINO's inference precision hint: ``fp32`` executes in fp32; ``bf16``
executes the graph's matrix work in bfloat16 on CPUs that have it (AMX or AVX512-BF16: OpenVINO lists
``BF16`` among the CPU's optimization capabilities), and is refused in one line elsewhere, before anything is
loaded. The artifact's own precision (its weights) is unchanged; parity holds a bf16 execution to the bf16
rule. The key stays as the artifact has it: folded into the weights, or a Gather fed the permutation (the
graph's key input), or, for ``--mode kernel``, keyed preprocessing by the CPU twin of the CUDA kernel.
"""

from __future__ import annotations

from pathlib import Path
import typing
from typing import Any

import numpy as np

from ...core.errors import KeyedgeError
from ...core.keys import Key
from ...core.manifests import ArtifactManifest, ExecPrecision, InferencePrecision, read_onnx_manifest
from ..bundle import SealedLoader
from .base import Runner, graph_feed, key_feed, wipe_feed

INFERENCE_PRECISIONS: tuple[InferencePrecision, ...] = typing.get_args(InferencePrecision)
_HINT = {"fp32": "f32", "bf16": "bf16"}


def openvino_core() -> Any:
    """OpenVINO's runtime ``Core``, or a one-line refusal where the package is missing."""
    try:
        import openvino
    except ImportError:
        raise KeyedgeError("--backend openvino needs OpenVINO: pip install 'keyedge[openvino]'") from None
    return openvino.Core()


def check_inference_precision(precision: str, core: Any) -> InferencePrecision:
    """``precision`` if this CPU can execute it with OpenVINO (bf16: AMX or AVX512-BF16), else one line."""
    if precision not in INFERENCE_PRECISIONS:
        raise KeyedgeError(f"--inference-precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in caps:
            raise KeyedgeError("--inference-precision bf16 needs a CPU with AMX or AVX512-BF16; this one offers "
                               f"{', '.join(caps)} (use fp32)")
    return precision  # type: ignore[return-value]


class OpenVinoRunner(Runner):
    manifest: ArtifactManifest

    def __init__(self, path: str | Path, key: Key | None = None, *, inference_precision: str = "fp32",
                 threads: int | None = None, manifest: ArtifactManifest | None = None,
                 sealed: SealedLoader | None = None) -> None:
        super().__init__(sealed)
        if sealed is not None:
            raise KeyedgeError(f"{path}: a sealed bundle is opened by ONNX Runtime (--backend onnxruntime); "
                               "OpenVINO opens exported files")
        self.core = openvino_core()
        self.inference_precision = check_inference_precision(inference_precision, self.core)
        self.path = Path(path)
        self.manifest = manifest or read_onnx_manifest(self.path)
        if self.manifest.precision != "fp32" and self.inference_precision == "bf16":
            raise KeyedgeError(f"{self.path} is a {self.manifest.precision} artifact: bf16 execution applies to fp32 "
                               "artifacts")
        self.input_spec = self.manifest.input
        self._check_key(key, f"artifact {self.path}")
        self.threads = threads
        self.name = f"openvino-cpu-{self.inference_precision}"
        self.request: Any = None
        self._feed_extra: dict[str, np.ndarray] = {}

    @property
    def precision(self) -> ExecPrecision:
        return "bf16" if self.inference_precision == "bf16" else self.manifest.precision

    def _activate(self) -> None:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[self.inference_precision],
                                  "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        compiled = self.core.compile_model(self.core.read_model(str(self.path)), "CPU", config)
        self.request = compiled.create_infer_request()
        self._feed_extra = key_feed(self.manifest, self.key)

    def _deactivate(self) -> None:
        self.request = None
        wipe_feed(self._feed_extra)

    def infer(self, images: np.ndarray) -> np.ndarray:
        feed = {self.manifest.graph_input.name: graph_feed(images, self.manifest, self.key), **self._feed_extra}
        out = self.request.infer(feed)
        return np.array(out[self.request.model_outputs[0]], dtype=np.float32)
