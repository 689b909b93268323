import json

import pytest

from keyedge import Key
from keyedge.core.errors import KeyedgeError
from keyedge.core.runs import load_run
from keyedge.training.train import train

from ..helpers import tiny_train_config


def test_training_lowers_loss_and_learns(trained_plain):
    _, manifest, _ = trained_plain
    history = manifest.history
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3
    assert manifest.metrics["test_acc"] > 0.5  # 10 classes: chance is 0.1


def test_resume_continues_and_refuses_another_key(tmp_path):
    key, other = Key.generate(4, seed=0), Key.generate(4, seed=1)
    key.save(tmp_path / "k.bin")
    other.save(tmp_path / "other.bin")
    run = tmp_path / "run"
    first = train(tiny_train_config(run, key=str(tmp_path / "k.bin"), epochs=3, max_steps=None), console=None)
    # pretend training stopped after epoch 2 of 3: resume must redo only epoch 3
    state_epoch2 = train(tiny_train_config(tmp_path / "run2", key=str(tmp_path / "k.bin"), epochs=2))
    steps_per_epoch = state_epoch2.history[0]["step"]
    resumed = train(tiny_train_config(tmp_path / "run2", key=str(tmp_path / "k.bin"), epochs=3,
                                      resume=True, force=False))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["step"] == 3 * steps_per_epoch == first.history[-1]["step"]
    before = (run / "manifest.json").read_bytes()
    with pytest.raises(KeyedgeError, match="does not match"):
        train(tiny_train_config(run, key=str(tmp_path / "other.bin"), epochs=4, resume=True, force=False))
    assert (run / "manifest.json").read_bytes() == before
    manifest = json.loads(before)
    assert manifest["key_fingerprint"] == key.fingerprint
    assert key.fingerprint in before.decode()
    assert str(key.perm.tolist()) not in (run / "manifest.json").read_text()
    # the run loads back as a keyed model, and only with its key
    assert load_run(run, key).key == key
    with pytest.raises(KeyedgeError):
        load_run(run, other)


def test_lora_run_reports_per_key_storage(tmp_path, trained_plain):
    base_dir, _, _ = trained_plain
    key = Key.generate(4, seed=0)
    key.save(tmp_path / "k.bin")
    m = train(tiny_train_config(tmp_path / "lora", key=str(tmp_path / "k.bin"), mode="lora", epochs=1,
                                checkpoint=str(base_dir / "model.safetensors")))
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    assert 0 < m.trainable_params < m.total_params
    assert m.per_key_bytes < m.full_model_bytes / 2
    assert m.base_checkpoint.sha256


def test_existing_run_dir_needs_resume_or_force(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    with pytest.raises(KeyedgeError, match="--resume"):
        train(tiny_train_config(tmp_path / "run", force=False))
    assert (tmp_path / "run" / "x").read_text() == "keep me"


@pytest.mark.slow
def test_torchrun_ddp_two_processes(tmp_path):
    """The same command under torchrun: 2 CPU processes (gloo), each on half the data."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "keyedge.cli", "train",
           "-o", str(out), "--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4",
           "--depth", "1", "--embed-dim", "24", "--heads", "2", "--num-classes", "10", "--epochs", "1",
           "--batch-size", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["history"][0]["step"] == 1437 // 2 // 32  # each rank saw half the training set
    assert r.stdout.count("wrote ") == 1  # only rank 0 reports
