"""Block-wise pixel shuffling: the reference semantics of a keyedge key.

An image (N, C, H, W) is cut into M x M blocks. Each block is flattened in
(C, M, M) order -- the order of timm's ``patch_embed.proj.weight`` -- and the
flattened vector ``v`` becomes ``v[perm]``. The same permutation is used for every
block. Everything is reshape/permute/index: no Python loop over blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import KeyedgeError
from .keys import Key


def _check(x: torch.Tensor, block_size: int, channels: int) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise KeyedgeError(f"expected images shaped (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c != channels:
        raise KeyedgeError(f"images have {c} channels but the key has {channels}")
    if h % block_size or w % block_size:
        raise KeyedgeError(f"image size {h}x{w} is not divisible by the key's block size {block_size}")
    return n, c, h, w


def permute_blocks(x: torch.Tensor, perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """Apply ``perm`` (a 1-D int64 tensor of length M*M*C) to every block of ``x``.

    This is the traceable core: ``perm`` may be a graph input (ONNX gather mode).
    """
    n, c, h, w = x.shape
    m = block_size
    hb, wb = h // m, w // m
    blocks = x.reshape(n, c, hb, m, wb, m).permute(0, 2, 4, 1, 3, 5).reshape(n, hb, wb, c * m * m)
    blocks = blocks.index_select(3, perm)
    return blocks.reshape(n, hb, wb, c, m, m).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _perm_tensor(perm: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.tensor(perm, dtype=torch.long, device=device)


def block_shuffle(x: torch.Tensor, key: Key) -> torch.Tensor:
    """Shuffle every M x M block of ``x`` (float or uint8, (N, C, H, W)) with ``key``."""
    _check(x, key.block_size, key.channels)
    return permute_blocks(x, _perm_tensor(key.perm, x.device), key.block_size)


def block_unshuffle(x: torch.Tensor, key: Key) -> torch.Tensor:
    """Invert :func:`block_shuffle`: ``block_unshuffle(block_shuffle(x, k), k) == x`` exactly."""
    _check(x, key.block_size, key.channels)
    return permute_blocks(x, _perm_tensor(key.inverse, x.device), key.block_size)


def patch_permutation(key: Key, patch_size: int) -> np.ndarray:
    """The permutation that ``key`` induces on one (C, P, P) patch, flattened.

    ``out_patch = in_patch[Q]``. Needs M to divide P; then each M x M sub-block of a
    patch is shuffled with ``key`` and never leaves the patch.
    """
    if patch_size % key.block_size:
        raise KeyedgeError(
            f"block size {key.block_size} does not divide patch size {patch_size}")
    idx = torch.arange(key.channels * patch_size * patch_size).reshape(
        1, key.channels, patch_size, patch_size)
    return block_shuffle(idx, key).reshape(-1).numpy()
