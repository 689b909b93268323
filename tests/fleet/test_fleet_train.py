"""A 3-device fleet on digits, end to end, with real worker processes on one SQLite file: two ``fleet train``
workers split the work, one is killed with SIGKILL while it trains, its lease expires and the other trains
that device too (every device trained exactly once, each with its own key); then ``release`` (export,
parity, build plan, seal + sign, audit gate), ``status``, ``rotate``, ``revoke`` and ``report``."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyedge.core.manifests import read_run
from keyedge.fleet.vault import Vault, read_master_key
from keyedge.runtime.bundle import DeviceKey

from ..helpers import keyedge
from .conftest import as_json, rows

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4", "--depth", "2",
         "--embed-dim", "48", "--heads", "3", "--num-classes", "10"]


def _base(root: Path) -> Path:
    """The fleet's public base: a plain ViT pre-trained on digits by keyedge's trainer."""
    from keyedge.core.runs import WEIGHTS
    from keyedge.training.config import TrainConfig
    from keyedge.training.train import train

    train(TrainConfig(model="vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=10, data="digits",
                      model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3}, epochs=8, lr=3e-3, batch_size=64,
                      out=str(root / "base"), progress=False, workers=0))
    return root / "base" / WEIGHTS


@pytest.fixture
def fleet3(tmp_path, database):
    db = database
    r = keyedge("fleet", "init", "--db", db, "--base", _base(tmp_path), *MODEL,
                "--data", "digits", "--block-size", "4", "--mode", "lora", "--epochs", "1", "--batch-size", "64",
                "--vault", tmp_path / "fleet.vault", "--master-key", tmp_path / "master.key")
    assert r.returncode == 0, r.stderr
    rows = ["device_id,pubkey,target"]
    for i in range(3):
        DeviceKey.generate().save(tmp_path / f"cam-{i}.key")
        (tmp_path / f"cam-{i}.pub").write_bytes(DeviceKey.from_bytes((tmp_path / f"cam-{i}.key").read_bytes(),
                                                                     "k").public.to_bytes())
        rows.append(f"cam-{i},cam-{i}.pub,{('jetson-orin', 'desktop', 'jetson-orin-nano')[i]}")
    (tmp_path / "devices.csv").write_text("\n".join(rows) + "\n")
    r = keyedge("fleet", "enroll", "--from-csv", tmp_path / "devices.csv", "--db", db, "--master-key",
                tmp_path / "master.key")
    assert r.returncode == 0, r.stderr
    return tmp_path, db


def _worker(root: Path, db: str, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "keyedge.cli", "fleet", "train", "--db", db, "--master-key",
                             str(root / "master.key"), "--runs", str(root / "runs"), "--worker", name,
                             "--lease-seconds", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_rows = rows


def _kill_one_of_two_workers(root: Path, db: str) -> None:
    victim, survivor = _worker(root, db, "victim"), _worker(root, db, "survivor")
    deadline = time.monotonic() + 120
    while not _rows(db, "SELECT 1 FROM devices WHERE lease_owner = 'victim' AND state = 'training'"):
        assert time.monotonic() < deadline and victim.poll() is None, victim.communicate()
        time.sleep(0.2)
    time.sleep(1.0)  # in the middle of its training
    victim.kill()  # SIGKILL: no clean-up, its lease stays until it expires
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err


def _status(db: str) -> dict:
    r = keyedge("fleet", "status", "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    return {d["device"]: d for d in as_json(r.stdout)["devices"]}


def test_a_3_device_fleet_end_to_end(fleet3):
    root, db = fleet3
    master = ["--db", db, "--master-key", root / "master.key"]
    # train: two workers, one killed mid-training
    _kill_one_of_two_workers(root, db)
    states = dict(_rows(db, "SELECT device_id, state FROM devices"))
    assert states == {"cam-0": "trained", "cam-1": "trained", "cam-2": "trained"}
    trained = _rows(db, "SELECT d.device_id, e.detail FROM events e JOIN devices d ON e.device = d.id "
                        "WHERE e.kind = 'trained'")
    assert sorted(d for d, _ in trained) == ["cam-0", "cam-1", "cam-2"]  # exactly once each
    assert all(as_json(detail)["worker"] == "survivor" for _, detail in trained)
    claims = _rows(db, "SELECT d.device_id, e.detail FROM events e JOIN devices d ON e.device = d.id "
                       "WHERE e.kind = 'claim'")
    taken_over = [d for d, detail in claims if as_json(detail)["previous_owner"] == "victim"]
    assert len(taken_over) == 1  # the lease expiry brought the killed worker's device back
    run_dirs = dict(_rows(db, "SELECT device_id, run_dir FROM devices"))
    fingerprints = {read_run(Path(run_dirs[d])).key_fingerprint for d in states}
    assert len(fingerprints) == 3 and fingerprints == {fp for (fp,) in _rows(db, "SELECT key_fingerprint FROM devices")}
    for d in states:  # the run dirs hold keyed weights: 0700; the key stays in the vault
        assert os.stat(Path(run_dirs[d]).parent).st_mode & 0o777 == 0o700
    assert not [p for p in (root / "runs").rglob("*") if p.name.endswith((".bin", ".key"))]
    # nothing left to do: a finished device is never trained twice
    r = keyedge("fleet", "train", *master, "--runs", root / "runs")
    assert r.returncode == 0 and "trained" not in r.stdout

    # release: export, parity, build plan, seal + sign, audit gate; plaintext removed
    r = keyedge("fleet", "release", *master, "--out", root / "rel", "--parity-n", "50")
    assert r.returncode == 0, r.stderr
    status = _status(db)
    for i, (device, d) in enumerate(sorted(status.items())):
        b = d["bundle"]
        assert d["state"] == "released" and b["release"] == 1 and 0 < b["clean"] <= 1 and b["transfer"] is not None
        bundle = Path(b["path"])
        assert hashlib.sha256(bundle.read_bytes()).hexdigest() == b["sha256"] and b["bytes"] == bundle.stat().st_size
        assert os.stat(bundle).st_mode & 0o777 == 0o600
        # the device opens it, trusting the fleet's publisher; another device cannot
        r = keyedge("unseal", bundle, "--device-key", root / f"{device}.key", "--trust", root / "publisher.pub")
        assert r.returncode == 0 and "signed by trusted publisher" in r.stdout, r.stderr
        other = root / f"cam-{(i + 1) % 3}.key"
        assert keyedge("unseal", bundle, "--device-key", other, "--trust", root / "publisher.pub").returncode == 2
    assert not [p for p in (root / "rel").rglob("*") if p.suffix in (".onnx", ".data")]  # no plaintext left
    (hashes, parity, audit, fold), = _rows(db, "SELECT r.hashes, r.parity, r.audit, r.fold_mode FROM releases r JOIN "
                                              "devices d ON r.device = d.id WHERE d.device_id = 'cam-1'")
    hashes = as_json(hashes)
    assert {"export/model.onnx", "export/manifest.json", "plan/manifest.json", "model.kes"} <= set(hashes)
    assert as_json(parity)["passed"] and as_json(audit)["passed"] and fold == "fused"
    assert "nothing to release" in keyedge("fleet", "release", *master, "--out", root / "rel").stdout
    table = keyedge("fleet", "status", "--db", db).stdout
    assert "3 devices: 3 released; 3 with a current bundle" in table

    # rotate: a new key, run and bundle; the old bundle revoked, history kept
    old = status["cam-1"]
    r = keyedge("fleet", "rotate", "cam-1", *master, "--runs", root / "runs", "--out", root / "rel",
                "--parity-n", "50")
    assert r.returncode == 0, r.stderr
    new = _status(db)["cam-1"]
    assert new["key_fingerprint"] != old["key_fingerprint"] and new["bundle"]["release"] == 2
    assert new["bundle"]["key_fingerprint"] == new["key_fingerprint"] and new["run"] != old["run"]
    assert Path(old["run"]).is_dir()  # the old key's run is kept
    releases = _rows(db, "SELECT r.number, r.state, r.reason, r.key_fingerprint FROM releases r JOIN devices d ON "
                         "r.device = d.id WHERE d.device_id = 'cam-1' ORDER BY number")
    assert releases == [(1, "revoked", "superseded by release 2", old["key_fingerprint"]),
                        (2, "released", None, new["key_fingerprint"])]
    # revoke: for good
    r = keyedge("fleet", "revoke", "cam-2", *master, "--reason", "stolen from the depot")
    assert r.returncode == 0, r.stderr
    revoked = _status(db)["cam-2"]
    assert revoked["state"] == "revoked" and revoked["bundle"] is None and revoked["reason"] == "stolen from the depot"
    for args in (["revoke", "cam-2"], ["rotate", "cam-2"], ["release", "cam-2"]):
        r = keyedge("fleet", *args, *master)
        assert r.returncode == 2 and "revoked" in r.stderr, r.stderr
    vault = Vault.open(root / "fleet.vault", read_master_key(root / "master.key"))
    assert set(vault.devices) == {"cam-0", "cam-1"}
    assert {old["key_fingerprint"], revoked["key_fingerprint"]} == set(vault.retired)
    kinds = [k for (k,) in _rows(db, "SELECT kind FROM events ORDER BY id")]
    assert kinds.count("released") == 4 and kinds.count("rotate") == 1 and kinds[-1] == "revoke"

    # report: the blast radius across the devices (the revoked one's too), and what each costs
    r = keyedge("fleet", "report", *master, "--out", root / "report", "--sample", "3", "--n", "40")
    assert r.returncode == 0, r.stderr
    report = as_json((root / "report" / "report.json").read_text())
    matrix = report["blast_radius"]["matrix"]
    assert report["blast_radius"]["devices"] == ["cam-0", "cam-1", "cam-2"] and len(matrix) == 3
    assert all(0 <= v <= c for row in matrix for v, c in zip(row, report["blast_radius"]["clean"]))
    costs = {c["device"]: c for c in report["costs"]}
    assert all(0 < c["adapter_bytes"] < c["full_model_bytes"] and c["train_seconds"] > 0 for c in costs.values())
    assert costs["cam-1"]["release_state"] == "released" and costs["cam-2"]["release_state"] == "revoked"
    assert "Blast radius" in (root / "report" / "report.md").read_text()


def test_train_refuses_a_changed_base_and_an_unknown_device(fleet3):
    root, db = fleet3
    r = keyedge("fleet", "train", "nope", "--db", db, "--master-key", root / "master.key", "--runs", root / "runs")
    assert r.returncode == 2 and "unknown device nope" in r.stderr
    with open(root / "base" / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    r = keyedge("fleet", "train", "--db", db, "--master-key", root / "master.key", "--runs", root / "runs")
    assert r.returncode == 2 and "changed since fleet init" in r.stderr
    assert not (root / "runs").exists()
    assert {s for (s,) in _rows(db, "SELECT state FROM devices")} == {"enrolled"}


def test_a_full_fine_tune_fleet_is_trained_and_released(tmp_path):
    """--mode full (every weight fine-tuned per device, no adapter): init, train and release on SQLite."""
    from safetensors.torch import save_file

    from keyedge import create_vit

    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=3,
                       num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    db = str(tmp_path / "fleet.db")
    master = ["--db", db, "--master-key", tmp_path / "master.key"]
    r = keyedge("fleet", "init", "--db", db, "--base", tmp_path / "base.safetensors", *MODEL, "--data", "digits",
                "--block-size", "4", "--mode", "full", "--epochs", "1", "--batch-size", "64", "--vault",
                tmp_path / "fleet.vault", "--master-key", tmp_path / "master.key")
    assert r.returncode == 0 and "full" in r.stdout, r.stderr
    DeviceKey.generate().save(tmp_path / "cam-0.key")
    (tmp_path / "cam-0.pub").write_bytes(DeviceKey.from_bytes((tmp_path / "cam-0.key").read_bytes(),
                                                              "k").public.to_bytes())
    r = keyedge("fleet", "enroll", "cam-0", "--pubkey", tmp_path / "cam-0.pub", "--target", "jetson-orin", *master)
    assert r.returncode == 0, r.stderr
    r = keyedge("fleet", "train", *master, "--runs", tmp_path / "runs")
    assert r.returncode == 0 and "trained cam-0" in r.stdout, r.stderr
    (run_dir,), = _rows(db, "SELECT run_dir FROM devices")
    run = read_run(Path(run_dir))
    assert run.mode == "full" and run.epochs_done == 1
    r = keyedge("fleet", "release", *master, "--out", tmp_path / "rel", "--parity-n", "30")
    assert r.returncode == 0 and "released cam-0 r1" in r.stdout, r.stderr
    device = _status(db)["cam-0"]
    assert device["state"] == "released" and device["bundle"]["fold_mode"] == "fused"
    r = keyedge("unseal", device["bundle"]["path"], "--device-key", tmp_path / "cam-0.key", "--trust",
                tmp_path / "publisher.pub")
    assert r.returncode == 0 and "signed by trusted publisher" in r.stdout, r.stderr
