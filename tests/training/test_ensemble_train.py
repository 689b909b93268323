import json
import os
import stat

import pytest
import torch

from keyedge.core.ensemble import EnsembleClassifier, draw_members, load_members, read_ensemble
from keyedge.core.errors import KeyedgeError
from keyedge.core.keyset import KeySet
from keyedge.core.manifests import read_run
from keyedge.training.ensemble import train_ensemble

from ..helpers import keyedge, tiny_train_config


def test_each_member_is_a_run_of_its_own_key_from_the_one_base(lora_ensemble):
    ens, _, keys, base = lora_ensemble
    manifest = read_ensemble(ens)
    assert manifest.key_set_fingerprint == keys.fingerprint and manifest.mode == "lora"
    assert [m.key_fingerprint for m in manifest.members] == keys.fingerprints
    runs = [read_run(ens / m.run) for m in manifest.members]
    assert [r.key_fingerprint for r in runs] == keys.fingerprints
    assert {r.base_checkpoint.path for r in runs} == {str(base)} and {r.mode for r in runs} == {"lora"}
    assert all(r.metrics["test_acc"] > 0.3 for r in runs), [r.metrics["test_acc"] for r in runs]
    assert len({r.train["seed"] for r in runs}) == 3  # each member its own data order and initialisation
    text = "".join((ens / m.run / "manifest.json").read_text() for m in manifest.members)
    assert not any(str(k.perm.tolist()) in text for k in keys)


def test_the_reference_runs_each_image_through_its_own_member(lora_ensemble):
    ens, _, keys, _ = lora_ensemble
    members = load_members(ens, keys)
    model = EnsembleClassifier(members).eval()
    x = torch.rand(6, 3, 16, 16)
    index = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        got = model.member_logits(x, index)
        for j, m in enumerate(index.tolist()):
            assert torch.allclose(got[j], members[m](x[j:j + 1])[0], atol=1e-5)
        probs = model(x, [2, 0])
        want = (members[2](x).softmax(1) + members[0](x).softmax(1)) / 2
    assert torch.allclose(probs, want, atol=1e-6) and torch.allclose(probs.sum(1), torch.ones(6))
    with torch.no_grad():  # the members are different models
        assert not torch.allclose(members[0](x), members[1](x), atol=1e-3)


def test_the_members_need_their_keys_in_order(lora_ensemble):
    ens, _, keys, _ = lora_ensemble
    with pytest.raises(KeyedgeError, match="another order"):
        load_members(ens, KeySet((keys[1], keys[0], keys[2])))
    with pytest.raises(KeyedgeError, match="is not ensemble"):
        load_members(ens, KeySet.generate(3, 4))


def test_draws_are_distinct_members_and_differ_across_queries():
    draws = [tuple(draw_members(8, 2)) for _ in range(200)]
    assert all(len(set(d)) == 2 and all(0 <= m < 8 for m in d) for d in draws)
    assert len(set(draws)) > 30  # 56 ordered pairs: a fixed or seeded draw would repeat one
    with pytest.raises(KeyedgeError, match="1 to 8"):
        draw_members(8, 9)


def test_resume_trains_only_the_members_that_did_not_finish(tmp_path):
    keys = KeySet.generate(2, 4, seed=3)
    cfg = tiny_train_config(tmp_path / "ens", epochs=1, max_steps=2)
    train_ensemble(cfg, keys)
    first = (tmp_path / "ens" / "member-0" / "manifest.json").read_bytes()
    for name in os.listdir(tmp_path / "ens" / "member-1"):  # member 1 never ran
        os.unlink(tmp_path / "ens" / "member-1" / name)
    _, runs = train_ensemble(tiny_train_config(tmp_path / "ens", epochs=1, max_steps=2, resume=True, force=False),
                             keys)
    assert (tmp_path / "ens" / "member-0" / "manifest.json").read_bytes() == first
    assert [r.key_fingerprint for r in runs] == keys.fingerprints
    with pytest.raises(KeyedgeError, match="is not ensemble"):
        train_ensemble(tiny_train_config(tmp_path / "ens", epochs=1, resume=True, force=False), KeySet.generate(2, 4))


def test_cli_keygen_and_train_an_ensemble(tmp_path):
    r = keyedge("keygen", "--ensemble", "2", "-m", "4", "-o", tmp_path / "keys.bin")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "keys.bin").st_mode) == 0o600
    keys = KeySet.load(tmp_path / "keys.bin")
    assert all(f in r.stdout for f in keys.fingerprints) and keys.fingerprint in r.stdout
    args = ["train", "--key", tmp_path / "keys.bin", "--ensemble", "2", "--model", "vit_tiny_patch16_224",
            "--img-size", "16", "--patch-size", "4", "--num-classes", "10", "--depth", "1", "--embed-dim", "24",
            "--heads", "2", "--epochs", "1", "--batch-size", "256"]
    r = keyedge(*args, "-o", tmp_path / "ens")
    assert r.returncode == 0, r.stderr
    assert "2 members" in r.stdout and keys.fingerprint in r.stdout
    assert json.loads((tmp_path / "ens" / "ensemble.json").read_text())["members"][1]["key_fingerprint"] == \
        keys.fingerprints[1]


@pytest.mark.parametrize("case", ["count", "one_key", "no_key", "model"])
def test_cli_bad_ensemble_input_is_one_line_and_writes_nothing(tmp_path, case):
    KeySet.generate(3, 4).save(tmp_path / "keys.bin")
    from keyedge import Key

    Key.generate(4).save(tmp_path / "key.bin")
    args = {"count": ["--key", tmp_path / "keys.bin", "--ensemble", "2"],
            "one_key": ["--key", tmp_path / "key.bin", "--ensemble", "2"],
            "no_key": ["--ensemble", "2"],
            "model": ["--key", tmp_path / "keys.bin", "--ensemble", "3", "--img-size", "18"]}[case]
    r = keyedge("train", "--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4",
                "--num-classes", "10", "--depth", "1", "--embed-dim", "24", "--heads", "2", "--epochs", "1",
                "-o", tmp_path / "ens", *args)  # the last --img-size counts
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "ens").exists()
