"""``keyedge fleet train`` with real worker processes on one SQLite file: two workers split the work, one
is killed with SIGKILL while it trains, its lease expires and the other trains that device too; every
device ends trained exactly once, each with its own key."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyedge import create_vit
from keyedge.core.manifests import read_run
from keyedge.runtime.bundle import DeviceKey

from ..helpers import keyedge

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4", "--depth", "2",
         "--embed-dim", "48", "--heads", "3", "--num-classes", "10"]


def _base(path: Path) -> Path:
    from safetensors.torch import save_file

    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=3,
                       num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def fleet3(tmp_path):
    db = str(tmp_path / "fleet.db")
    r = keyedge("fleet", "init", "--db", db, "--base", _base(tmp_path / "base.safetensors"), *MODEL,
                "--data", "digits", "--block-size", "4", "--mode", "lora", "--epochs", "1", "--batch-size", "64",
                "--vault", tmp_path / "fleet.vault", "--master-key", tmp_path / "master.key")
    assert r.returncode == 0, r.stderr
    rows = ["device_id,pubkey,target"]
    for i in range(3):
        DeviceKey.generate().save(tmp_path / f"cam-{i}.key")
        (tmp_path / f"cam-{i}.pub").write_bytes(DeviceKey.from_bytes((tmp_path / f"cam-{i}.key").read_bytes(),
                                                                     "k").public.to_bytes())
        rows.append(f"cam-{i},cam-{i}.pub,jetson-orin")
    (tmp_path / "devices.csv").write_text("\n".join(rows) + "\n")
    r = keyedge("fleet", "enroll", "--from-csv", tmp_path / "devices.csv", "--db", db, "--master-key",
                tmp_path / "master.key")
    assert r.returncode == 0, r.stderr
    return tmp_path, db


def _worker(root: Path, db: str, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "keyedge.cli", "fleet", "train", "--db", db, "--master-key",
                             str(root / "master.key"), "--runs", str(root / "runs"), "--worker", name,
                             "--lease-seconds", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(db: str, sql: str) -> list:
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute(sql).fetchall()


def test_two_workers_one_killed_every_device_trained_exactly_once(fleet3):
    root, db = fleet3
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
    states = dict(_rows(db, "SELECT device_id, state FROM devices"))
    assert states == {"cam-0": "trained", "cam-1": "trained", "cam-2": "trained"}
    trained = _rows(db, "SELECT d.device_id, e.detail FROM events e JOIN devices d ON e.device = d.id "
                        "WHERE e.kind = 'trained'")
    assert sorted(d for d, _ in trained) == ["cam-0", "cam-1", "cam-2"]  # exactly once each
    assert all(json.loads(detail)["worker"] == "survivor" for _, detail in trained)
    claims = _rows(db, "SELECT d.device_id, e.detail FROM events e JOIN devices d ON e.device = d.id "
                       "WHERE e.kind = 'claim'")
    taken_over = [d for d, detail in claims if json.loads(detail)["previous_owner"] == "victim"]
    assert len(taken_over) == 1  # the lease expiry brought the killed worker's device back
    fingerprints = {r.key_fingerprint for r in (read_run(root / "runs" / d / "run") for d in states)}
    assert len(fingerprints) == 3 and fingerprints == {fp for (fp,) in _rows(db, "SELECT key_fingerprint FROM devices")}
    for d in states:  # the run dirs hold keyed weights: 0700, keys 0600
        assert os.stat(root / "runs" / d).st_mode & 0o777 == 0o700
        assert os.stat(root / "runs" / d / "key.bin").st_mode & 0o777 == 0o600
    # nothing left to do: a finished device is never trained twice
    r = keyedge("fleet", "train", "--db", db, "--master-key", root / "master.key", "--runs", root / "runs")
    assert r.returncode == 0 and "trained" not in r.stdout


def test_train_refuses_a_changed_base_and_an_unknown_device(fleet3):
    root, db = fleet3
    r = keyedge("fleet", "train", "nope", "--db", db, "--master-key", root / "master.key", "--runs", root / "runs")
    assert r.returncode == 2 and "unknown device nope" in r.stderr
    with open(root / "base.safetensors", "ab") as fh:
        fh.write(b"\0")
    r = keyedge("fleet", "train", "--db", db, "--master-key", root / "master.key", "--runs", root / "runs")
    assert r.returncode == 2 and "changed since fleet init" in r.stderr
    assert not (root / "runs").exists()
    assert {s for (s,) in _rows(db, "SELECT state FROM devices")} == {"enrolled"}
