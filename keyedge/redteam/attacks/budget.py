"""An attack's budget: norm, eps, steps, step size, random start and restarts (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Norm = Literal["linf", "l2"]


@dataclass(frozen=True)
class AttackBudget:
    norm: Norm = "linf"
    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None  # default: 2.5 * eps / steps
    random_start: bool = True
    restarts: int = 1

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / max(1, self.steps)

    def describe(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "steps": self.steps, "step_size": self.alpha,
                "random_start": self.random_start, "restarts": self.restarts, "iterate": "best (highest loss)"}
