"""``keyedge export --runtime openvino``: the verified ONNX as OpenVINO IR (int8 by NNCF, calibrated on the run's
keyed training images), verified again with OpenVINO, and -- where it executes in reduced precision (int8,
or the bf16 hint) -- held to parity's rule on the run's clean and adversarial test images before anything is
written."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checks.config import VERIFY_IMAGES, ParityConfig
from ..checks.parity import check_artifact, craft
from ..checks.verify import verify, verify_runner
from ..core.data import run_images
from ..core.errors import KeyedgeError
from ..core.io import check_output_dir, staged_dir
from ..core.keys import Key
from ..core.manifests import IR_FILE, ONNX_FILE, InferencePrecision, read_run, write_json
from ..core.progress import Echo, echo
from ..core.runs import base_checkpoint_path, load_run, load_surrogate
from ..deploy.config import ExportOptions
from ..deploy.onnx_export import export_onnx
from ..deploy.openvino_ir import calibration_feeds, convert, nncf_module, quantize_int8, write_ir
from ..deploy.targets import CpuTarget, load_cpu_target
from ..runtime.runners.openvino import OpenVinoRunner, check_inference_precision, has_bf16, openvino_core
from .export import VerificationFailed

PARITY_GATE_N = 200  # test images the reduced-precision gate replays clean and adversarial


def cpu_target(name: str | Path) -> tuple[CpuTarget, InferencePrecision]:
    """An OpenVINO CPU target profile and the inference precision it resolves to on this CPU (``auto``: bf16
    where the CPU has it); OpenVINO missing, or bf16 asked of a CPU without it, refused in one line."""
    target = load_cpu_target(name)
    core = openvino_core()
    return target, check_inference_precision(target.resolved_inference_precision(has_bf16(core)), core)


def _versions(base: dict[str, str], int8: bool) -> dict[str, str]:
    names = ("openvino", "nncf") if int8 else ("openvino",)
    return {**base, **{n: importlib.metadata.version(n) for n in names}}


def export_ir(run: Path, key_path: Path | Key | None, out: Path, opts: ExportOptions, *,
              inference_precision: str = "fp32", parity_n: int = PARITY_GATE_N, force: bool = False,
              calibration: torch.Tensor | None = None, echo: Echo = echo) -> dict[str, Any]:
    """Export ``run`` into ``out`` as OpenVINO IR; returns the verification report. Nothing is written when
    the ONNX or the IR fails verification, or a reduced-precision IR fails parity. ``calibration``: int8's
    calibration images ([0, 1] NCHW) instead of the run's training images (a benchmark's random-init run,
    which has none)."""
    check_output_dir(out, force)
    if (out / ONNX_FILE).exists():
        raise KeyedgeError(f"{out} holds an ONNX export: an OpenVINO IR goes into a directory of its own")
    if opts.precision == "fp16":
        raise KeyedgeError("--runtime openvino takes --precision fp32 or int8 (NNCF); half precision on x86 CPUs is "
                           "--inference-precision bf16")
    precision: InferencePrecision = check_inference_precision(inference_precision, openvino_core())
    int8 = opts.precision == "int8"
    if int8:
        nncf_module()
    manifest = read_run(run)
    key = Key.given(key_path)
    keyed = load_run(run, key)
    opts.resolved_mode(keyed.block_size, keyed.model.patch_embed.patch_size[0])  # refuse early
    real = run_images(manifest, VERIFY_IMAGES)
    if (int8 or precision == "bf16") and parity_n > 0 and real is None:
        raise KeyedgeError(f"a {'int8' if int8 else 'bf16'} IR is held to parity on the run's test images before it "
                           f"is written, and its data set {manifest.data.spec} is not here: export where it is, or "
                           "pass --parity-n 0 to write it unchecked (then run keyedge parity on the device's data)")
    calib = (calibration, None) if calibration is not None else \
        run_images(manifest, opts.calibration_n, train=True) if int8 else None
    if int8 and calib is None:
        raise KeyedgeError(f"int8 calibration needs the run's training images: its data set {manifest.data.spec} is "
                           "not here")
    with staged_dir(out, force=force) as stage:
        onnx_dir = stage / ".onnx"
        onnx_dir.mkdir()
        art = export_onnx(keyed, onnx_dir, dataclasses.replace(opts, precision="fp32"), manifest,
                          source=str(run.resolve()))
        onnx_report = verify(onnx_dir / ONNX_FILE, keyed, art, real[0] if real else None)
        if not onnx_report["passed"]:
            raise VerificationFailed("the ONNX the IR is converted from failed verification; nothing written")
        model = convert(onnx_dir / ONNX_FILE)
        ir = art.replace(runtime="openvino", inference_precision=precision, precision="int8" if int8 else "fp32",
                         int8_method="nncf" if int8 else None, versions=_versions(art.versions, int8))
        if int8:
            assert calib is not None
            model = quantize_int8(model, calibration_feeds(art.input.from_canonical(calib[0]), art, keyed.key))
        xml = write_ir(model, ir, stage)
        del model
        shutil.rmtree(onnx_dir)  # the IR's directory holds the IR
        runner = OpenVinoRunner(xml, keyed.key, manifest=ir)
        report = verify_runner(runner, keyed, ir, real[0] if real else None, calibrated=int8 and calibration is None)
        checks = ", ".join(f"{k} rel err {v['rel_error']:.2e}" + ("" if k == "real" or report["random_held"] else
                                                                  " (outside the calibrated ranges: not held)")
                           for k, v in report.items() if isinstance(v, dict))
        if not report["passed"]:
            agreement = (f", real top-1 agreement {100 * report['real']['material_agreement']:.1f}% (at least "
                         f"{100 * report['min_agreement']:.0f}%)" if "real" in report else "")
            raise VerificationFailed(f"OpenVINO verification failed ({checks}; tolerance {report['tolerance_rel']}, "
                                     f"{runner.precision}{agreement}); nothing written")
        if runner.precision != "fp32":
            report["parity"] = _parity_gate(runner, keyed, manifest, run, parity_n) if parity_n > 0 else None
        write_json(stage / "verification.json", report)
    gate = report.get("parity")
    echo(f"wrote {out / IR_FILE} (OpenVINO IR, {ir.fold_mode}, {runner.precision}, {ir.input.dtype} {ir.input.layout})"
         f"; verified with OpenVINO on {report['images']} images: {checks}"
         + ("" if real else " (no real images here: random inputs only)")
         + (f"; parity on {gate['n']} clean and adversarial test images: largest accuracy difference "
            f"{100 * gate['max_accuracy_difference']:.1f} points" if gate else "")
         + ("; --parity-n 0: parity NOT checked (run keyedge parity on the device's data)"
            if runner.precision != "fp32" and gate is None else ""))
    if ir.contains_key:
        echo(f"WARNING: {ir.secret}", err=True)
    return report


def _parity_gate(runner: OpenVinoRunner, keyed, manifest, run: Path, n: int) -> dict[str, Any]:
    """Parity's rule for the IR's execution precision on ``n`` test images (clean, white-box and transfer
    adversarials crafted on the PyTorch reference; :func:`export_ir` refused the export where they are not
    here); raises when it fails."""
    images = run_images(manifest, n)
    assert images is not None
    x, y = images
    cfg = ParityConfig(n=n)
    base_path = base_checkpoint_path(manifest, verify=False)
    base = load_surrogate(base_path, manifest) if base_path is not None else None
    with runner:
        result = check_artifact(runner, keyed, craft(keyed, x, y, cfg, base), y, cfg.tolerance)
    result["n"] = len(y)
    if not result["passed"]:
        worst = min(result["sets"].items(), key=lambda kv: (kv[1]["passed"], -abs(kv[1]["difference"]),
                                                            kv[1]["top1_agreement"]))
        rule = cfg.tolerance[runner.precision].describe(len(y))
        s = worst[1]
        raise VerificationFailed(f"the {runner.precision} IR fails parity with {run} ({worst[0]}: "
                                 f"{100 * s['accuracy']:.1f}% vs {100 * s['reference_accuracy']:.1f}%, McNemar p "
                                 f"{s['mcnemar_p']:.2f}, agreement {100 * s['top1_agreement']:.1f}%; the "
                                 f"{runner.precision} rule: {rule}); nothing written")
    return result
