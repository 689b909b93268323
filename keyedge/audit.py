"""Key-recovery audit: how much of the key leaks with the un-fused patch embedding?

A keyed model fine-tuned from a public base tends to keep its patch-embedding
columns close to the base's, permuted by the key: ``W_keyed[:, i] ~ W_base[:, Q[i]]``
for the permutation ``Q`` the key induces on a patch. Matching columns by cosine
similarity, summed over the (P/M)^2 sub-blocks of a patch, and solving the linear
assignment (``scipy.optimize.linear_sum_assignment``) gives an estimate of the
block key. The fraction of key entries recovered tells a user what a leak of the
keyed model's weights (without the key file) would cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import KeyedgeError
from .keys import Key


@dataclass
class RecoveryResult:
    estimate: np.ndarray
    fraction: float
    chance: float

    def as_dict(self) -> dict:
        return {"fraction_recovered": self.fraction, "chance_level": self.chance}


def _block_positions(channels: int, patch: int, block: int) -> np.ndarray:
    """pos[b, a]: flat (C, P, P) index of value ``a`` of sub-block ``b`` of a patch."""
    idx = np.arange(channels * patch * patch).reshape(channels, patch // block, block, patch // block, block)
    return idx.transpose(1, 3, 0, 2, 4).reshape((patch // block) ** 2, channels * block * block)


def recover_key(keyed_weight: torch.Tensor, base_weight: torch.Tensor, block_size: int) -> np.ndarray:
    """Estimate the block permutation from two patch-embedding weights (D, C, P, P)."""
    from scipy.optimize import linear_sum_assignment

    if keyed_weight.shape != base_weight.shape or keyed_weight.dim() != 4:
        raise KeyedgeError("keyed and base patch embeddings differ in shape; they must share an architecture")
    d, c, p, _ = keyed_weight.shape
    if p % block_size:
        raise KeyedgeError(f"block size {block_size} does not divide patch size {p}: no per-patch audit")
    pos = _block_positions(c, p, block_size)

    def unit_columns(w: torch.Tensor) -> np.ndarray:
        cols = w.detach().double().cpu().reshape(d, -1).numpy()[:, pos]  # (D, blocks, CMM)
        cols = cols - cols.mean(axis=0, keepdims=True)
        return cols / np.maximum(np.linalg.norm(cols, axis=0, keepdims=True), 1e-12)

    sim = np.einsum("dba,dbc->ac", unit_columns(keyed_weight), unit_columns(base_weight))
    rows, cols = linear_sum_assignment(-sim)
    estimate = np.empty(len(rows), dtype=np.int64)
    estimate[rows] = cols
    return estimate


def audit_key(keyed_weight: torch.Tensor, base_weight: torch.Tensor, key: Key) -> RecoveryResult:
    estimate = recover_key(keyed_weight, base_weight, key.block_size)
    return RecoveryResult(estimate, float(np.mean(estimate == key.perm)), 1.0 / key.size)
