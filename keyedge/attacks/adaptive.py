"""Adaptive attacks on a keyed model whose weights are known but whose key is not.

The attacker of the gray-box threat model with the strongest access short of the
key: the keyed model's fine-tuned weights (a leak of the un-fused checkpoint) plus
query access to the deployed model.

* EOT: the gradient averaged over K fresh random keys per step.
* BPDA through a guessed key: forward through the deployed model (the true
  transform), backward as if the transform were a guessed key.
* Key search: random search over keys, keeping the one with the lowest loss on a
  labelled batch, then greedy pairwise swaps; then PGD through the estimated key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..keys import Key
from ..models import KeyedClassifier
from ..shuffle import permute_blocks
from .pgd import LossFn


def _random_perm(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator).to(device)


def eot_loss(keyed: KeyedClassifier, samples: int, *, seed: int = 0) -> LossFn:
    """Cross entropy averaged over ``samples`` fresh random keys at every call."""
    n = keyed.key.size
    gen = torch.Generator().manual_seed(seed)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for _ in range(samples):
            logits = keyed.forward_with_perm(x, _random_perm(n, gen, x.device))
            total = total + F.cross_entropy(logits, y, reduction="sum")
        return total / samples

    return loss


def bpda_loss(keyed: KeyedClassifier, guess: Key) -> LossFn:
    """Forward through the deployed model (true key), backward through ``guess``."""
    m = keyed.key.block_size
    true_perm = keyed.perm
    guess_perm = torch.tensor(guess.perm, device=keyed.perm.device)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z_guess = permute_blocks(x, guess_perm.to(x.device), m)
        with torch.no_grad():
            z_true = permute_blocks(x, true_perm.to(x.device), m)
        z = z_guess + (z_true - z_guess).detach()  # value of the truth, gradient of the guess
        return F.cross_entropy(keyed.classify_shuffled(z), y, reduction="sum")

    return loss


@dataclass
class KeySearchResult:
    key: Key
    loss: float
    accuracy: float
    trials: int


@torch.no_grad()
def _batch_loss(keyed: KeyedClassifier, perm: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = keyed.forward_with_perm(x, torch.as_tensor(perm, device=x.device))
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def key_search(keyed: KeyedClassifier, x: torch.Tensor, y: torch.Tensor, *, random_trials: int = 200,
               swap_trials: int = 500, seed: int = 0) -> KeySearchResult:
    """Estimate the key from the keyed weights and a labelled batch (x, y).

    Random search over ``random_trials`` keys keeps the best (lowest cross entropy,
    a finer signal than accuracy); then ``swap_trials`` greedy pair swaps keep every
    swap that lowers the loss.
    """
    block, channels, n = keyed.key.block_size, keyed.key.channels, keyed.key.size
    rng = np.random.default_rng(seed)
    best = np.arange(n)
    best_loss, best_acc = _batch_loss(keyed, best, x, y)
    for _ in range(random_trials):
        cand = rng.permutation(n)
        loss, acc = _batch_loss(keyed, cand, x, y)
        if loss < best_loss:
            best, best_loss, best_acc = cand, loss, acc
    for _ in range(swap_trials):
        i, j = rng.choice(n, size=2, replace=False)
        cand = best.copy()
        cand[[i, j]] = cand[[j, i]]
        loss, acc = _batch_loss(keyed, cand, x, y)
        if loss < best_loss:
            best, best_loss, best_acc = cand, loss, acc
    return KeySearchResult(Key(best, block, channels, insecure=True), best_loss, best_acc,
                           1 + random_trials + swap_trials)
