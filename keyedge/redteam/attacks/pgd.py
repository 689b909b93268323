"""Projected gradient descent, l_inf and l_2, with random restarts, images kept in [0, 1].

``pgd`` maximises any per-example loss ``loss_fn(x_adv, y) -> (N,)`` -- the cross entropy of one
model for white-box and transfer attacks, of an ensemble, or an expectation over random keys
(EOT) for adaptive ones -- and returns, per example, the *best iterate* (highest loss) over all
steps and restarts, not the last one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .budget import AttackBudget

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_loss(model: Callable[[torch.Tensor], torch.Tensor]) -> LossFn:
    """Per-example cross entropy of one model."""
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


def ensemble_loss(models: list[Callable[[torch.Tensor], torch.Tensor]]) -> LossFn:
    """Per-example cross entropy averaged over several surrogates (an ensemble transfer attack)."""
    return lambda x, y: sum(F.cross_entropy(m(x), y, reduction="none") for m in models) / len(models)


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


def _random_start(x: torch.Tensor, budget: AttackBudget) -> torch.Tensor:
    if budget.norm == "linf":
        noise = torch.empty_like(x).uniform_(-budget.eps, budget.eps)
    else:
        noise = torch.randn_like(x)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device)
        noise = noise / _l2(noise) * budget.eps * radius
    return project(x, x + noise, budget)


def _pgd_batch(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget,
               direction: Callable[[torch.Tensor], torch.Tensor] | None = None,
               checkpoints: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    x = x.detach()
    best, best_loss = x.clone(), torch.full((len(x),), -float("inf"), device=x.device)
    snapshots: dict[int, torch.Tensor] = {}
    for restart in range(max(1, budget.restarts)):
        x_adv = _random_start(x, budget) if budget.random_start or restart else x.clone()
        for step in range(budget.steps + 1):
            x_adv.requires_grad_(True)
            losses = loss_fn(x_adv, y)
            with torch.no_grad():  # keep each example's best iterate
                better = losses.detach() > best_loss
                best[better], best_loss[better] = x_adv.detach()[better], losses.detach()[better]
            if restart == 0 and step in checkpoints:
                snapshots[step] = best.clone()  # the best iterate of the first run's first ``step`` steps
            if step == budget.steps:
                break
            grad, = torch.autograd.grad(losses.sum(), x_adv)
            with torch.no_grad():
                if direction is not None:
                    grad = direction(grad)
                move = grad.sign() if budget.norm == "linf" else grad / _l2(grad)
                x_adv = project(x, x_adv + budget.alpha * move, budget)
    return best.detach(), snapshots


def pgd(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget,
        batch_size: int = 128, direction: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Adversarial examples for (x, y) maximising ``loss_fn`` within ``budget``.

    ``direction`` (optional) maps each gradient before the step, e.g. onto a subspace.
    """
    return torch.cat([_pgd_batch(loss_fn, x[i:i + batch_size], y[i:i + batch_size], budget, direction)[0]
                      for i in range(0, len(x), batch_size)])


def pgd_with_checkpoints(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget,
                         checkpoints: tuple[int, ...], batch_size: int = 128
                         ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """As :func:`pgd`, and the best iterates after each of ``checkpoints`` steps of the first run
    (a convergence check from one attack: 10 / 50 / 100 steps cost 100)."""
    parts = [_pgd_batch(loss_fn, x[i:i + batch_size], y[i:i + batch_size], budget, None, checkpoints)
             for i in range(0, len(x), batch_size)]
    return (torch.cat([p[0] for p in parts]),
            {c: torch.cat([p[1][c] for p in parts]) for c in checkpoints if c <= budget.steps})
