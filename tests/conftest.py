import numpy as np
import pytest
import torch

from keyedge import Key, create_vit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def tiny_vit(**overrides):
    """A small random-init ViT (no network): 32x32 input, patch 8, depth 2."""
    kwargs = dict(num_classes=10, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    kwargs.update(overrides)
    return create_vit("vit_tiny_patch16_224", **kwargs).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def key4():
    return Key.generate(4, seed=1)
