"""Projected gradient descent, l_inf and l_2, with random start, images kept in [0, 1].

``pgd`` maximises any loss ``loss_fn(x_adv, y) -> scalar`` -- the plain cross
entropy of one model for white-box and transfer attacks, or an expectation over
random keys (EOT) for adaptive ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Norm = Literal["linf", "l2"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackBudget:
    norm: Norm = "linf"
    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None  # default: 2.5 * eps / steps
    random_start: bool = True

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / max(1, self.steps)

    def describe(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "steps": self.steps, "step_size": self.alpha,
                "random_start": self.random_start}


def ce_loss(model: Callable[[torch.Tensor], torch.Tensor]) -> LossFn:
    return lambda x, y: F.cross_entropy(model(x), y, reduction="sum")


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x: torch.Tensor, x_adv: torch.Tensor, budget: AttackBudget) -> torch.Tensor:
    """Project onto the eps-ball around x, then into [0, 1] (which only shrinks the step)."""
    delta = x_adv - x
    if budget.norm == "linf":
        delta = delta.clamp(-budget.eps, budget.eps)
    else:
        delta = delta * (budget.eps / _l2(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _pgd_batch(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget) -> torch.Tensor:
    x = x.detach()
    x_adv = x.clone()
    if budget.random_start:
        if budget.norm == "linf":
            noise = torch.empty_like(x).uniform_(-budget.eps, budget.eps)
        else:
            noise = torch.randn_like(x)
            radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device)
            noise = noise / _l2(noise) * budget.eps * radius
        x_adv = project(x, x + noise, budget)
    for _ in range(budget.steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x_adv, y), x_adv)
        with torch.no_grad():
            step = grad.sign() if budget.norm == "linf" else grad / _l2(grad)
            x_adv = project(x, x_adv + budget.alpha * step, budget)
    return x_adv.detach()


def pgd(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget,
        batch_size: int = 128) -> torch.Tensor:
    """Adversarial examples for (x, y) maximising ``loss_fn`` within ``budget``."""
    return torch.cat([_pgd_batch(loss_fn, x[i:i + batch_size], y[i:i + batch_size], budget)
                      for i in range(0, len(x), batch_size)])
