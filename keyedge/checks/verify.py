"""The check after every export: the file, run through keyedge's runner (ONNX Runtime, or OpenVINO for an
IR), against the PyTorch keyed model on random and real images (logits, and top-1 agreement on the real ones).

A top-1 flip between classes the reference itself nearly ties (its margin within the precision's relative
tolerance of its logit range) is what that tolerance allows, not a defect: it is reported but not held
against the artifact. An undertrained model, whose logits are nearly flat, would otherwise fail an int8
export on a 0.7% logit error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.manifests import ArtifactManifest
from ..core.models import KeyedClassifier
from ..runtime.runners import OnnxRunner, Runner
from ..runtime.runners.ensemble import EnsembleRunner
from .config import VERIFY_IMAGES, VERIFY_TOLERANCE


def top1_agreement(got: torch.Tensor, want: torch.Tensor, tol: float) -> tuple[float, float]:
    """(raw, material) top-1 agreement of ``got`` with ``want``: a disagreement is material when the reference
    prefers its class to the artifact's by more than ``tol`` times the reference's logit range."""
    rows = torch.arange(len(want))
    mine, theirs = want.argmax(1), got.argmax(1)
    margin = want[rows, mine] - want[rows, theirs]
    span = want.max(1).values - want.min(1).values
    material = margin > tol * span
    return float((mine == theirs).float().mean()), float(1 - material.float().mean())


def _image_sets(manifest: ArtifactManifest, real: torch.Tensor | None, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` random images (seeded) and ``n`` real ones (repeated if fewer), in [0, 1] NCHW."""
    gen = torch.Generator().manual_seed(seed)
    h, w = manifest.input.size
    sets = {"random": torch.rand(n, manifest.input.channels, h, w, generator=gen)}
    if real is not None:
        sets["real"] = real[:n] if len(real) >= n else real.repeat(-(-n // len(real)), 1, 1, 1)[:n]
    return sets


def _compare(got: torch.Tensor, want: torch.Tensor, tol: float) -> dict[str, float]:
    raw, material = top1_agreement(got, want, tol)
    return {"rel_error": float((got - want).norm() / want.norm().clamp_min(1e-12)),
            "top1_agreement": raw, "material_agreement": material}


def _passed(result: dict[str, Any], tol: float, min_agree: float, hold_random: bool = True) -> bool:
    """Every set held within the logit tolerance; the real images' material agreement at least the floor."""
    sets = [s for s in ("random", "real") if s in result and (hold_random or s == "real")]
    return all(result[s]["rel_error"] <= tol and (s == "random" or result[s]["material_agreement"] >= min_agree)
               for s in sets)


def verify(path: Path, keyed: KeyedClassifier, manifest: ArtifactManifest, real: torch.Tensor | None, *,
           n: int = VERIFY_IMAGES, seed: int = 0) -> dict[str, Any]:
    """ONNX Runtime vs the PyTorch keyed model on ``n`` random and ``n`` real images."""
    return verify_runner(OnnxRunner(path, keyed.key, manifest=manifest), keyed, manifest, real, n=n, seed=seed)


def verify_runner(runner: Runner, keyed: KeyedClassifier, manifest: ArtifactManifest, real: torch.Tensor | None,
                  *, n: int = VERIFY_IMAGES, seed: int = 0, calibrated: bool = False) -> dict[str, Any]:
    """An artifact's runner vs the PyTorch keyed model on ``n`` random and ``n`` real images, through the
    runner's own batching (a fixed-batch artifact gets them in chunks), under the rule of the precision the
    runner executes in. ``calibrated``: int8 whose activation ranges were calibrated on the real images'
    distribution -- uniform noise lies outside those ranges by design, so with real images here the random
    set is reported and only the real one is held (the parity gate then holds the clean and adversarial
    test sets)."""
    tol, min_agree = VERIFY_TOLERANCE[runner.precision]
    report: dict[str, Any] = {"tolerance_rel": tol, "min_agreement": min_agree, "images": n,
                              "runner": runner.name, "precision": runner.precision}
    with runner:
        for name, images in _image_sets(manifest, real, n, seed).items():
            feed = manifest.input.from_canonical(images)
            got = torch.as_tensor(runner(feed))
            with torch.no_grad():
                want = keyed(torch.as_tensor(manifest.input.to_canonical(feed)))
            report[name] = _compare(got, want, tol)
    hold_random = not calibrated or real is None
    report["random_held"] = hold_random
    report["passed"] = _passed(report, tol, min_agree, hold_random)
    return report


def verify_ensemble(directory: Path, members: list[KeyedClassifier], real: torch.Tensor | None, *,
                    n: int = VERIFY_IMAGES, seed: int = 0) -> dict[str, Any]:
    """Every member of a gathered ensemble graph (its rows selected for member ``i``) against member ``i``'s
    PyTorch reference, on the same random and real images, under the fp32 rule."""
    runner = EnsembleRunner(directory)
    tol, min_agree = VERIFY_TOLERANCE[runner.manifest.precision]
    report: dict[str, Any] = {"tolerance_rel": tol, "min_agreement": min_agree, "images": n, "members": {}}
    sets = _image_sets(runner.manifest, real, n, seed)
    with runner:
        for i, member in enumerate(members):
            result: dict[str, Any] = {}
            for name, images in sets.items():
                got = torch.as_tensor(runner.member_logits(images.numpy(), np.full(len(images), i, np.int64)))
                with torch.no_grad():
                    result[name] = _compare(got, member(images), tol)
            result["passed"] = _passed(result, tol, min_agree)
            report["members"][f"member-{i}"] = result
    report["passed"] = all(r["passed"] for r in report["members"].values())
    return report
