"""Stronger transfer attacks for an attacker who knows the method but not the key.

* :func:`mi_di` -- momentum iterative FGSM (Dong et al., 2018) with input diversity (Xie et al.,
  2019) over an ensemble: the public base plus keyed fine-tunes of it with the attacker's own
  keys (the method is public, so anyone can make such surrogates).
* :func:`block_invariant` -- PGD restricted to perturbations constant within each M x M block:
  every key permutes the values of a block among themselves, so such a perturbation reaches the
  keyed model unchanged, whatever its key (up to clipping at 0 and 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from .budget import AttackBudget
from .pgd import LossFn, pgd, project


def _diverse(x: torch.Tensor, prob: float, low: float = 0.85) -> torch.Tensor:
    """Input diversity: with probability ``prob``, shrink by a random factor and pad back at random."""
    if torch.rand(()) >= prob:
        return x
    h, w = x.shape[-2:]
    size = int(torch.randint(int(low * h), h + 1, ()))
    small = F.interpolate(x, size=(size, size), mode="nearest")
    top, left = int(torch.randint(0, h - size + 1, ())), int(torch.randint(0, w - size + 1, ()))
    return F.pad(small, (left, w - size - left, top, h - size - top))


def mi_di(models: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, y: torch.Tensor,
          budget: AttackBudget, *, momentum: float = 1.0, diversity: float = 0.5,
          batch_size: int = 128) -> torch.Tensor:
    """MI-DI-FGSM (l_inf) on the ensemble's averaged cross entropy."""
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].detach(), y[i:i + batch_size]
        x_adv, g = xb.clone(), torch.zeros_like(xb)
        for _ in range(budget.steps):
            x_adv.requires_grad_(True)
            loss = sum(F.cross_entropy(m(_diverse(x_adv, diversity)), yb) for m in models) / len(models)
            grad, = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                g = momentum * g + grad / grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
                x_adv = project(xb, x_adv + budget.alpha * g.sign(), budget)
        out.append(x_adv.detach())
    return torch.cat(out)


def block_constant(grad: torch.Tensor, block: int) -> torch.Tensor:
    """The gradient projected onto perturbations constant within each M x M block (all channels)."""
    pooled = F.avg_pool2d(grad.mean(1, keepdim=True), block)
    return pooled.repeat_interleave(block, 2).repeat_interleave(block, 3).expand_as(grad)


def block_invariant(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget, block: int,
                    batch_size: int = 128) -> torch.Tensor:
    """PGD (l_inf) on a surrogate, restricted to key-invariant (block-constant) perturbations."""
    return pgd(loss_fn, x, y, replace(budget, random_start=False), batch_size,
               direction=lambda g: block_constant(g, block))
