"""Clean and adversarial accuracy parity between the PyTorch reference and its artifacts.

Adversarial examples are crafted once on the keyed PyTorch reference (white-box
with the key, and transfer from the public base), saved (npz, tagged with the key
fingerprint), and the *same tensors* are replayed through every artifact. An
artifact that takes uint8 images gets them rounded to the uint8 grid, and is
compared with the reference on exactly that rounded input.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attacks.pgd import ce_loss, pgd
from .evaluate import EvalConfig
from .io import atomic_write_bytes
from .models import KeyedClassifier
from .runners import Runner

# allowed accuracy difference (fraction) by precision: 0.1 point fp32, 1 point fp16/int8
DEFAULT_TOLERANCE = {"fp32": 0.001, "fp16": 0.01, "int8": 0.01}


@dataclass
class ParityConfig:
    n: int = 200
    attack: EvalConfig = field(default_factory=EvalConfig)
    tolerance: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    seed: int = 0


def craft(reference: KeyedClassifier, x: torch.Tensor, y: torch.Tensor, cfg: ParityConfig,
          base: KeyedClassifier | None = None) -> dict[str, torch.Tensor]:
    """The image sets every artifact is checked on: clean, white-box and transfer adversarials."""
    torch.manual_seed(cfg.seed)
    a = cfg.attack
    sets = {"clean": x,
            "whitebox_linf": pgd(ce_loss(reference), x, y, a.linf(), a.batch_size),
            "whitebox_l2": pgd(ce_loss(reference), x, y, a.l2(), a.batch_size)}
    if base is not None:
        sets["pgd_linf_transfer_base"] = pgd(ce_loss(base), x, y, a.linf(), a.batch_size)
        sets["pgd_l2_transfer_base"] = pgd(ce_loss(base), x, y, a.l2(), a.batch_size)
    return sets


def save_sets(path: Path, sets: dict[str, torch.Tensor], y: torch.Tensor, fingerprint: str | None) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=y.numpy(), key_fingerprint=np.array(fingerprint or ""),
                        **{name: v.numpy() for name, v in sets.items()})
    return atomic_write_bytes(path, buf.getvalue())


def load_sets(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    with np.load(path) as data:
        sets = {k: torch.as_tensor(data[k]) for k in data.files if k not in ("labels", "key_fingerprint")}
        return sets, torch.as_tensor(data["labels"]), str(data["key_fingerprint"])


@torch.no_grad()
def _reference_logits(reference: KeyedClassifier, x: torch.Tensor) -> np.ndarray:
    return torch.cat([reference(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()


def check_artifact(runner: Runner, reference: KeyedClassifier, sets: dict[str, torch.Tensor], y: torch.Tensor,
                   tolerance: dict[str, float]) -> dict[str, Any]:
    spec = runner.input_spec
    precision = runner.precision
    tol = tolerance.get(precision, tolerance["fp32"])
    expected = reference.key.fingerprint if reference.key is not None else None
    got_fp = runner.manifest.key_fingerprint
    result: dict[str, Any] = {"precision": precision, "fold_mode": runner.fold_mode,
                              "input": f"{spec.dtype} {spec.layout}", "tolerance": tol,
                              "key_fingerprint_match": got_fp == expected, "sets": {}}
    labels = y.numpy()
    for name, x in sets.items():
        feed = spec.from_canonical(x)
        logits = runner(feed)
        ref = _reference_logits(reference, torch.as_tensor(spec.to_canonical(feed)))
        acc, ref_acc = float((logits.argmax(1) == labels).mean()), float((ref.argmax(1) == labels).mean())
        err = np.abs(logits - ref)
        result["sets"][name] = {
            "accuracy": acc, "reference_accuracy": ref_acc, "difference": acc - ref_acc,
            "top1_agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_error": float(err.max()), "mean_abs_logit_error": float(err.mean())}
    worst = max(abs(s["difference"]) for s in result["sets"].values())
    result["max_accuracy_difference"] = worst
    result["passed"] = worst <= tol + 1e-12 and result["key_fingerprint_match"]
    return result


def parity_markdown(report: dict[str, Any]) -> str:
    from .report import markdown_table

    lines = ["# keyedge parity", "",
             f"Reference: {report['reference']} (key {report['key_fingerprint']}); {report['n']} images of "
             f"{report['data']}; adversarial sets crafted on the reference and replayed unchanged.", ""]
    sets = list(next(iter(report["artifacts"].values()))["sets"]) if report["artifacts"] else []
    rows = []
    for name, r in report["artifacts"].items():
        verdict = "pass" if r["passed"] else ("FAIL: other key" if not r["key_fingerprint_match"] else "FAIL")
        rows.append([name, r["runner"], r["precision"], r["input"],
                     *(f"{100 * s['accuracy']:.1f}% ({100 * s['difference']:+.1f})" for s in r["sets"].values()),
                     f"{100 * min(s['top1_agreement'] for s in r['sets'].values()):.1f}%",
                     f"{max(s['max_abs_logit_error'] for s in r['sets'].values()):.2e}", verdict])
    lines += [markdown_table(["artifact", "runner", "precision", "input", *sets, "agreement (min)",
                              "max abs logit err", "verdict"], rows),
              "", "Cells: accuracy of the artifact (difference to the reference on the same input, in points). "
              "Tolerance: " + ", ".join(f"{k} {100 * v:.1f} point" for k, v in report["tolerance"].items()) + ".", ""]
    return "\n".join(lines)
