"""Multi-step operations shared by the CLI, the demo and the benchmarks.

* :func:`export_run` -- load a run, merge LoRA, export ONNX and verify it, atomically.
* :func:`run_parity` -- craft adversarial sets on the reference and replay them through artifacts.
* :func:`load_surrogate` -- a plain classifier the attacker could have (run dir or checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer

from .artifacts import ArtifactManifest, RunManifest, read_run, write_json
from .data import run_images
from .errors import KeyedgeError
from .io import atomic_write_text, check_output_dir, staged_dir
from .keys import Key
from .models import KeyedClassifier, create_vit, load_checkpoint
from .onnx_export import TOLERANCE, ExportOptions, export_onnx
from .parity import ParityConfig, check_artifact, craft, parity_markdown, save_sets
from .runners import OnnxRunner, open_runner
from .runs import base_checkpoint_path, load_run

Echo = Callable[..., None]
_echo: Echo = typer.echo
VERIFY_IMAGES = 16  # real images checked after every export (at least)


class VerificationFailed(KeyedgeError):
    """The exported file does not match the PyTorch model: exit code 1, nothing written."""

    exit_code = 1


def load_surrogate(path: Path, target: RunManifest) -> KeyedClassifier:
    """A plain classifier the attacker could have: a run directory or a checkpoint file."""
    if path.is_dir():
        return load_run(path, None)
    spec = target.model
    model = create_vit(spec.name, **spec.kwargs)
    if any(k.startswith("head") for k in load_checkpoint(model, path)):
        raise KeyedgeError(f"{path} has no classifier head for {spec.num_classes} classes; "
                           "pass --base a model that classifies the same labels")
    return KeyedClassifier(model.eval(), None, target.input.mean, target.input.std)


def verify(path: Path, keyed: KeyedClassifier, manifest: ArtifactManifest, real: torch.Tensor | None, *,
           n: int = VERIFY_IMAGES, seed: int = 0) -> dict[str, Any]:
    """ONNX Runtime vs the PyTorch keyed model on ``n`` random and ``n`` real images, through the
    runner's own batching (a fixed-batch artifact gets them in chunks)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = manifest.input.size
    sets = {"random": torch.rand(n, manifest.input.channels, h, w, generator=gen)}
    if real is not None:
        sets["real"] = real[:n] if len(real) >= n else real.repeat(-(-n // len(real)), 1, 1, 1)[:n]
    tol, min_agree = TOLERANCE[manifest.precision]
    report: dict[str, Any] = {"tolerance_rel": tol, "min_agreement": min_agree, "images": n}
    with OnnxRunner(path, keyed.key, manifest=manifest) as runner:
        for name, images in sets.items():
            feed = manifest.input.from_canonical(images)
            got = torch.as_tensor(runner(feed))
            with torch.no_grad():
                want = keyed(torch.as_tensor(manifest.input.to_canonical(feed)))
            rel = float((got - want).norm() / want.norm().clamp_min(1e-12))
            agree = float((got.argmax(1) == want.argmax(1)).float().mean())
            report[name] = {"rel_error": rel, "top1_agreement": agree}
    report["passed"] = all(report[s]["rel_error"] <= tol and
                           (s == "random" or report[s]["top1_agreement"] >= min_agree) for s in sets)
    return report


def export_run(run: Path, key_path: Path | None, out: Path, opts: ExportOptions, *, force: bool = False,
               calibration_n: int = 64, echo: Echo = _echo) -> ArtifactManifest:
    """Load a run, merge LoRA, export + verify into ``out`` atomically. Exit 1 on failed verification."""
    check_output_dir(out, force)
    manifest = read_run(run)
    key = Key.load(key_path) if key_path else None
    keyed = load_run(run, key)
    opts.resolved_mode(keyed.block_size, keyed.model.patch_embed.patch_size[0])  # refuse early
    real = run_images(manifest, VERIFY_IMAGES)
    calib = run_images(manifest, calibration_n, train=True) if opts.int8_method == "static" else None
    with staged_dir(out, force=force) as stage:
        art = export_onnx(keyed, stage, opts, manifest, source=str(run.resolve()),
                          calibration=calib[0] if calib else None)
        report = verify(stage / "model.onnx", keyed, art, real[0] if real else None)
        checks = ", ".join(f"{k} rel err {v['rel_error']:.2e}" for k, v in report.items() if isinstance(v, dict))
        if not report["passed"]:
            raise VerificationFailed(f"ONNX Runtime verification failed ({checks}; tolerance "
                                     f"{report['tolerance_rel']}); nothing written")
        write_json(stage / "verification.json", report)
    echo(f"wrote {out / 'model.onnx'} ({art.fold_mode}, {art.precision}, "
         f"{art.input.dtype} {art.input.layout}); verified with ONNX Runtime on {report['images']} images: {checks}"
         + ("" if real else " (no real images here: random inputs only)"))
    if art.contains_key:
        echo(f"WARNING: {art.secret}", err=True)
    return art


def run_parity(reference: Path, key_path: Path | None, artifacts: list[Path], out: Path | None, *,
               data: str | None = None, base: Path | None = None, cfg: ParityConfig | None = None,
               force: bool = False, device_key=None) -> dict[str, Any]:
    """Craft on the reference, replay through every artifact, write the reports into ``out``."""
    cfg = cfg or ParityConfig()
    manifest = read_run(reference)
    key = Key.load(key_path) if key_path else None
    ref = load_run(reference, key)
    runners = [open_runner(a, key, device_key=device_key) for a in artifacts]  # refuse bad ones before crafting
    images = run_images(manifest, cfg.n, seed=cfg.seed, data=data)
    if images is None:
        raise KeyedgeError(f"the run's data set {manifest.data.spec} is not here; pass --data")
    x, y = images
    base_path = base if base is not None else base_checkpoint_path(manifest, verify=False)
    base_model = load_surrogate(base_path, manifest) if base_path is not None else None
    sets = craft(ref, x, y, cfg, base_model)
    report = {"reference": str(reference), "key_fingerprint": manifest.key_fingerprint,
              "data": manifest.data.spec if data is None else data, "n": len(y),
              "tolerance": cfg.tolerance, "attack": cfg.attack.linf().describe(), "artifacts": {}}
    for artifact, runner in zip(artifacts, runners):
        with runner:
            result = check_artifact(runner, ref, sets, y, cfg.tolerance)
        result["runner"] = runner.name
        report["artifacts"][str(artifact)] = result
    report["passed"] = all(r["passed"] for r in report["artifacts"].values())
    if out is not None:
        with staged_dir(out, force=force) as stage:
            save_sets(stage / "adversarial.npz", sets, y, manifest.key_fingerprint)
            write_json(stage / "parity.json", report)
            atomic_write_text(stage / "parity.md", parity_markdown(report))
    return report
