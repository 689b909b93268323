"""OpenVINO runner: an OpenVINO IR artifact (``keyedge export --runtime openvino``), or an exported ONNX
one, compiled by OpenVINO's CPU plugin (x86 edge CPUs).

``inference_precision`` is OpenVINO's inference precision hint: ``fp32`` executes in fp32; ``bf16``
executes the graph's matrix work in bfloat16 on CPUs that have it (AMX or AVX512-BF16: OpenVINO lists
``BF16`` among the CPU's optimization capabilities), and is refused in one line elsewhere, before anything is
loaded. The artifact's own precision (its weights) is unchanged; parity holds a bf16 execution to the bf16
rule. An IR runs by default with the precision it was verified with (its manifest's). The key stays as the
artifact has it: folded into the weights, or a Gather fed the permutation (the graph's key input), or, for
``--mode kernel``, keyed preprocessing by the CPU twin of the CUDA kernel.

A sealed IR bundle is opened in memory: OpenVINO reads the model from the XML's bytes and its weights from
a tensor over the buffer they were decrypted into, with no copy of keyedge's own. OpenVINO's CPU plugin
keeps executing from that tensor after compilation (wiping it then changes the outputs), so the buffer --
keyedge's own locked, never-dumped mapping -- is the weights' one plaintext copy while the runner is
active, and is wiped at deactivation; what the plugin repacks (e.g. bf16 copies of the weights) is
OpenVINO's memory, which keyedge cannot wipe.
"""

from __future__ import annotations

from pathlib import Path
import typing
from typing import Any

import numpy as np

from ...core.errors import KeyedgeError
from ...core.keys import Key
from ...core.manifests import (IR_FILE, IR_WEIGHTS, ArtifactManifest, ExecPrecision, InferencePrecision,
                               read_ir_manifest, read_onnx_manifest)
from ..bundle import Bundle, SealedLoader
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


def has_bf16(core: Any) -> bool:
    """Does OpenVINO execute bf16 on this CPU (AMX or AVX512-BF16)?"""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_inference_precision(precision: str, core: Any) -> InferencePrecision:
    """``precision`` if this CPU can execute it with OpenVINO (bf16: AMX or AVX512-BF16), else one line."""
    if precision not in INFERENCE_PRECISIONS:
        raise KeyedgeError(f"--inference-precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and not has_bf16(core):
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        raise KeyedgeError("--inference-precision bf16 needs a CPU with AMX or AVX512-BF16; this one offers "
                           f"{', '.join(caps)} (use fp32)")
    return precision  # type: ignore[return-value]


class OpenVinoRunner(Runner):
    manifest: ArtifactManifest

    def __init__(self, path: str | Path, key: Key | None = None, *, inference_precision: str | None = None,
                 threads: int | None = None, manifest: ArtifactManifest | None = None,
                 sealed: SealedLoader | None = None) -> None:
        super().__init__(sealed)
        self.path = Path(path)
        self.manifest = manifest or (read_ir_manifest if self.path.suffix == ".xml" else read_onnx_manifest)(self.path)
        self.is_ir = self.manifest.runtime == "openvino"
        if sealed is not None and not self.is_ir:
            raise KeyedgeError(f"{path}: a sealed ONNX bundle is opened by ONNX Runtime (--backend onnxruntime); "
                               "OpenVINO opens sealed IR bundles (keyedge export --runtime openvino)")
        self.core = openvino_core()
        wanted = inference_precision or self.manifest.inference_precision or "fp32"
        self.inference_precision = check_inference_precision(wanted, self.core)
        if self.manifest.precision != "fp32" and self.inference_precision == "bf16" and not self.is_ir:
            raise KeyedgeError(f"{self.path} is a {self.manifest.precision} artifact: bf16 execution applies to fp32 "
                               "artifacts")
        self.input_spec = self.manifest.input
        self._check_key(key, f"artifact {self.path}")
        self.threads = threads
        self.name = f"openvino-cpu-{self.inference_precision}"
        self.compiled: Any = None
        self.request: Any = None
        self._bundle: Bundle | None = None
        self._feed_extra: dict[str, np.ndarray] = {}

    @property
    def precision(self) -> ExecPrecision:
        """int8 for an int8 IR (its other operations in the inference precision), else the hint's."""
        if self.manifest.precision == "int8":
            return "int8"
        return "bf16" if self.inference_precision == "bf16" else self.manifest.precision

    def _activate(self) -> None:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[self.inference_precision],
                                  "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if self.sealed is None:
            model = self.core.read_model(str(self.path))
        else:
            self._bundle = self._open(f"artifact {self.path}")
            model = self._sealed_model(self._bundle)
        self.compiled = self.core.compile_model(model, "CPU", config)
        del model
        self.request = self.compiled.create_infer_request()
        self._feed_extra = key_feed(self.manifest, self.key)

    def _sealed_model(self, bundle: Bundle) -> Any:
        """The IR read from the bundle's buffer: the XML's bytes, the weights a tensor over the plaintext."""
        import openvino

        spans = bundle.plain.spans
        if bundle.model_name != IR_FILE or IR_WEIGHTS not in spans:
            raise KeyedgeError(f"{bundle.path} holds no OpenVINO IR ({IR_FILE} and {IR_WEIGHTS})")
        offset, size = spans[IR_WEIGHTS]
        weights = np.frombuffer(bundle.plain.buffer, np.uint8, size, offset)
        return self.core.read_model(bundle.plain.read(IR_FILE), openvino.Tensor(weights, shared_memory=True))

    def _deactivate(self) -> None:
        self.request = self.compiled = None  # OpenVINO lets go of the weights tensor before it is wiped
        wipe_feed(self._feed_extra)
        if self._bundle is not None:
            self._bundle.wipe()
            self._bundle = None

    def infer(self, images: np.ndarray) -> np.ndarray:
        feed = {self.manifest.graph_input.name: graph_feed(images, self.manifest, self.key), **self._feed_extra}
        out = self.request.infer(feed)
        return np.array(out[self.request.model_outputs[0]], dtype=np.float32)
