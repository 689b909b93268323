"""``keyedge export``: load a run, merge LoRA, export ONNX and verify it against PyTorch, atomically."""

from __future__ import annotations

from pathlib import Path

from ..checks.config import VERIFY_IMAGES
from ..checks.verify import verify
from ..core.data import run_images
from ..core.errors import KeyedgeError
from ..core.io import check_output_dir, staged_dir
from ..core.keys import Key
from ..core.manifests import ArtifactManifest, read_run, write_json
from ..core.progress import Echo, echo
from ..core.runs import load_run
from ..deploy.config import ExportOptions
from ..deploy.onnx_export import export_onnx


class VerificationFailed(KeyedgeError):
    """The exported file does not match the PyTorch model: exit code 1, nothing written."""

    exit_code = 1


def export_run(run: Path, key_path: Path | Key | None, out: Path, opts: ExportOptions, *, force: bool = False,
               echo: Echo = echo) -> ArtifactManifest:
    """Export ``run`` into ``out`` with ``opts`` and verify it; nothing is written when verification fails."""
    check_output_dir(out, force)
    manifest = read_run(run)
    key = Key.given(key_path)
    keyed = load_run(run, key)
    opts.resolved_mode(keyed.block_size, keyed.model.patch_embed.patch_size[0])  # refuse early
    real = run_images(manifest, VERIFY_IMAGES)
    calib = run_images(manifest, opts.calibration_n, train=True) if opts.int8_method == "static" else None
    with staged_dir(out, force=force) as stage:
        art = export_onnx(keyed, stage, opts, manifest, source=str(run.resolve()),
                          calibration=calib[0] if calib else None)
        report = verify(stage / "model.onnx", keyed, art, real[0] if real else None)
        checks = ", ".join(f"{k} rel err {v['rel_error']:.2e}" for k, v in report.items() if isinstance(v, dict))
        if not report["passed"]:
            agree = f", real top-1 agreement {report['real']['material_agreement']:.1%}" if real else ""
            raise VerificationFailed(f"ONNX Runtime verification failed ({checks}{agree}; tolerance "
                                     f"{report['tolerance_rel']}, agreement at least {report['min_agreement']:.0%}, "
                                     "near ties excused); nothing written")
        write_json(stage / "verification.json", report)
    echo(f"wrote {out / 'model.onnx'} ({art.fold_mode}, {art.precision}, "
         f"{art.input.dtype} {art.input.layout}); verified with ONNX Runtime on {report['images']} images: {checks}"
         + ("" if real else " (no real images here: random inputs only)"))
    if art.contains_key:
        echo(f"WARNING: {art.secret}", err=True)
    return art
