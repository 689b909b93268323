"""Parity: the rule on image sets (exact numbers), and the command on real artifacts."""

import json

import numpy as np
import pytest

from keyedge.checks.config import DEFAULT_TOLERANCE, ParityConfig, Tolerance
from keyedge.checks.parity import compare, load_sets, mcnemar_p

from ..helpers import keyedge


def _logits(predicted, classes=10):
    out = np.zeros((len(predicted), classes), dtype=np.float32)
    out[np.arange(len(predicted)), predicted] = 1.0
    return out


def _pair(n, wins, losses, both_wrong=0):
    """Labels, reference and artifact predictions on ``n`` images: ``wins`` right only for the artifact,
    ``losses`` right only for the reference, ``both_wrong`` wrong for both (with different labels)."""
    labels = np.zeros(n, dtype=np.int64)
    ref, art = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    ref[:wins] = 1
    art[wins:wins + losses] = 1
    ref[wins + losses:wins + losses + both_wrong] = 2
    art[wins + losses:wins + losses + both_wrong] = 3
    return labels, _logits(ref), _logits(art)


def test_mcnemar_exact_p_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 0) == pytest.approx(0.25)            # 2 * (1/2)^3
    assert mcnemar_p(0, 8) == pytest.approx(2 / 256)
    assert mcnemar_p(5, 5) == pytest.approx(1.0)
    assert mcnemar_p(2, 6) == pytest.approx(0.2890625)      # 2 * P(X <= 2), X ~ Bin(8, 1/2)


def test_fp32_needs_the_same_accuracy():
    labels, ref, art = _pair(200, wins=1, losses=0)
    r = compare(art, ref, labels, DEFAULT_TOLERANCE["fp32"])
    assert r["difference"] == pytest.approx(0.005) and (r["wins"], r["losses"]) == (1, 0)
    assert not r["passed"]  # half a point over 0.1: fp32 takes no statistical allowance
    labels, ref, art = _pair(200, wins=0, losses=0, both_wrong=2)
    r = compare(art, ref, labels, DEFAULT_TOLERANCE["fp32"])
    assert r["passed"] and r["top1_agreement"] == pytest.approx(198 / 200)


def test_int8_flips_either_way_pass_and_a_real_loss_fails():
    int8 = DEFAULT_TOLERANCE["int8"]
    labels, ref, art = _pair(200, wins=3, losses=0)          # +1.5 points: the VNNI machine's case
    r = compare(art, ref, labels, int8)
    assert r["difference"] == pytest.approx(0.015) and r["mcnemar_p"] == pytest.approx(0.25) and r["passed"]
    labels, ref, art = _pair(200, wins=0, losses=8)          # -4 points, all one way
    r = compare(art, ref, labels, int8)
    assert r["mcnemar_p"] < int8.alpha and not r["passed"]
    labels, ref, art = _pair(200, wins=0, losses=5)          # -2.5 points: chance cannot be ruled out, but
    r = compare(art, ref, labels, int8)                     # it is beyond twice the tolerance
    assert r["mcnemar_p"] >= int8.alpha and not r["passed"]
    labels, ref, art = _pair(32, wins=0, losses=1)           # one image of 32 is 3 points: up to two pass
    r = compare(art, ref, labels, int8)
    assert r["difference"] == pytest.approx(-1 / 32) and r["passed"]
    labels, ref, art = _pair(32, wins=0, losses=2)           # two of 32 one way: 93.75% agreement
    assert not compare(art, ref, labels, int8)["passed"]
    labels, ref, art = _pair(100, wins=0, losses=3)          # three of 100, one way: 3 points > 2
    assert not compare(art, ref, labels, int8)["passed"]
    labels, ref, art = _pair(2000, wins=0, losses=15)        # -0.75 point: inside the tolerance
    assert compare(art, ref, labels, int8)["passed"]
    labels, ref, art = _pair(20000, wins=100, losses=400)    # -1.5 points on many images: significant
    assert not compare(art, ref, labels, int8)["passed"]


def test_every_set_needs_the_agreement_floor():
    """Images both get wrong, with different labels, move no accuracy but count against agreement."""
    int8 = DEFAULT_TOLERANCE["int8"]
    labels, ref, art = _pair(200, wins=0, losses=0, both_wrong=9)   # 95.5% agreement
    assert compare(art, ref, labels, int8)["passed"]
    labels, ref, art = _pair(200, wins=0, losses=0, both_wrong=11)  # 94.5%
    r = compare(art, ref, labels, int8)
    assert r["difference"] == 0 and not r["passed"]


def test_tolerances_in_points_replace_only_the_accuracy():
    cfg = ParityConfig().with_accuracy({"int8": 2.0})
    assert cfg.tolerance["int8"] == Tolerance(0.02, DEFAULT_TOLERANCE["int8"].agreement, True)
    assert cfg.tolerance["fp32"] == DEFAULT_TOLERANCE["fp32"]


def test_parity_passes_on_exact_and_fails_on_other_key(tmp_path, trained_keyed, trained_keyed_other):
    run, key_path, key, _ = trained_keyed
    other_run, other_key_path, _, _ = trained_keyed_other
    for name, (r_dir, k_path, mode) in {"exact": (run, key_path, "fused"), "gather": (run, key_path, "gather"),
                                        "other": (other_run, other_key_path, "fused")}.items():
        res = keyedge("export", r_dir, "--key", k_path, "-o", tmp_path / name, "--mode", mode)
        assert res.returncode == 0, res.stderr
    ok = keyedge("parity", "--reference", run, "--key", key_path, tmp_path / "exact" / "model.onnx",
                 tmp_path / "gather" / "model.onnx", run, "--n", "200", "-o", tmp_path / "p1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads((tmp_path / "p1" / "parity.json").read_text())
    assert all(a["max_accuracy_difference"] == 0 for a in report["artifacts"].values())
    sets, labels, fp = load_sets(tmp_path / "p1" / "adversarial.npz")
    assert fp == key.fingerprint and "whitebox_linf" in sets and len(labels) == 200
    bad = keyedge("parity", "--reference", run, "--key", key_path, tmp_path / "other" / "model.onnx",
                  "--n", "200", "-o", tmp_path / "p2")
    assert bad.returncode == 1
    art = json.loads((tmp_path / "p2" / "parity.json").read_text())["artifacts"]
    art = next(iter(art.values()))
    assert not art["passed"] and not art["key_fingerprint_match"]
    assert art["max_accuracy_difference"] > 0.05  # the adversarial accuracy gives it away too


def test_the_agreement_floor_fails_an_artifact(tmp_path, trained_keyed):
    """An artifact is held to its precision's clean-agreement floor too (here one no artifact can reach)."""
    from keyedge.workflows.parity import run_parity

    run, key_path, _, _ = trained_keyed
    assert keyedge("export", run, "--key", key_path, "-o", tmp_path / "a").returncode == 0
    strict = ParityConfig(n=50)
    strict.tolerance["fp32"] = Tolerance(1.0, 1.01, False)
    report = run_parity(run, key_path, [tmp_path / "a"], tmp_path / "p", cfg=strict, echo=lambda *a, **k: None)
    art = next(iter(report["artifacts"].values()))
    assert not report["passed"] and not art["agreement_passed"]
    assert all(abs(s["difference"]) <= 1.0 and not s["passed"] for s in art["sets"].values())
    assert "FAIL: agreement" in (tmp_path / "p" / "parity.md").read_text()
