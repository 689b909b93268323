import numpy as np
import pytest
import torch

from keyedge import Key, block_shuffle, block_unshuffle
from keyedge.core.errors import KeyedgeError


def loop_reference(x: np.ndarray, key: Key) -> np.ndarray:
    """Independent per-block loop: flatten (C, M, M), take v[perm], put back."""
    n, c, h, w = x.shape
    m = key.block_size
    out = np.empty_like(x)
    for b in range(n):
        for i in range(0, h, m):
            for j in range(0, w, m):
                v = x[b, :, i:i + m, j:j + m].reshape(-1)
                out[b, :, i:i + m, j:j + m] = v[key.perm].reshape(c, m, m)
    return out


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_shuffle_matches_loop_and_round_trips(m, dtype):
    for seed in range(2):
        key = Key.generate(m, seed=seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (2, 3, 64, 32), generator=g).to(dtype)
        if dtype.is_floating_point:
            x = x / 255
        y = block_shuffle(x, key)
        assert y.dtype == dtype
        assert np.array_equal(y.numpy(), loop_reference(x.numpy(), key))
        assert torch.equal(block_unshuffle(y, key), x)
        if m > 1:
            assert not torch.equal(y, x)


def test_perm_direction():
    # v[perm]: output value i comes from input value perm[i]
    key = Key(np.array([1, 2, 3, 0]), block_size=2, channels=1)
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert block_shuffle(x, key).flatten().tolist() == [1.0, 2.0, 3.0, 0.0]


def test_bad_shapes():
    key = Key.generate(4, seed=0)
    with pytest.raises(KeyedgeError, match="divisible"):
        block_shuffle(torch.zeros(1, 3, 30, 32), key)
    with pytest.raises(KeyedgeError, match="channels"):
        block_shuffle(torch.zeros(1, 1, 32, 32), key)
    with pytest.raises(KeyedgeError, match="N, C, H, W"):
        block_shuffle(torch.zeros(3, 32, 32), key)
