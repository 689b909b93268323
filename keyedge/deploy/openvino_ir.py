"""OpenVINO IR from a verified ONNX artifact (x86 CPUs): fp32 as converted, or int8 by NNCF's post-training
quantization calibrated on the run's keyed training images.

The key stays as the ONNX has it: folded into the patch embedding, a Gather fed the permutation, or (kernel
mode) the keyed pixels the runtime's CPU twin makes. Calibration feeds the graph exactly what it meets when
deployed (the run's training images, and for kernel mode their keyed preprocessing), so the ranges NNCF
measures inside the graph are those of keyed images, not of a plain model's. NNCF's transformer scheme
quantizes the matrix products only: LayerNorm, Softmax and GELU stay in the inference precision, and so do
the classifier head (the graph's last MatMul), whose int8 error would move every logit at once, and the patch
embedding (the input layer, where a folded key lives).

The manifest goes into the IR's ``rt_info`` (``keyedge`` / ``manifest``) and beside it, as with ONNX.
Runs nothing for verification: that is :mod:`keyedge.checks.verify`'s, through a runner.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import KeyedgeError
from ..core.io import make_secret
from ..core.keys import Key
from ..core.manifests import IR_FILE, METADATA_NAME, ArtifactManifest
from ..runtime.kernel import reference_preprocess

RT_INFO_PATH = ["keyedge", METADATA_NAME]


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise KeyedgeError("--runtime openvino needs OpenVINO: pip install 'keyedge[openvino]'") from None
    return openvino


def nncf_module() -> Any:
    """NNCF, or a one-line refusal where it is missing (checked before any export work)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # NNCF's import probes for CUDA
    try:
        import nncf
    except ImportError:
        raise KeyedgeError("int8 for --runtime openvino is NNCF's post-training quantization: "
                           "pip install 'keyedge[openvino]'") from None
    nncf.set_log_level(logging.ERROR)
    return nncf


def convert(onnx_path: Path) -> Any:
    """The ONNX artifact as an ``openvino.Model`` (weights in fp32, as the ONNX has them)."""
    return _openvino().convert_model(str(onnx_path))


def calibration_feeds(images: np.ndarray, manifest: ArtifactManifest, key: Key | None,
                      batch: int = 1) -> list[dict[str, np.ndarray]]:
    """What the graph is fed when deployed, for each calibration batch: the images as its input spec takes
    them (keyed preprocessing first, for kernel mode) and a gather's key input."""
    feeds = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        graph = x if manifest.preprocess is None else reference_preprocess(x, key, manifest.preprocess.mean,
                                                                           manifest.preprocess.std)
        feed = {manifest.graph_input.name: np.ascontiguousarray(graph)}
        if manifest.key_input is not None:
            assert key is not None
            feed[manifest.key_input] = np.array(key.perm, dtype=np.int64)
        feeds.append(feed)
    return feeds


def head_matmul(model: Any) -> str:
    """The classifier head: the last MatMul before the output (kept out of int8)."""
    names = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
    if not names:
        raise KeyedgeError("the graph has no MatMul: not a ViT keyedge exports")
    return names[-1]


def kept_in_float(model: Any) -> list[str]:
    """The layers int8 leaves in higher precision: the patch embedding (the input layer, where a folded key
    lives; 0.7% of a ViT-B/16's FLOPs, and with it in int8 a random-init ViT-B/16 measured a relative logit error
    of 0.11 against 0.04 without) and the head."""
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return [*convs, head_matmul(model)]


def quantize_int8(model: Any, feeds: list[dict[str, np.ndarray]]) -> Any:
    """NNCF post-training int8 (the transformer scheme, per-channel weights), calibrated on ``feeds``; the
    patch embedding and the head stay in higher precision (:func:`kept_in_float`)."""
    nncf = nncf_module()
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bars
        return nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                             model_type=nncf.ModelType.TRANSFORMER,
                             ignored_scope=nncf.IgnoredScope(names=kept_in_float(model)))


def write_ir(model: Any, manifest: ArtifactManifest, directory: Path) -> Path:
    """``model.xml`` / ``model.bin`` (weights as they are: no fp16 compression) with the manifest inside and
    beside them."""
    model.set_rt_info(manifest.to_json(), RT_INFO_PATH)
    xml = directory / IR_FILE
    _openvino().save_model(model, str(xml), compress_to_fp16=False)
    make_secret(xml, xml.with_suffix(".bin"))  # a keyed model's weights (a folded one is the key itself)
    manifest.write(directory / "manifest.json")
    return xml
