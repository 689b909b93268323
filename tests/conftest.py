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


TINY = dict(model="vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=10,
            model_kwargs=dict(depth=2, embed_dim=48, num_heads=3), data="digits", progress=False)


def tiny_train_config(out, **overrides):
    from keyedge.train import TrainConfig

    kwargs = dict(TINY, out=str(out), epochs=2, lr=3e-3, batch_size=64, force=True)
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


@pytest.fixture(scope="session")
def trained_plain(tmp_path_factory):
    """A tiny plain ViT trained on digits (16x16): the undefended model attacks must break."""
    from keyedge.runs import load_run
    from keyedge.train import train

    out = tmp_path_factory.mktemp("plain_run")
    manifest = train(tiny_train_config(out, epochs=8, lr=2e-3, batch_size=32, max_shift=0, warmup_epochs=0.5))
    return out, manifest, load_run(out, None)


def _train_keyed(tmp_path_factory, name, seed, block=4, **overrides):
    from keyedge.runs import load_run
    from keyedge.train import train

    out = tmp_path_factory.mktemp(name)
    key = Key.generate(block, seed=seed)
    key.save(out / "key.bin")
    kwargs = dict(epochs=8, lr=2e-3, batch_size=32, max_shift=0, warmup_epochs=0.5, key=str(out / "key.bin"))
    kwargs.update(overrides)
    train(tiny_train_config(out / "run", **kwargs))
    return out / "run", out / "key.bin", key, load_run(out / "run", key)


@pytest.fixture(scope="session")
def trained_keyed(tmp_path_factory):
    """A tiny keyed ViT (block 4 = patch 4) trained on digits: (run_dir, key_path, key, model)."""
    return _train_keyed(tmp_path_factory, "keyed_run", seed=11)


@pytest.fixture(scope="session")
def trained_keyed_other(tmp_path_factory):
    """The same recipe with another key."""
    return _train_keyed(tmp_path_factory, "keyed_other", seed=12)
