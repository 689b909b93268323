"""What the checks hold artifacts to, and how long they measure -- the one source of their defaults (the
CLI reads them). No torch here."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from ..core.manifests import Precision
from ..redteam.config import EvalConfig


@dataclass(frozen=True)
class Tolerance:
    """What an artifact of one precision may change against its PyTorch reference, on the same images.

    * ``accuracy``: a difference in accuracy (a fraction) that passes on any set;
    * ``agreement``: the least top-1 agreement with the reference on the clean images;
    * ``paired_test``: a larger difference still passes when McNemar's exact test on the images the two
      disagree about cannot tell it from chance at level ``alpha`` (reduced precision moves a few
      borderline images either way, and which way differs between CPUs: int8 kernels with and without
      VNNI, AMX). On a few hundred images one image is half a point; the test sizes the tolerance to
      the number of images, so a real loss is still refused and a handful of flips is not.
    """
    accuracy: float
    agreement: float
    paired_test: bool
    alpha: float = 0.05


# fp32 must match (0.1 point, no test); fp16 and int8 1 point, or a difference consistent with chance
DEFAULT_TOLERANCE: dict[Precision, Tolerance] = {
    "fp32": Tolerance(accuracy=0.001, agreement=0.99, paired_test=False),
    "fp16": Tolerance(accuracy=0.01, agreement=0.97, paired_test=True),
    "int8": Tolerance(accuracy=0.01, agreement=0.95, paired_test=True),
}


@dataclass
class ParityConfig:
    n: int = 200
    attack: EvalConfig = field(default_factory=EvalConfig)
    tolerance: dict[Precision, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    seed: int = 0

    def with_accuracy(self, points: dict[Precision, float]) -> "ParityConfig":
        """The same rule with other accuracy tolerances, given in points (the CLI's ``--tolerance-*``)."""
        tol = {p: Tolerance(points[p] / 100, t.agreement, t.paired_test, t.alpha) if p in points else t
               for p, t in self.tolerance.items()}
        return ParityConfig(self.n, self.attack, tol, self.seed)


BenchDevice = Literal["cpu", "cuda", "desktop", "jetson-orin", "jetson-orin-nano"]
BENCH_DEVICES: tuple[str, ...] = typing.get_args(BenchDevice)


@dataclass
class BenchConfig:
    """``keyedge bench``: interleaved rounds of timed calls per model and batch size."""
    device: BenchDevice = "cpu"
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 5
    iters: int = 10
    warmup: int = 3
