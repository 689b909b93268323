"""A fleet of random ensembles (``fleet init --ensemble N``): every device gets a key set of N keys in the
vault, N LoRA members trained into one ensemble run, and one sealed gathered graph whose every member is
held to its own PyTorch reference; the device's bundle answers with fresh draws; rotation draws a new key
set; the report attacks each device on its expected answer. Refusals come before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from keyedge.core.ensemble import read_ensemble
from keyedge.core.keyset import KeySet
from keyedge.core.manifests import read_run
from keyedge.fleet.vault import Vault, read_master_key
from keyedge.runtime.bundle import DeviceAccess, DeviceKey

from ..helpers import keyedge
from .conftest import as_json, rows
from .test_fleet_train import MODEL

N = 2


def _base(root: Path) -> Path:
    from safetensors.torch import save_file

    from keyedge import create_vit

    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=3,
                       num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "base.safetensors"))
    return root / "base.safetensors"


def _init(root: Path, db: str, *extra) -> object:
    return keyedge("fleet", "init", "--db", db, "--base", root / "base.safetensors", *MODEL, "--data", "digits",
                   "--block-size", "4", "--epochs", "1", "--batch-size", "64", "--vault", root / "fleet.vault",
                   "--master-key", root / "master.key", *extra)


@pytest.mark.parametrize("args, needle", [
    (["--ensemble", "2", "--mode", "full"], "--ensemble needs --mode lora"),
    (["--ensemble", "2", "--block-size", "8"], "block size 8 does not divide patch size 4"),
    (["--ensemble", "1"], "'--ensemble': Input should be greater than or equal to 2"),
    (["--ensemble", "65"], "'--ensemble': Input should be less than or equal to 64"),
    (["--ensemble", "2", "--model", "no_such_vit"], "unknown timm model 'no_such_vit'"),
])
def test_an_ensemble_fleet_that_cannot_be_released_is_refused_before_anything_is_written(tmp_path, database, args,
                                                                                        needle):
    import sqlalchemy as sa

    from keyedge.fleet import db as fleet_db

    _base(tmp_path)
    r = _init(tmp_path, database, *args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]
    if "postgresql" in database:  # no schema made on the server either
        assert sa.inspect(fleet_db.engine_for(database)).get_table_names() == []


def test_a_fleet_of_random_ensembles_trains_releases_rotates_and_reports(tmp_path, database):
    root, db = tmp_path, database
    _base(root)
    r = _init(root, db, "--ensemble", str(N))
    assert r.returncode == 0 and f"random ensemble of {N} members" in r.stdout, r.stderr
    master = ["--db", db, "--master-key", root / "master.key"]
    for i, target in enumerate(("jetson-orin", "desktop")):  # desktop too: an ensemble needs no TensorRT plan
        DeviceKey.generate().save(root / f"cam-{i}.key")
        (root / f"cam-{i}.pub").write_bytes(DeviceKey.from_bytes((root / f"cam-{i}.key").read_bytes(),
                                                                 "k").public.to_bytes())
        r = keyedge("fleet", "enroll", f"cam-{i}", "--pubkey", root / f"cam-{i}.pub", "--target", target, *master)
        assert r.returncode == 0 and f"({N} members)" in r.stdout, r.stderr

    # the vault holds one key set per device; the database only its fingerprint
    vault = Vault.open(root / "fleet.vault", read_master_key(root / "master.key"))
    sets = {d: KeySet.from_bytes(raw) for d, raw in vault.devices.items()}
    assert all(len(s) == N for s in sets.values())
    assert dict(rows(db, "SELECT device_id, key_fingerprint FROM devices")) == {d: s.fingerprint
                                                                               for d, s in sets.items()}

    # train: one ensemble run per device, member i with key i of its set
    r = keyedge("fleet", "train", *master, "--runs", root / "runs")
    assert r.returncode == 0 and r.stdout.count(f"{N} members, test accuracy") == 2, r.stderr
    run_dirs = dict(rows(db, "SELECT device_id, run_dir FROM devices"))
    for device, keys in sets.items():
        ens = read_ensemble(run_dirs[device])
        assert ens.key_set_fingerprint == keys.fingerprint and ens.mode == "lora"
        assert [read_run(Path(run_dirs[device]) / m.run).key_fingerprint for m in ens.members] == keys.fingerprints
    trained = {d: as_json(detail) for d, detail in rows(
        db, "SELECT d.device_id, e.detail FROM events e JOIN devices d ON e.device = d.id WHERE e.kind = 'trained'")}
    assert all(len(t["members_test_acc"]) == N and t["test_acc"] == pytest.approx(np.mean(t["members_test_acc"]))
               for t in trained.values())

    # release: one gathered graph per device, parity per member, sealed and audited; no TensorRT plan
    for mode in ("gather", "kernel"):  # refused before any device is claimed
        r = keyedge("fleet", "release", *master, "--mode", mode, "--out", root / "rel")
        assert r.returncode == 2 and "--mode fused only" in r.stderr, r.stderr
    assert {s for (s,) in rows(db, "SELECT state FROM devices")} == {"trained"} and not (root / "rel").exists()
    r = keyedge("fleet", "release", *master, "--out", root / "rel", "--parity-n", "30")
    assert r.returncode == 0 and r.stdout.count(f"random ensemble of {N}, served by ONNX Runtime") == 2, r.stderr
    for device, parity, hashes, precision, audit, fp in rows(
            db, "SELECT d.device_id, r.parity, r.hashes, r.precision, r.audit, r.key_fingerprint FROM releases r "
                "JOIN devices d ON r.device = d.id"):
        parity, hashes, audit = as_json(parity), as_json(hashes), as_json(audit)
        assert parity["passed"] and len(parity["members"]) == N and precision == "fp32"
        assert fp == sets[device].fingerprint  # the set's fingerprint: no member's, no key
        assert audit["passed"] and [(f["kind"], f["leaked"]) for f in audit["findings"]] == [("sealed-bundle", 0.0)]
        assert parity["sets"]["clean"]["accuracy"] == min(m["clean"]["accuracy"] for m in parity["members"])
        assert "model.kes" in hashes and not any(h.startswith("plan/") for h in hashes)
    assert not [p for p in (root / "rel").rglob("*") if p.suffix in (".onnx", ".data")]
    status = json.loads(keyedge("fleet", "status", "--db", db, "--json").stdout)
    assert status["fleet"]["ensemble"] == N
    r = keyedge("fleet", "export", "--to", root / "ota", "--db", db)
    assert r.returncode == 0 and json.loads((root / "ota" / "index.json").read_text())["ensemble"] == N, r.stderr
    if "://" not in db:  # nothing secret in the database file: no member's permutation or key file
        stored = b"".join(p.read_bytes() for p in root.glob("fleet.db*"))
        for member in (k for s in sets.values() for k in s):
            assert member.perm.astype("<u4").tobytes() not in stored and bytes(member.to_bytes()) not in stored

    # the device opens its bundle and answers from the members it draws: a draw's answer is the mean
    # probability of those members' PyTorch references
    from keyedge.core.data import run_images
    from keyedge.core.ensemble import load_members
    from keyedge.runtime.runners import open_runner

    bundle = Path(next(d for d in status["devices"] if d["device"] == "cam-0")["bundle"]["path"])
    opener = DeviceAccess(key=root / "cam-0.key", trust=(root / "publisher.pub",)).opener()
    members = load_members(run_dirs["cam-0"], sets["cam-0"])
    member0 = Path(run_dirs["cam-0"]) / read_ensemble(run_dirs["cam-0"]).members[0].run
    x, _ = run_images(read_run(member0), 8)
    with open_runner(bundle, opener=opener, draw=N) as runner:
        draws = np.array([[1, 0]] * 4 + [[0, 1]] * 4)
        got = np.exp(runner.answer(x.numpy(), draws))
        with torch.no_grad():
            want = torch.stack([m(x).softmax(1) for m in members]).mean(0).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)
        answered = runner(x.numpy())
        assert answered.shape == (8, 10) and np.allclose(np.exp(answered).sum(1), 1, atol=1e-4)

    # rotate: a new key set, a new ensemble run and bundle; the old set retired
    old = next(d for d in status["devices"] if d["device"] == "cam-1")
    r = keyedge("fleet", "rotate", "cam-1", *master, "--runs", root / "runs", "--out", root / "rel",
                "--parity-n", "30")
    assert r.returncode == 0 and f"new key set" in r.stdout, r.stderr
    vault = Vault.open(root / "fleet.vault", read_master_key(root / "master.key"))
    new = KeySet.from_bytes(vault.devices["cam-1"])
    assert new.fingerprint != old["key_fingerprint"] and old["key_fingerprint"] in vault.retired
    assert KeySet.from_bytes(vault.key_file("cam-1", old["key_fingerprint"])).fingerprint == old["key_fingerprint"]

    # report: each device attacked, and scored, on its expected answer
    r = keyedge("fleet", "report", *master, "--out", root / "report", "--sample", "2", "--n", "30")
    assert r.returncode == 0, r.stderr
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["fleet"]["ensemble"] == N and len(report["blast_radius"]["matrix"]) == 2
    costs = {c["device"]: c for c in report["costs"]}
    one_member = read_run(member0).per_key_bytes
    assert all(c["adapter_bytes"] == N * one_member for c in costs.values())  # every member's adapter
    assert "every member's weights and key" in (root / "report" / "report.md").read_text()


def test_an_interrupted_ensemble_keeps_its_finished_members_and_resumes_the_one_it_trained(tmp_path, database,
                                                                                        monkeypatch):
    """A worker stopped after member 1's first epoch (of 2) gives the device back; the next one keeps member 0
    (not trained again) and continues member 1 from its epoch checkpoint."""
    from keyedge.core.progress import quiet
    from keyedge.fleet.training import train_devices
    from keyedge.training import ensemble as training_ensemble
    from keyedge.training import train as training_train

    root, db = tmp_path, database
    _base(root)
    assert _init(root, db, "--ensemble", str(N), "--epochs", "2").returncode == 0
    DeviceKey.generate().save(root / "cam-0.key")
    (root / "cam-0.pub").write_bytes(DeviceKey.from_bytes((root / "cam-0.key").read_bytes(), "k").public.to_bytes())
    r = keyedge("fleet", "enroll", "cam-0", "--pubkey", root / "cam-0.pub", "--target", "jetson-orin", "--db", db,
                "--master-key", root / "master.key")
    assert r.returncode == 0, r.stderr
    master = read_master_key(root / "master.key")
    real_train, real_save, calls = training_ensemble.train, training_train._save_epoch, []

    def stopped_after_member_1_epoch_1(out, s, cfg, manifest, epoch, step):
        saved = real_save(out, s, cfg, manifest, epoch, step)
        if Path(out).name == "member-1" and epoch == 0:
            raise KeyboardInterrupt
        return saved

    def counted(cfg, *args, **kwargs):
        calls.append((Path(cfg.out).name, cfg.resume))
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(training_ensemble, "train", counted)
    monkeypatch.setattr(training_train, "_save_epoch", stopped_after_member_1_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_devices(db, master, root / "runs", echo=quiet)
    assert calls == [("member-0", False), ("member-1", False)]
    assert rows(db, "SELECT state, lease_owner FROM devices") == [("enrolled", None)]
    (run,) = [p.parent for p in (root / "runs").rglob("ensemble.json")]
    member0 = (run / "member-0" / "manifest.json").read_bytes()
    first_epoch = read_run(run / "member-1").history
    assert len(first_epoch) == 1 and (run / "member-1" / "checkpoint.pt").is_file()

    calls.clear()
    monkeypatch.setattr(training_train, "_save_epoch", real_save)
    assert train_devices(db, master, root / "runs", echo=quiet) == ["cam-0"]
    assert calls == [("member-1", True)] and (run / "member-0" / "manifest.json").read_bytes() == member0
    history = read_run(run / "member-1").history
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == first_epoch[0]  # continued, not redone
    (detail,), = rows(db, "SELECT detail FROM events WHERE kind = 'trained'")
    assert as_json(detail)["resumed"] and len(as_json(detail)["members_test_acc"]) == N
