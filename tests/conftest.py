import numpy as np
import pytest
import torch

from keyedge import Key

from .helpers import tiny_train_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def key4():
    return Key.generate(4, seed=1)


@pytest.fixture(scope="session")
def trained_plain(tmp_path_factory):
    """A tiny plain ViT trained on digits (16x16): the undefended model attacks must break."""
    from keyedge.core.runs import load_run
    from keyedge.training.train import train

    out = tmp_path_factory.mktemp("plain_run")
    manifest = train(tiny_train_config(out, epochs=8, lr=2e-3, batch_size=32, max_shift=0, warmup_epochs=0.5))
    return out, manifest, load_run(out, None)


def _train_keyed(tmp_path_factory, name, seed, block=4, **overrides):
    from keyedge.core.runs import load_run
    from keyedge.training.train import train

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


@pytest.fixture(scope="session")
def finetuned_keyed(tmp_path_factory, trained_plain):
    """A keyed fine-tune of the trained plain model (its public base): (run, key_path, key, base file)."""
    base_dir, _, _ = trained_plain
    run, key_path, key, _ = _train_keyed(tmp_path_factory, "finetuned_keyed", seed=21, epochs=4,
                                         checkpoint=str(base_dir / "model.safetensors"))
    return run, key_path, key, base_dir / "model.safetensors"


@pytest.fixture(scope="session")
def lora_ensemble(tmp_path_factory, trained_plain):
    """A random ensemble of 3 LoRA members (block 4, rank 4) fine-tuned from the trained plain model:
    (ensemble dir, key set path, key set, base file)."""
    from keyedge.core.keyset import KeySet
    from keyedge.training.ensemble import train_ensemble

    base_dir, _, _ = trained_plain
    out = tmp_path_factory.mktemp("lora_ensemble")
    keys = KeySet.generate(3, 4, seed=40)
    keys.save(out / "keys.bin")
    train_ensemble(tiny_train_config(out / "ensemble", mode="lora", lora_rank=4, epochs=4, lr=3e-3, batch_size=32,
                                     max_shift=0, warmup_epochs=0.5, checkpoint=str(base_dir / "model.safetensors")),
                   keys)
    return out / "ensemble", out / "keys.bin", keys, base_dir / "model.safetensors"
