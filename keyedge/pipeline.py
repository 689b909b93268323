"""Multi-step operations shared by the CLI, the demo and the benchmarks.

* :func:`export_run` -- load a run, merge LoRA, export ONNX and verify it, atomically.
* :func:`run_parity` -- craft adversarial sets on the reference and replay them through artifacts.
* :func:`load_surrogate` -- a plain classifier the attacker could have (run dir or checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .data import run_images
from .errors import KeyedgeError
from .io import atomic_write_text, staged_dir
from .keys import Key
from .manifest import write_json
from .models import KeyedClassifier, create_vit, load_checkpoint
from .onnx_export import ExportOptions, export_onnx
from .parity import ParityConfig, check_artifact, craft, parity_markdown, save_sets
from .runners import open_runner
from .runs import base_checkpoint_path, load_run, read_run_manifest

Echo = Callable[..., None]
_echo: Echo = typer.echo


class VerificationFailed(KeyedgeError):
    """The exported file does not match the PyTorch model: exit code 1, nothing written."""

    exit_code = 1


def load_surrogate(path: Path, target_manifest: dict[str, Any]) -> KeyedClassifier:
    """A plain classifier the attacker could have: a run directory or a checkpoint file."""
    if path.is_dir():
        return load_run(path, None)
    spec = target_manifest["model"]
    model = create_vit(spec["name"], **spec["kwargs"])
    if any(k.startswith("head") for k in load_checkpoint(model, path)):
        raise KeyedgeError(f"{path} has no classifier head for {spec['kwargs']['num_classes']} classes; "
                           "pass --base a model that classifies the same labels")
    return KeyedClassifier(model.eval(), None, target_manifest["input"]["mean"], target_manifest["input"]["std"])


def export_run(run: Path, key_path: Path | None, out: Path, opts: ExportOptions, *, force: bool = False,
               calibration_n: int = 64, echo: Echo = _echo) -> dict[str, Any]:
    """Load a run, merge LoRA, export + verify into ``out`` atomically. Exit 1 on failed verification."""
    manifest = read_run_manifest(run)
    key = Key.load(key_path) if key_path else None
    keyed = load_run(run, key)
    opts.resolved_mode(keyed.block_size, keyed.model.patch_embed.patch_size[0])  # refuse early
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise KeyedgeError(f"{out} exists; pass --force to replace it")
    real = run_images(manifest, 16)
    calib = run_images(manifest, calibration_n, train=True) if opts.int8_method == "static" else None
    with staged_dir(out, overwrite=True) as stage:
        art_manifest, report = export_onnx(keyed, stage, opts, manifest, source=str(run.resolve()),
                                           real_images=real[0] if real else None,
                                           calibration=calib[0] if calib else None)
        checks = ", ".join(f"{k} rel err {v['rel_error']:.2e}" for k, v in report.items() if isinstance(v, dict))
        if not report["passed"]:
            raise VerificationFailed(f"ONNX Runtime verification failed ({checks}; tolerance "
                                     f"{report['tolerance_rel']}); nothing written")
        write_json(stage / "verification.json", report)
    echo(f"wrote {out / 'model.onnx'} ({art_manifest['fold_mode']}, {art_manifest['precision']}, "
         f"{art_manifest['input']['dtype']} {art_manifest['input']['layout']}); verified with ONNX Runtime: {checks}"
         + ("" if real else " (no real images here: random inputs only)"))
    if art_manifest["contains_key"]:
        echo(f"WARNING: {art_manifest['secret']}", err=True)
    return art_manifest


def run_parity(reference: Path, key_path: Path | None, artifacts: list[Path], out: Path | None, *,
               data: str | None = None, base: Path | None = None,
               cfg: ParityConfig | None = None) -> dict[str, Any]:
    """Craft on the reference, replay through every artifact, write the reports into ``out``."""
    cfg = cfg or ParityConfig()
    manifest = read_run_manifest(reference)
    key = Key.load(key_path) if key_path else None
    ref = load_run(reference, key)
    runners = [open_runner(a, key) for a in artifacts]  # refuse bad artifacts before crafting
    images = run_images(manifest, cfg.n, seed=cfg.seed, data=data)
    if images is None:
        raise KeyedgeError(f"the run's data set {manifest['data']['spec']} is not here; pass --data")
    x, y = images
    base_path = base if base is not None else base_checkpoint_path(manifest, verify=False)
    base_model = load_surrogate(base_path, manifest) if base_path is not None else None
    sets = craft(ref, x, y, cfg, base_model)
    report = {"reference": str(reference), "key_fingerprint": manifest.get("key_fingerprint"),
              "data": manifest["data"]["spec"] if data is None else data, "n": len(y),
              "tolerance": cfg.tolerance, "attack": cfg.attack.linf().describe(), "artifacts": {}}
    for artifact, runner in zip(artifacts, runners):
        with runner:
            result = check_artifact(runner, ref, sets, y, cfg.tolerance)
        result["runner"] = runner.name
        report["artifacts"][str(artifact)] = result
    report["passed"] = all(r["passed"] for r in report["artifacts"].values())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_sets(out / "adversarial.npz", sets, y, manifest.get("key_fingerprint"))
        write_json(out / "parity.json", report)
        atomic_write_text(out / "parity.md", parity_markdown(report))
    return report
