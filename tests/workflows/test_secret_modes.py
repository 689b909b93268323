"""Every file that holds a key or a model's weights is 0600 wherever it lands, ``--force`` into an
existing 0755 directory included; output directories keyedge creates are 0700."""

import os
import stat

from ..helpers import keyedge, tiny_train_config


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_exports_and_build_plans_are_0600_even_in_an_open_directory(tmp_path, trained_keyed):
    run, key_path, _, _ = trained_keyed
    assert keyedge("export", run, "--key", key_path, "-o", tmp_path / "new").returncode == 0
    assert _mode(tmp_path / "new") == 0o700 and _mode(tmp_path / "new" / "model.onnx") == 0o600
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "README").write_text("team notes")
    os.chmod(shared, 0o755)
    r = keyedge("export", run, "--key", key_path, "-o", shared, "--force")  # a fused model: the key itself
    assert r.returncode == 0, r.stderr
    assert _mode(shared / "model.onnx") == 0o600 and _mode(shared) == 0o755  # the user's directory kept as it was
    r = keyedge("build", tmp_path / "new", "--target", "jetson-orin", "-o", shared / "plan", "--plan-only")
    assert r.returncode == 0, r.stderr
    assert _mode(shared / "plan") == 0o700 and _mode(shared / "plan" / "model.onnx") == 0o600


def test_runs_keep_their_weights_and_checkpoint_0600(tmp_path, key4, trained_plain):
    from keyedge.training.train import train

    base = trained_plain[0] / "model.safetensors"
    key4.save(tmp_path / "key.bin")
    for mode in ("full", "lora"):
        out = tmp_path / mode
        train(tiny_train_config(out, key=str(tmp_path / "key.bin"), mode=mode, epochs=1, max_steps=1,
                                **({"checkpoint": str(base)} if mode == "lora" else {})))
        assert _mode(out) == 0o700
        weights = [out / "model.safetensors"] if mode == "full" else list((out / "adapter").iterdir())
        for path in [out / "checkpoint.pt", *weights]:
            assert _mode(path) == 0o600, path
