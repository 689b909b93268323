import json
import os
import stat

import pytest

from .test_cli_keys import keyedge


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = keyedge("demo", "--quick", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"report.md", "results.json", "robust_vs_eps.png", "key.bin"} <= {p.name for p in out.iterdir()}
    assert stat.S_IMODE(os.stat(out / "key.bin").st_mode) == 0o600
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert {"plain", "keyed_full", "keyed_lora"} <= set(models)
    for name in ("plain", "keyed_full", "keyed_lora"):
        m = models[name]
        assert 0 <= m["clean"] <= 1
        assert "pgd_linf_transfer_base" in m["attacks"] and "whitebox_linf" in m["attacks"]
        assert all(0 <= v <= 1 for v in m["attacks"].values())
    for name in ("keyed_full", "keyed_lora"):
        assert 0 <= models[name]["wrong_key"] <= 1
        assert {"adaptive_eot_linf", "adaptive_bpda_linf", "adaptive_key_search_linf"} <= set(models[name]["attacks"])
        assert "key_recovery" in models[name]
    assert models["keyed_lora"]["train"]["per_key_bytes"] < models["keyed_full"]["train"]["per_key_bytes"]
    assert set(results["parity"]["models"]["keyed_full"]) == {"fused_fp32", "gather_fp32", "fused_int8"}
    assert {m["fold_mode"] for m in results["bench"]["measurements"]} == {"fused", "gather", "plain"}
    text = (out / "results.json").read_text() + (out / "report.md").read_text()
    from keyedge import Key

    assert str(Key.load(out / "key.bin").perm.tolist()) not in text
    # a second run refuses to overwrite without --force
    again = keyedge("demo", "--quick", "--out", out)
    assert again.returncode == 2 and "--force" in again.stderr
