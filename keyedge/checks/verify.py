"""The check after every export: the file, run by ONNX Runtime through keyedge's runner, against the PyTorch
keyed model on random and real images (logits, and top-1 agreement on the real ones).

A top-1 flip between classes the reference itself nearly ties (its margin within the precision's relative
tolerance of its logit range) is what that tolerance allows, not a defect: it is reported but not held
against the artifact. An undertrained model, whose logits are nearly flat, would otherwise fail an int8
export on a 0.7% logit error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.manifests import ArtifactManifest
from ..core.models import KeyedClassifier
from ..runtime.runners import OnnxRunner
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


def verify(path: Path, keyed: KeyedClassifier, manifest: ArtifactManifest, real: torch.Tensor | None, *,
           n: int = VERIFY_IMAGES, seed: int = 0) -> dict[str, Any]:
    """ONNX Runtime vs the PyTorch keyed model on ``n`` random and ``n`` real images, through the
    runner's own batching (a fixed-batch artifact gets them in chunks)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = manifest.input.size
    sets = {"random": torch.rand(n, manifest.input.channels, h, w, generator=gen)}
    if real is not None:
        sets["real"] = real[:n] if len(real) >= n else real.repeat(-(-n // len(real)), 1, 1, 1)[:n]
    tol, min_agree = VERIFY_TOLERANCE[manifest.precision]
    report: dict[str, Any] = {"tolerance_rel": tol, "min_agreement": min_agree, "images": n}
    with OnnxRunner(path, keyed.key, manifest=manifest) as runner:
        for name, images in sets.items():
            feed = manifest.input.from_canonical(images)
            got = torch.as_tensor(runner(feed))
            with torch.no_grad():
                want = keyed(torch.as_tensor(manifest.input.to_canonical(feed)))
            rel = float((got - want).norm() / want.norm().clamp_min(1e-12))
            raw, material = top1_agreement(got, want, tol)
            report[name] = {"rel_error": rel, "top1_agreement": raw, "material_agreement": material}
    report["passed"] = all(report[s]["rel_error"] <= tol and
                           (s == "random" or report[s]["material_agreement"] >= min_agree) for s in sets)
    return report
