import json
import os
import stat

import numpy as np
import pytest
import torch

from keyedge.core.ensemble import load_members
from keyedge.core.errors import KeyedgeError
from keyedge.core.keyset import KeySet
from keyedge.core.manifests import ArtifactManifest
from keyedge.deploy.ensemble import gathered_ensemble
from keyedge.runtime.runners.ensemble import EnsembleRunner, QueryNoise, csprng_normal, draw_rows

from ..helpers import keyedge


def test_each_row_computes_its_member_s_merged_folded_model(lora_ensemble):
    ens, _, keys, _ = lora_ensemble
    unmerged = load_members(ens, keys, merge=False)
    merged = load_members(ens, keys)
    graph = gathered_ensemble(unmerged)
    x = torch.rand(7, 3, 16, 16)
    member = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    with torch.no_grad():
        got = graph(x, member)
        want = torch.cat([merged[m](x[j:j + 1]) for j, m in enumerate(member.tolist())])
    err = float((got - want).norm() / want.norm())
    assert err < 1e-5, err
    assert (got.argmax(1) == want.argmax(1)).all()


def test_members_of_different_bases_are_refused(lora_ensemble, trained_keyed):
    ens, _, keys, _ = lora_ensemble
    members = load_members(ens, keys, merge=False)
    with pytest.raises(KeyedgeError, match="only LoRA members"):
        gathered_ensemble([members[0], trained_keyed[3]])
    other = members[1].copy()
    with torch.no_grad():  # a member whose frozen base moved
        next(p for n, p in other.model.named_parameters() if "blocks.0.norm1.weight" in n).add_(0.1)
    with pytest.raises(KeyedgeError, match="does not share member 0's base"):
        gathered_ensemble([members[0], other])


@pytest.fixture(scope="module")
def exported(lora_ensemble, tmp_path_factory):
    ens, keys_path, _, _ = lora_ensemble
    out = tmp_path_factory.mktemp("ensemble_export")
    r = keyedge("export", ens, "--key", keys_path, "-o", out / "gathered")
    assert r.returncode == 0, r.stderr
    r = keyedge("export", ens, "--key", keys_path, "-o", out / "separate", "--ensemble-form", "separate")
    assert r.returncode == 0, r.stderr
    return out


def test_the_gathered_graph_s_members_equal_their_references_and_the_separate_form(lora_ensemble, exported):
    ens, _, keys, _ = lora_ensemble
    merged = load_members(ens, keys)
    report = json.loads((exported / "gathered" / "verification.json").read_text())
    assert report["passed"] and set(report["members"]) == {"member-0", "member-1", "member-2"}
    assert all(r["real"]["rel_error"] <= 1e-4 and r["real"]["top1_agreement"] == 1.0
               for r in report["members"].values())
    manifest = ArtifactManifest.read(exported / "gathered" / "manifest.json")
    assert manifest.ensemble.form == "gathered" and list(manifest.ensemble.member_fingerprints) == keys.fingerprints
    assert manifest.key_fingerprint == keys.fingerprint and manifest.contains_key and manifest.fold_mode == "fused"
    x = np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32)
    draws = np.array([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    with EnsembleRunner(exported / "gathered", draw=2) as g, EnsembleRunner(exported / "separate", draw=2) as s:
        got, other = g.answer(x, draws), s.answer(x, draws)
        rows = g.member_logits(x, np.zeros(5, np.int64))
    with torch.no_grad():
        want = torch.stack([torch.stack([merged[m](torch.from_numpy(x[j:j + 1]))[0].softmax(0) for m in d]).mean(0)
                            for j, d in enumerate(draws.tolist())])
        assert np.allclose(rows, merged[0](torch.from_numpy(x)).numpy(), atol=1e-4)
    assert np.allclose(np.exp(got), want.numpy(), atol=1e-5) and np.allclose(got, other, atol=1e-4)
    graph_bytes = (exported / "gathered" / "model.onnx").stat().st_size
    separate_bytes = sum((exported / "separate" / f"member-{i}" / "model.onnx").stat().st_size for i in range(3))
    assert graph_bytes < separate_bytes  # the base once, not three times
    for path in (exported / "gathered" / "model.onnx", *(exported / "separate").glob("member-*/model.onnx")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # the members' keys are folded in


def test_draws_are_fresh_per_query_and_the_answer_is_a_distribution(exported):
    x = np.random.default_rng(1).random((64, 3, 16, 16), dtype=np.float32)
    with EnsembleRunner(exported / "gathered", draw=1) as runner:
        a, b = runner(x), runner(x)
        probs = np.exp(a)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert not np.allclose(a, b)  # 64 images, a member drawn for each: two calls differ
    draws = draw_rows(500, 8, 2)
    assert draws.shape == (500, 2) and (draws[:, 0] != draws[:, 1]).all() and len({tuple(d) for d in draws}) > 40


def test_query_noise_is_fresh_and_bounded(exported, trained_keyed, tmp_path):
    x = np.full((4, 3, 16, 16), 0.5, np.float32)
    with EnsembleRunner(exported / "gathered", draw=3) as full:  # all members: only the noise is random
        assert np.allclose(full(x), full(x), atol=1e-6)
    with QueryNoise(EnsembleRunner(exported / "gathered", draw=3), 0.05) as noisy:  # it runs its inner runner
        a, b = noisy(x), noisy(x)
    assert not np.allclose(a, b)
    z = csprng_normal((200_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    with pytest.raises(KeyedgeError, match="standard deviation"):
        QueryNoise(EnsembleRunner(exported / "gathered"), 0.0)


@pytest.mark.parametrize("case", ["no_key", "one_key", "other_set", "form", "precision", "mode", "draw"])
def test_bad_ensemble_exports_are_one_line_and_write_nothing(lora_ensemble, trained_keyed, exported, tmp_path, case):
    ens, keys_path, _, _ = lora_ensemble
    KeySet.generate(3, 4).save(tmp_path / "other.bin")
    args = {"no_key": [ens], "one_key": [ens, "--key", trained_keyed[1]],
            "other_set": [ens, "--key", tmp_path / "other.bin"],
            "form": [trained_keyed[0], "--key", trained_keyed[1], "--ensemble-form", "gathered"],
            "precision": [ens, "--key", keys_path, "--precision", "int8"],
            "mode": [ens, "--key", keys_path, "--mode", "gather"]}.get(case)
    if case == "draw":
        with pytest.raises(KeyedgeError, match="1 to 3"):
            EnsembleRunner(exported / "gathered", draw=4)
        return
    r = keyedge("export", *args, "-o", tmp_path / "out")
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_parity_holds_every_member_to_its_own_reference(lora_ensemble, exported, tmp_path):
    ens, keys_path, keys, _ = lora_ensemble
    r = keyedge("parity", exported / "gathered", exported / "separate", "--reference", ens, "--key", keys_path,
                "--n", "32", "-o", tmp_path / "parity")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    assert report["passed"] and report["key_fingerprint"] == keys.fingerprint
    names = sorted(report["artifacts"])
    assert len(names) == 6 and all(n.endswith(("[member-0]", "[member-1]", "[member-2]")) for n in names)
    for result in report["artifacts"].values():
        assert result["key_fingerprint_match"] and set(result["sets"]) >= {"clean", "whitebox_linf"}
        assert all(s["top1_agreement"] >= 0.99 for s in result["sets"].values())
    assert sorted(p.name for p in (tmp_path / "parity").glob("adversarial-member-*.npz")) == [
        "adversarial-member-0.npz", "adversarial-member-1.npz", "adversarial-member-2.npz"]


@pytest.mark.parametrize("case", ["other_set", "no_key", "single_reference"])
def test_parity_of_an_ensemble_refuses_what_is_not_its_export(lora_ensemble, trained_keyed, exported, tmp_path, case):
    ens, keys_path, _, _ = lora_ensemble
    KeySet.generate(3, 4).save(tmp_path / "other.bin")
    args = {"other_set": ["--reference", ens, "--key", tmp_path / "other.bin"],
            "no_key": ["--reference", ens],
            "single_reference": ["--reference", trained_keyed[0], "--key", trained_keyed[1]]}[case]
    r = keyedge("parity", exported / "gathered", *args, "--n", "8", "-o", tmp_path / "out")
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_bench_runs_an_ensemble_s_draw_beside_a_single_model_and_rnd(exported, tmp_path):
    r = keyedge("bench", exported / "gathered", exported / "separate", "--ensemble-draw", "2", "--batch", "1",
                "--rounds", "1", "--iters", "2", "-o", tmp_path / "bench")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["measurements"]
    assert {row["backend"] for row in rows} == {"ensemble-3x2-onnxruntime-cpu"} and len(rows) == 2
    r = keyedge("bench", exported / "gathered", "--query-noise", "0.02", "--batch", "1", "--rounds", "1",
                "--iters", "2", "-o", tmp_path / "rnd")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "rnd" / "bench.json").read_text())["measurements"]
    assert rows[0]["backend"] == "ensemble-3x1-onnxruntime-cpu+rnd0.02"


@pytest.mark.parametrize("args,needle", [(["--ensemble-draw", "4"], "cannot draw 4 of 3"),
                                         (["--ensemble-draw", "0"], "--ensemble-draw"),
                                         (["--query-noise", "0"], "standard deviation"),
                                         (["--query-noise", "2"], "standard deviation")])
def test_bench_refuses_a_bad_draw_or_noise_before_measuring(exported, tmp_path, args, needle):
    r = keyedge("bench", exported / "gathered", *args, "--batch", "1", "--rounds", "1", "--iters", "1",
                "-o", tmp_path / "bench")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "bench").exists()


def test_audit_reads_every_member_s_key_off_an_ensemble_and_none_off_its_bundle(lora_ensemble, exported, tmp_path):
    ens, keys_path, keys, base = lora_ensemble
    assert keyedge("device", "keygen", "-o", tmp_path / "device.key").returncode == 0
    r = keyedge("seal", exported / "gathered", "--to", tmp_path / "device.pub", "--allow-unsigned",
                "-o", tmp_path / "ens.kes")
    assert r.returncode == 0, r.stderr
    r = keyedge("audit", exported / "gathered", exported / "separate", tmp_path / "ens.kes", "--base", base,
                "--key", keys_path, "-o", tmp_path / "audit", "--fail-above", "0.5")
    assert r.returncode == 3, r.stdout + r.stderr  # the plaintext files leak every member's key
    found = {f["artifact"]: f for f in json.loads((tmp_path / "audit" / "audit.json").read_text())["artifacts"]}
    members = [f for name, f in found.items() if "[member-" in name]
    assert len(members) == 6 and all(f["holds_key"] and f["fraction"] == 1.0 for f in members)
    sealed = found[str(tmp_path / "ens.kes")]
    assert sealed["kind"] == "sealed-bundle" and sealed["leaked"] == 0.0
    r = keyedge("bench", tmp_path / "ens.kes", "--device-key", tmp_path / "device.key", "--allow-unsigned",
                "--ensemble-draw", "2", "--batch", "1", "--rounds", "1", "--iters", "2", "-o", tmp_path / "bench")
    assert r.returncode == 0, r.stdout + r.stderr  # the sealed graph runs from memory, two members a query
    assert "ensemble-3x2-onnxruntime-cpu" in (tmp_path / "bench" / "bench.md").read_text()
    r = keyedge("audit", exported / "gathered", "--base", base, "-o", tmp_path / "audit2")  # no gate, no key
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[member-") == 3


@pytest.mark.parametrize("case", ["set_on_single", "key_on_ensemble", "other_set"])
def test_audit_refuses_a_key_of_the_wrong_kind(lora_ensemble, trained_keyed, exported, tmp_path, case):
    ens, keys_path, _, base = lora_ensemble
    KeySet.generate(3, 4).save(tmp_path / "other.bin")
    r = keyedge("export", trained_keyed[0], "--key", trained_keyed[1], "-o", tmp_path / "single")
    assert r.returncode == 0, r.stderr
    artifact, key = {"set_on_single": (tmp_path / "single", keys_path),
                     "key_on_ensemble": (exported / "gathered", trained_keyed[1]),
                     "other_set": (exported / "gathered", tmp_path / "other.bin")}[case]
    r = keyedge("audit", artifact, "--base", base, "--key", key, "-o", tmp_path / "audit")
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "audit").exists()
