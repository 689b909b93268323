"""Honest metrics: robust accuracy never counts an image the attack 'fixed', and robust <= clean for
every attacker on a trained model."""

import pytest
import torch

from keyedge.core.manifests import read_run
from keyedge.core.data import load_data, sample
from keyedge.redteam.config import THREAT_ROWS, EvalConfig
from keyedge.redteam.evaluate import Target, blast_radius, evaluate, predict
from keyedge.core.runs import load_run


def test_an_image_the_attack_fixes_is_not_robust(trained_plain):
    _, _, model = trained_plain
    x, y = sample(load_data("digits", 16).test, 64, seed=1)
    right = predict(model, x) == y
    assert right.any() and (~right).any()
    t = Target("plain", model)
    t.correct = right
    # the 'attack' replaces every wrongly classified image by a correctly classified one of its label
    fixed = x.clone()
    for i in torch.nonzero(~right).flatten():
        same = torch.nonzero(right & (y == y[i])).flatten()
        if len(same):
            fixed[i] = x[same[0]]
    assert (predict(model, fixed) == y).float().mean() > right.float().mean()  # the old metric would rise
    t.record("fixing", fixed, y)
    assert t.result["attacks"]["fixing"] == pytest.approx(float(right.float().mean()))  # new: never above clean


def test_every_attacker_on_a_trained_keyed_model(finetuned_keyed, trained_plain):
    run, _, key, base_file = finetuned_keyed
    base = load_run(trained_plain[0], None)
    keyed = load_run(run, key)
    x, y = sample(load_data("digits", 16).test, 32, seed=2)
    cfg = EvalConfig(n=32, steps=3, whitebox_steps=(2, 5), whitebox_restarts=1, eps_sweep=(8 / 255, 128 / 255),
                     autoattack="off", eot_samples=2, key_search_random=3, key_search_swaps=3, key_search_batch=8,
                     query_n=6, query_budgets=(20, 60), wrong_keys=1, seed=3)
    res = evaluate({"plain": base, "keyed": keyed}, x, y, cfg, base=base, plain_ft=base, own_keys=[keyed],
                   base_patch_weight=base.model.patch_embed.proj.weight)
    for name, m in res["models"].items():
        for attack, robust in m["attacks"].items():
            assert robust <= m["clean"] + 1e-9 or m["n"][attack] < 32, (name, attack)
        assert set(m["threat_model"]) == {"clean", *THREAT_ROWS}
        assert all(v <= m["threat_model"]["clean"] for v in m["threat_model"].values() if v is not None)
        assert m["eps_sweep"]["transfer_base"]  # swept until 0 or the largest eps
    keyed_res = res["models"]["keyed"]
    assert keyed_res["key_recovery"]["probes"]["fraction_recovered"] == 1.0
    assert keyed_res["key_recovery"]["fused_file"]["fraction_recovered"] >= 0.9
    assert keyed_res["threat_model"]["fused_file"] <= keyed_res["threat_model"]["transfer"]
    assert read_run(run).key_fingerprint == key.fingerprint


def test_blast_radius_diagonal_is_white_box_and_same_images(finetuned_keyed, trained_keyed):
    run, _, key, _ = finetuned_keyed
    other_run, _, other_key, _ = trained_keyed
    devices = {"A": load_run(run, key), "B": load_run(other_run, other_key)}
    x, y = sample(load_data("digits", 16).test, 48, seed=4)
    b = blast_radius(devices, x, y, EvalConfig(), blast_steps=20)
    assert b["devices"] == ["A", "B"] and b["n_images"] == 48
    for i in range(2):
        assert b["matrix"][i][i] <= 0.05  # white-box with full knowledge of the device itself
        for j in range(2):
            assert b["matrix"][i][j] <= b["clean"][j] + 1e-9
