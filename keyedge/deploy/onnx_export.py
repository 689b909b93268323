"""ONNX export of a keyed model: the key folded into the patch embedding, or kept as a gather.

* ``fused``: the key, the normalisation (and the 1/255 of uint8 input) live in the
  patch-embedding weights. The file takes plain images and *encodes the key*.
* ``gather``: an ONNX Gather applies the permutation before the patch embedding.
  By default the permutation is a second graph input (``key_perm``), so the file
  holds no key and the runtime supplies it from key.bin; ``embed_key`` bakes it in.
* ``kernel``: the graph takes already keyed-and-normalised NCHW float pixels
  (graph input ``pixels``); the runtime does uint8 HWC -> key gather -> normalise
  first, with keyedge's CUDA kernel (kernels/) on a GPU or its CPU twin, the key
  read from key.bin. The file holds no key.

The manifest (:class:`~keyedge.core.manifests.ArtifactManifest`) goes into the ONNX
``metadata_props`` and beside the file. Verification against the PyTorch model runs
through a runner, in :mod:`keyedge.checks.verify`: exporters never import runners.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import KeyedgeError
from ..core.io import make_secret
from ..core.fold import fold_key
from ..core.manifests import (METADATA_KEY, PRECISIONS, ArtifactInput, ArtifactManifest, FoldMode, GraphInput,
                              OutputSpec, Preprocess, RunManifest, library_versions)
from ..core.models import KeyedClassifier
from ..core.shuffle import permute_blocks
from ..runtime.kernel import MAX_CHANNELS, reference_preprocess
from .config import ExportOptions

INPUT_NAME, KEY_INPUT_NAME, OUTPUT_NAME, PIXELS_NAME = "images", "key_perm", "logits", "pixels"
SECRET_WARNING = ("this file encodes the secret key (in its weights or as a constant): "
                  "keep it as secret as key.bin")


class ExportModule(nn.Module):
    """What the ONNX graph computes: plain images (as the input spec says) -> logits."""

    def __init__(self, keyed: KeyedClassifier, mode: FoldMode, opts: ExportOptions) -> None:
        super().__init__()
        self.mode, self.uint8, self.nhwc = mode, opts.input == "uint8", opts.layout == "nhwc"
        self.block_size = keyed.block_size
        self.perm_is_input = mode == "gather" and keyed.key is not None and not opts.embed_key
        if mode == "fused":
            self.net = fold_key(keyed, input=opts.input)
        else:
            self.net = keyed.model
            self.register_buffer("mean", keyed.mean.clone())
            self.register_buffer("std", keyed.std.clone())
            if mode == "gather" and keyed.key is not None and opts.embed_key:
                self.register_buffer("perm", keyed.perm.clone())

    def forward(self, images: torch.Tensor, key_perm: torch.Tensor | None = None) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) if self.nhwc else images
        if self.mode == "kernel":  # x: normalize(shuffle(images)), done by the runtime
            return self.net(images)
        if self.mode == "fused":
            return self.net(x)
        x = x.to(torch.float32)
        if self.uint8:
            x = x / 255.0
        if self.block_size is not None:
            x = permute_blocks(x, key_perm if self.perm_is_input else self.perm, self.block_size)
        return self.net((x - self.mean) / self.std)


def _torch_export(module: ExportModule, example: tuple[torch.Tensor, ...], path: Path, opts: ExportOptions,
                  names: list[str]) -> None:
    dynamic = None
    if opts.batch is None:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic = ({0: batch},) + ((None,) * (len(example) - 1))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, None, input_names=names, output_names=[OUTPUT_NAME],
                                    opset_version=opts.opset, dynamo=True, dynamic_shapes=dynamic,
                                    external_data=False, verbose=False, optimize=True)
        program.save(str(path), external_data=False)


def _fp16(path: Path) -> None:
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(
            onnx.load(str(path)), keep_io_types=True,
            op_block_list=["LayerNormalization", "Softmax"])
    onnx.save(model, str(path))


class _Calibration:
    """Calibration images for static int8 quantization (onnxruntime CalibrationDataReader)."""

    def __init__(self, arrays: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(arrays)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _head(path: Path) -> list[str]:
    """The classifier head: the graph's last MatMul / Gemm (ONNX nodes are in topological order).
    Static int8 keeps it in float: quantizing the head's input per tensor to 8 bits costs most of the
    logits' error (the tests' digits ViT: 0.10 relative error with the head quantized, 0.02-0.04
    without), for a layer that is a tiny share of the compute."""
    import onnx

    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMul", "Gemm")]
    return names[-1:]


def _int8(path: Path, method: str, calibration: list[dict[str, np.ndarray]] | None) -> None:
    """Quantize MatMul / Gemm weights to int8 (dynamic, or static Q/DQ with calibration) with 7-bit weights
    (``reduce_range``): on x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels sum pairs of products in
    16 bits with saturation (VPMADDUBSW), which CPUs with VNNI or AMX do not; with weights in [-64, 64] no
    pair sum (at most 2 * 255 * 64 = 32640) can saturate, so every x86 CPU computes the same integers."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = path.with_name(path.stem + ".pre.onnx")
    out = path.with_name(path.stem + ".q.onnx")
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            if method == "dynamic":
                quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"], per_channel=False, reduce_range=True)
            else:
                if not calibration:
                    raise KeyedgeError("static int8 needs calibration images")
                quantize_static(str(pre), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=True,
                                nodes_to_exclude=_head(pre))
        out.replace(path)
    finally:
        pre.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def build_manifest(keyed: KeyedClassifier, mode: FoldMode, opts: ExportOptions, run: RunManifest,
                   source: str) -> ArtifactManifest:
    spec = run.input
    keyed_model = keyed.key is not None
    contains_key = keyed_model and (mode == "fused" or opts.embed_key)
    return ArtifactManifest(
        model=run.model, classes=run.data.classes,
        input=ArtifactInput(name=INPUT_NAME, size=spec.size, channels=spec.channels, layout=opts.layout.upper(),
                            dtype="uint8" if opts.input == "uint8" else "float32",
                            range=(0, 255) if opts.input == "uint8" else (0.0, 1.0),
                            batch=opts.batch if opts.batch is not None else "dynamic"),
        output=OutputSpec(OUTPUT_NAME, run.model.num_classes),
        mean=spec.mean, std=spec.std, block_size=keyed.block_size,
        key_fingerprint=keyed.key.fingerprint if keyed_model else None,
        fold_mode=mode if keyed_model else "plain",
        key_input=KEY_INPUT_NAME if mode == "gather" and keyed_model and not opts.embed_key else None,
        preprocess=None if mode != "kernel" else Preprocess(
            "keyedge-kernel", keyed.block_size, spec.mean, spec.std, GraphInput(PIXELS_NAME, "NCHW", "float32")),
        contains_key=contains_key, secret=SECRET_WARNING if contains_key else None,
        precision=opts.precision, int8_method=opts.int8_method if opts.precision == "int8" else None,
        opset=opts.opset, source_run=source, versions=library_versions())


def _attach_manifest(path: Path, manifest: ArtifactManifest) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    prop = model.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, manifest.to_json()
    model.producer_name = "keyedge"
    onnx.save(model, str(path), save_as_external_data=False)
    make_secret(path)  # a keyed model's weights (a fused one is the key itself)


def export_onnx(keyed: KeyedClassifier, out_dir: Path, opts: ExportOptions, run: RunManifest, *,
                source: str = "", calibration: torch.Tensor | None = None) -> ArtifactManifest:
    """Export into ``out_dir`` (model.onnx + manifest.json); returns the artifact's manifest.

    ``out_dir`` should be a fresh staging directory: the caller verifies the file and
    discards the directory on failure.
    """
    if opts.precision not in PRECISIONS:
        raise KeyedgeError(f"precision must be fp32, fp16 or int8, not {opts.precision!r}")
    if opts.batch is not None and opts.batch < 1:
        raise KeyedgeError("--batch must be >= 1")
    keyed = keyed.eval()
    mode = opts.resolved_mode(keyed.block_size, keyed.model.patch_embed.patch_size[0])
    if mode == "kernel" and (opts.input != "uint8" or opts.layout != "nhwc" or keyed.key is None):
        raise KeyedgeError("--mode kernel is for keyed models and takes what the CUDA kernel reads: "
                           "pass --input uint8 --layout nhwc")
    if mode == "kernel" and keyed.key is not None and keyed.key.channels > MAX_CHANNELS:
        raise KeyedgeError(f"--mode kernel takes images of 1 to {MAX_CHANNELS} channels (the CUDA kernel's), not "
                           f"{keyed.key.channels}: use --mode gather")
    manifest = build_manifest(keyed, mode, opts, run, source)
    module = ExportModule(keyed, mode, opts).eval()
    graph = manifest.graph_input
    example_batch = opts.batch or 2
    dtype = torch.uint8 if graph.dtype == "uint8" else torch.float32
    example: tuple[torch.Tensor, ...] = (torch.zeros(graph.shape(example_batch), dtype=dtype),)
    names = [graph.name]
    if module.perm_is_input:
        example += (keyed.perm.clone(),)
        names.append(KEY_INPUT_NAME)
    path = out_dir / "model.onnx"
    _torch_export(module, example, path, opts, names)
    if opts.precision == "fp16":
        _fp16(path)
    elif opts.precision == "int8":
        feeds = None
        if opts.int8_method == "static":
            if calibration is None:
                raise KeyedgeError("static int8 needs calibration images from the data set")
            feeds = [_calibration_feed(manifest, calibration[i:i + example_batch], keyed, module.perm_is_input)
                     for i in range(0, len(calibration) - example_batch + 1, example_batch)]
        _int8(path, opts.int8_method, feeds)
    _attach_manifest(path, manifest)
    manifest.write(out_dir / "manifest.json")
    return manifest


def _calibration_feed(manifest: ArtifactManifest, images: torch.Tensor, keyed: KeyedClassifier,
                      perm_is_input: bool) -> dict[str, np.ndarray]:
    """One calibration batch as the graph takes it (kernel mode: the kernel's output)."""
    feed = manifest.input.from_canonical(images)
    if manifest.preprocess is not None:
        feed = reference_preprocess(feed, keyed.key, manifest.mean, manifest.std)
    extra = {KEY_INPUT_NAME: keyed.key.perm.astype(np.int64)} if perm_is_input else {}
    return {manifest.graph_input.name: feed, **extra}
