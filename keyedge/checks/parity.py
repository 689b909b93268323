"""Clean and adversarial accuracy parity between the PyTorch reference and its artifacts.

Adversarial examples are crafted once on the keyed PyTorch reference (white-box
with the key, and transfer from the public base), saved (npz, tagged with the key
fingerprint), and the *same tensors* are replayed through every artifact. An
artifact that takes uint8 images gets them rounded to the uint8 grid, and is
compared with the reference on exactly that rounded input.

The rule (:class:`~keyedge.checks.config.Tolerance`, per precision), on every set: the top-1
agreement with the reference is at least the precision's floor, and the accuracy difference is
within the tolerance -- or, for reduced precision, within twice it (or two images, on few images)
where McNemar's exact test on the images only one of the two gets right cannot tell it from
chance. int8 kernels differ between x86 CPUs (VNNI or not, AMX): check int8 parity on the CPU that
deploys it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest

from ..core.io import atomic_write_bytes
from ..core.manifests import ExecPrecision
from ..core.models import KeyedClassifier
from ..core.tables import markdown_table
from ..redteam.attacks.pgd import ce_loss, pgd
from ..runtime.runners import Runner
from .config import ParityConfig, Tolerance


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


def mcnemar_p(wins: int, losses: int) -> float:
    """McNemar's exact test: the two-sided p-value of ``wins`` images right only for the artifact against
    ``losses`` right only for the reference, if each such image were a fair coin."""
    return 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5).pvalue)


def compare(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """One image set: the artifact's accuracy against the reference's on the same inputs, and the verdict."""
    right, ref_right = logits.argmax(1) == labels, ref.argmax(1) == labels
    wins, losses = int((right & ~ref_right).sum()), int((~right & ref_right).sum())
    difference = float(right.mean() - ref_right.mean())
    agreement = float((logits.argmax(1) == ref.argmax(1)).mean())
    p_value = mcnemar_p(wins, losses)
    within = abs(difference) <= tol.accuracy + 1e-12 or (
        tol.paired_test and abs(difference) <= tol.excusable(len(labels)) + 1e-12 and p_value >= tol.alpha)
    err = np.abs(logits - ref)
    return {"accuracy": float(right.mean()), "reference_accuracy": float(ref_right.mean()), "difference": difference,
            "wins": wins, "losses": losses, "mcnemar_p": p_value, "top1_agreement": agreement,
            "max_abs_logit_error": float(err.max()), "mean_abs_logit_error": float(err.mean()),
            "passed": within and agreement >= tol.agreement}


def check_artifact(runner: Runner, reference: KeyedClassifier, sets: dict[str, torch.Tensor], y: torch.Tensor,
                   tolerance: Mapping[ExecPrecision, Tolerance]) -> dict[str, Any]:
    spec = runner.input_spec
    precision = runner.precision
    tol = tolerance[precision]
    expected = reference.key.fingerprint if reference.key is not None else None
    got_fp = runner.manifest.key_fingerprint
    result: dict[str, Any] = {"precision": precision, "fold_mode": runner.fold_mode,
                              "input": f"{spec.dtype} {spec.layout}", "tolerance": asdict(tol),
                              "key_fingerprint_match": got_fp == expected, "sets": {}}
    labels = y.numpy()
    for name, x in sets.items():
        feed = spec.from_canonical(x)
        ref = _reference_logits(reference, torch.as_tensor(spec.to_canonical(feed)))
        result["sets"][name] = compare(runner(feed), ref, labels, tol)
    result["max_accuracy_difference"] = max(abs(s["difference"]) for s in result["sets"].values())
    result["agreement_passed"] = all(s["top1_agreement"] >= tol.agreement for s in result["sets"].values())
    result["passed"] = all(s["passed"] for s in result["sets"].values()) and result["key_fingerprint_match"]
    return result


def _cell(s: dict[str, Any]) -> str:
    mark = "" if s["passed"] else " FAIL"
    return f"{100 * s['accuracy']:.1f}% ({100 * s['difference']:+.1f}, p {s['mcnemar_p']:.2f}){mark}"


def parity_markdown(report: dict[str, Any]) -> str:
    lines = ["# keyedge parity", "",
             f"Reference: {report['reference']} (key {report['key_fingerprint']}); {report['n']} images of "
             f"{report['data']}; adversarial sets crafted on the reference and replayed unchanged; measured on "
             f"{report['cpu']}.", ""]
    sets = list(next(iter(report["artifacts"].values()))["sets"]) if report["artifacts"] else []
    rows = []
    for name, r in report["artifacts"].items():
        verdict = "pass" if r["passed"] else ("FAIL: other key" if not r["key_fingerprint_match"] else
                                              "FAIL: agreement" if not r["agreement_passed"] else "FAIL")
        rows.append([name, r["runner"], r["precision"], r["input"], *(_cell(s) for s in r["sets"].values()),
                     f"{100 * min(s['top1_agreement'] for s in r['sets'].values()):.1f}%",
                     f"{max(s['max_abs_logit_error'] for s in r['sets'].values()):.2e}", verdict])
    rules = "; ".join(f"{k}: {Tolerance(**t).describe()}" for k, t in report["tolerance"].items())
    lines += [markdown_table(["artifact", "runner", "precision", "input", *sets, "least agreement",
                              "max abs logit err", "verdict"], rows),
              "", "Cells: accuracy of the artifact (difference to the reference on the same input, in points; "
              "McNemar's exact test on the images only one of them gets right). Rule: " + rules + ".", ""]
    return "\n".join(lines)
