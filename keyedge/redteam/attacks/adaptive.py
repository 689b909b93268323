"""Adaptive attacks on a keyed model whose weights are known but whose key is not.

The attacker has the keyed model's fine-tuned (un-fused) weights and may query the deployed model.

* EOT over random keys: the gradient averaged over K fresh uniformly random keys per step. A
  uniformly random key moves every value of a block anywhere in the block, so the expected
  gradient is the block mean: EOT effectively searches only block-constant perturbations (the
  key-invariant subspace of :func:`keyedge.redteam.attacks.transfer.block_invariant`). Its result is
  reported with that bound.
* Key search scored by *functional agreement*: random keys, then greedy pair swaps, keeping the
  key under which the leaked weights agree most with the deployed model's answers (queries) on a
  batch; reported as that agreement on held-out images, which is what decides whether gradients
  through the found key transfer. Exact entries are reported too, but they are not the goal.

(The probe attack of :mod:`keyedge.redteam.attacks.keyrecovery` recovers the key exactly from the same
access; it is the strongest attacker of this kind.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...core.keys import Key
from ...core.models import KeyedClassifier
from .pgd import LossFn


def eot_loss(keyed: KeyedClassifier, samples: int, *, seed: int = 0) -> LossFn:
    """Per-example cross entropy averaged over ``samples`` fresh random keys at every call."""
    n = keyed.key.size
    gen = torch.Generator().manual_seed(seed)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(x), device=x.device)
        for _ in range(samples):
            perm = torch.randperm(n, generator=gen).to(x.device)
            total = total + F.cross_entropy(keyed.forward_with_perm(x, perm), y, reduction="none")
        return total / samples

    return loss


@dataclass
class KeySearchResult:
    key: Key
    agreement: float        # top-1 agreement with the deployed model on the search batch
    queries: int            # deployed-model answers used
    trials: int             # candidate keys scored (locally, on the leaked weights)


@torch.no_grad()
def _agreement(keyed: KeyedClassifier, perm: np.ndarray, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(agreement, -cross entropy against the device's labels): higher is better; the second breaks ties."""
    logits = keyed.forward_with_perm(x, torch.as_tensor(perm, device=x.device))
    return float((logits.argmax(1) == labels).float().mean()), -float(F.cross_entropy(logits, labels))


def key_search(keyed: KeyedClassifier, x: torch.Tensor, device: Callable[[torch.Tensor], torch.Tensor], *,
               random_trials: int = 200, swap_trials: int = 500, seed: int = 0) -> KeySearchResult:
    """Search the key under which the leaked weights behave like the deployed model.

    ``device(x)`` returns the deployed model's logits (``len(x)`` queries, made once).
    """
    block, channels, n = keyed.key.block_size, keyed.key.channels, keyed.key.size
    labels = device(x).argmax(1)
    rng = np.random.default_rng(seed)
    best = np.arange(n)
    best_score = _agreement(keyed, best, x, labels)
    for _ in range(random_trials):
        cand = rng.permutation(n)
        score = _agreement(keyed, cand, x, labels)
        if score > best_score:
            best, best_score = cand, score
    for _ in range(swap_trials):
        i, j = rng.choice(n, size=2, replace=False)
        cand = best.copy()
        cand[[i, j]] = cand[[j, i]]
        score = _agreement(keyed, cand, x, labels)
        if score > best_score:
            best, best_score = cand, score
    return KeySearchResult(Key(best, block, channels, insecure=True), best_score[0], len(x),
                           1 + random_trials + swap_trials)
