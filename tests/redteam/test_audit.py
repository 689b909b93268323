"""keyedge audit: key leakage from every artifact kind, scored with the true key, gating a release."""

import json

import numpy as np
import pytest

from keyedge import Key
from keyedge.redteam.attacks import keyrecovery

from ..helpers import keyedge


@pytest.fixture(scope="module")
def exported(tmp_path_factory, finetuned_keyed):
    run, key_path, _, _ = finetuned_keyed
    root = tmp_path_factory.mktemp("audit_art")
    for name, args in {"fused": [], "fused_int8": ["--precision", "int8"], "fused_fp16": ["--precision", "fp16"],
                       "gather": ["--mode", "gather"], "embedded": ["--mode", "gather", "--embed-key"],
                       "kernel": ["--mode", "kernel", "--input", "uint8", "--layout", "nhwc"]}.items():
        r = keyedge("export", run, "--key", key_path, "-o", root / name, *args)
        assert r.returncode == 0, r.stderr
    return root


def _audit(tmp_path, finetuned_keyed, *artifacts, extra=()):
    _, key_path, _, base = finetuned_keyed
    out = tmp_path / "audit"
    r = keyedge("audit", *artifacts, "--base", base, "--key", key_path, "-o", out, "--n", "64", *extra)
    report = json.loads((out / "audit.json").read_text()) if (out / "audit.json").exists() else None
    return r, report


def test_fused_files_leak_the_key_and_fail_the_gate(tmp_path, finetuned_keyed, exported):
    r, report = _audit(tmp_path, finetuned_keyed, exported / "fused", exported / "fused_int8", exported / "fused_fp16",
                       extra=("--fail-above", "0.5"))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "leak more than 0.50" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for f in report["artifacts"]:
        assert f["holds_key"] and f["fraction"] >= 0.9, f
        assert f["agreement"] >= 0.9 and f["whitebox_robust"] <= f["clean"]
        assert f["whitebox_robust"] < 0.2 * f["clean"]  # with the recovered key, white-box PGD wins
    assert not report["passed"] and (tmp_path / "audit" / "report.md").is_file()


def test_gather_and_kernel_files_hold_no_key(tmp_path, finetuned_keyed, exported):
    r, report = _audit(tmp_path, finetuned_keyed, exported / "gather", exported / "kernel",
                       extra=("--fail-above", "0.5"))
    assert r.returncode == 0, r.stderr
    for f in report["artifacts"]:
        assert f["holds_key"] is False and f["fraction"] == 0.0 and "holds no key" in f["note"]


def test_embedded_key_is_read_off_the_graph(tmp_path, finetuned_keyed, exported):
    r, report = _audit(tmp_path, finetuned_keyed, exported / "embedded")
    assert r.returncode == 0, r.stderr  # no gate asked for
    f = report["artifacts"][0]
    assert f["fraction"] == 1.0 and f["agreement"] == 1.0


def test_unfused_weights_plus_probe_queries_recover_the_key(tmp_path, finetuned_keyed):
    run, _, _, _ = finetuned_keyed
    r, report = _audit(tmp_path, finetuned_keyed, run, extra=("--queries", "48"))
    assert r.returncode == 0, r.stderr
    f = report["artifacts"][0]
    assert f["queries"] == 48 and f["fraction"] == 1.0 and "logit probes" in f["method"]
    r, report = _audit(tmp_path / "b", finetuned_keyed, run)  # no queries: column matching only
    assert report["artifacts"][0]["fraction"] < 0.5


def test_probe_attack_on_a_random_model_is_exact():
    """The probe attack needs no training: any model whose answers differ per position reveals the key."""
    from ..helpers import tiny_vit

    from keyedge.core.models import KeyedClassifier

    torch = pytest.importorskip("torch")
    model = tiny_vit(img_size=16, patch_size=4)
    key = Key.generate(4, seed=5)
    device = KeyedClassifier(model, key).eval()
    leaked = KeyedClassifier(model, None).eval()
    with torch.no_grad():
        perm = keyrecovery.probe_key(lambda x: device(x).numpy(), leaked.classify_shuffled, (16, 16), 3, 4)
    assert np.array_equal(perm, key.perm)


def test_audit_bad_input(tmp_path, finetuned_keyed, trained_keyed_other, exported):
    run, key_path, _, base = finetuned_keyed
    other_run, _, _, _ = trained_keyed_other
    Key.generate(2, seed=0).save(tmp_path / "k2.bin")
    cases = [
        (["--base", other_run / "model.safetensors", "--key", key_path], "another base"),
        (["--base", base, "--key", tmp_path / "k2.bin"], "the key is 2x2x3"),
        (["--base", tmp_path / "nope.safetensors"], "does not exist"),
    ]
    for args, needle in cases:
        out = tmp_path / "out"
        r = keyedge("audit", exported / "fused", *args, "-o", out)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()
    r = keyedge("audit", tmp_path / "missing", "--base", base, "-o", tmp_path / "out")
    assert r.returncode == 2 and "does not exist" in r.stderr
