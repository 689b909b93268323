"""What the checks hold artifacts to, and how long they measure -- the one source of their defaults (the
CLI reads them). No torch here."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from ..core.manifests import Backend, ExecPrecision, InferencePrecision
from ..redteam.config import EvalConfig


@dataclass(frozen=True)
class Tolerance:
    """What an artifact of one precision may change against its PyTorch reference, on the same images.

    On every image set:

    * the top-1 agreement with the reference is at least ``agreement``;
    * the accuracy differs by at most ``accuracy`` (a fraction) -- or, with ``paired_test``, by at most
      twice that, or two images where two images weigh more (:meth:`excusable`), when McNemar's exact
      test on the images only one of the two gets right cannot tell the difference from chance at level
      ``alpha``. Reduced precision moves a few borderline images either way, and which way differs
      between CPUs (int8 kernels with and without VNNI, AMX); on a few hundred images one image is half
      a point, on 32 images three. A larger difference, or one the test finds significant, fails. On
      few images a real loss of a point or two cannot be told from chance: check on as many images as
      the deployment allows.
    """
    accuracy: float
    agreement: float
    paired_test: bool
    alpha: float = 0.05

    def excusable(self, n: int) -> float:
        """The largest difference the paired test may excuse on ``n`` images: twice the tolerance, or two
        images' worth where that is more (the agreement floor still bounds how many images may differ)."""
        return max(2 * self.accuracy, 2 / n) if self.paired_test else self.accuracy

    def describe(self, n: int | None = None) -> str:
        """The rule in words; with ``n``, the difference the paired test may excuse on ``n`` images."""
        excused = f"{100 * self.excusable(n):.1f}" if n else f"{200 * self.accuracy:.1f}, or two images,"
        return (f"{100 * self.accuracy:.1f} point"
                + (f" (up to {excused} with McNemar p >= {self.alpha})" if self.paired_test else "")
                + f", agreement >= {100 * self.agreement:.0f}%")


# after every export: the relative logit error allowed, and the least top-1 agreement on real images. bf16
# keeps 8 bits of mantissa to fp16's 11: 8x fp16's error (a random-init ViT-B/16 in bf16 measures 3.8e-2)
VERIFY_TOLERANCE: dict[ExecPrecision, tuple[float, float]] = {"fp32": (1e-4, 1.0), "fp16": (1e-2, 0.97),
                                                              "bf16": (8e-2, 0.97), "int8": (0.1, 0.9)}
VERIFY_IMAGES = 16  # random and real images checked after every export (at least)

# parity: fp32 must match (0.1 point, no test); fp16 and int8 1 point, or up to 2 points consistent with chance
DEFAULT_TOLERANCE: dict[ExecPrecision, Tolerance] = {
    "fp32": Tolerance(accuracy=0.001, agreement=0.99, paired_test=False),
    "fp16": Tolerance(accuracy=0.01, agreement=0.97, paired_test=True),
    "int8": Tolerance(accuracy=0.01, agreement=0.95, paired_test=True),
    "bf16": Tolerance(accuracy=0.01, agreement=0.97, paired_test=True),  # an 8-bit mantissa: fp16's rule
}


@dataclass
class ParityConfig:
    n: int = 200
    attack: EvalConfig = field(default_factory=EvalConfig)
    tolerance: dict[ExecPrecision, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    seed: int = 0

    def with_accuracy(self, points: dict[ExecPrecision, float]) -> "ParityConfig":
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
    backend: Backend = "onnxruntime"   # what runs the ONNX artifacts on the CPU
    inference_precision: InferencePrecision = "fp32"  # OpenVINO's precision hint (bf16: AMX / AVX512-BF16)
    ensemble_draw: int | None = None   # a random ensemble: members drawn per query (default 1)
    query_noise: float | None = None   # RND: Gaussian noise of this standard deviation added to every query
