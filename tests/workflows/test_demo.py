import json
import os
import stat
from pathlib import Path

import pytest

from ..helpers import keyedge


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = keyedge("demo", "--quick", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"report.md", "results.json", "robust_vs_eps.png", "key.bin"} <= {p.name for p in out.iterdir()}
    assert stat.S_IMODE(os.stat(out / "key.bin").st_mode) == 0o600
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    n = results["settings"]["n_images"]
    assert {"plain", "keyed_full", "keyed_lora"} <= set(models) and n == 48
    for name in ("plain", "keyed_full", "keyed_lora"):
        m = models[name]
        assert round(m["clean"] * n, 4).is_integer()  # a fraction of the same n images
        assert {"pgd_linf_transfer_base", "whitebox_linf"} <= set(m["attacks"])
        assert m["attacks"]["whitebox_linf"] <= m["clean"]  # white-box PGD never helps the model
    for name in ("plain", "keyed_full", "keyed_lora"):  # robust <= clean, for every attack, per image
        m = models[name]
        for attack, robust in m["attacks"].items():
            n_attack = m["n"][attack]
            assert robust <= m["clean"] * n / n_attack + 1e-9 or n_attack < n, (name, attack)
        table = m["threat_model"]
        assert all(table[row] <= table["clean"] for row in table if table[row] is not None)
        assert table["key"] <= table["transfer"]  # the white-box attacker is at least as strong
    for name in ("keyed_full", "keyed_lora"):
        m = models[name]
        assert {"adaptive_eot_linf", "adaptive_key_search_linf", "square_linf", "hopskipjump_linf",
                "mi_di_transfer_own_keys", "block_invariant_transfer_base"} <= set(m["attacks"])
        assert "adaptive_bpda_linf" not in m["attacks"]
        assert m["key_recovery"]["chance_level"] == pytest.approx(1 / 48)  # 4x4x3 key
        assert m["key_recovery"]["probes"]["fraction_recovered"] == 1.0  # 48 probe queries + un-fused weights
    blast = results["blast_radius"]
    assert len(blast["matrix"]) == 3 and all(blast["matrix"][i][i] <= blast["clean"][i] for i in range(3))
    # fp32 artifacts are exact; int8 may differ by an image or two of the quick demo's 32
    fp32 = [a for arts in results["parity"]["models"].values() for a in arts.values() if a["precision"] == "fp32"]
    assert len(fp32) == 6 and all(a["passed"] and a["max_accuracy_difference"] == 0 for a in fp32)
    assert models["keyed_lora"]["train"]["per_key_bytes"] < models["keyed_full"]["train"]["per_key_bytes"]
    assert set(results["parity"]["models"]["keyed_full"]) == {"fused_fp32", "gather_fp32", "fused_int8",
                                                              "sealed_fused_fp32", "sealed_gather_fp32"}
    exposure = {Path(f["artifact"]).parent.name: f for f in results["exposure"]["artifacts"]}
    for name in ("fused_fp32", "fused_int8"):  # a fine-tune of the public base: its columns give the key away
        assert exposure[name]["holds_key"] and exposure[name]["fraction"] >= 0.9, exposure[name]
        assert exposure[name]["whitebox_robust"] <= exposure[name]["clean"]
    assert exposure["gather_fp32"]["fraction"] == 0.0  # the key is in key.bin, not in the graph
    for name in ("sealed_fused_fp32", "sealed_gather_fp32"):
        assert exposure[name]["kind"] == "sealed-bundle" and exposure[name]["fraction"] == 0.0
    assert "What a copy of the device's files yields" in (out / "report.md").read_text()
    assert {m["fold_mode"] for m in results["bench"]["measurements"]} == {"fused", "gather", "plain"}
    randomized = results["randomized"]  # the random ensemble (S = 1, 2) and RND, same query images
    assert set(randomized["targets"]) == {"ensemble N2 S1", "ensemble N2 S2", "RND sigma 0.02"}
    for r in randomized["targets"].values():
        assert r["n"] == 8 and r["draws"] == 3
        assert {"square_k1@100", "square_k2@100", "hopskipjump_k2@100", "whitebox_eot", "transfer_base"} <= set(
            r["attacks"])
        for a in r["attacks"].values():
            assert a["robust_every_draw"] <= a["robust_worst_draw"] <= a["robust_mean"] <= a["clean_mean"] + 1e-9
    assert "square_expected@100" in randomized["targets"]["ensemble N2 S2"]["attacks"]
    report = (out / "report.md").read_text()
    assert "Randomized defenses against attackers who know about them" in report and "RND sigma 0.02" in report
    text = (out / "results.json").read_text() + (out / "report.md").read_text()
    from keyedge import Key

    assert str(Key.load(out / "key.bin").perm.tolist()) not in text
    # a second run refuses to overwrite without --force
    again = keyedge("demo", "--quick", "--out", out)
    assert again.returncode == 2 and "--force" in again.stderr
