"""Faults while the fleet works: the PostgreSQL server restarted while a worker trains (the worker waits for
it and goes on; no device lost or trained twice), and the disk filling up during a release (one line,
nothing half-written, the device still trained)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyedge.runtime.bundle import DeviceKey

from ..helpers import keyedge
from .conftest import rows
from .test_fleet_train import MODEL


def _fleet(root: Path, db: str, n: int, epochs: int = 3) -> list:
    from safetensors.torch import save_file

    from keyedge import create_vit

    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=3,
                       num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "base.safetensors"))
    r = keyedge("fleet", "init", "--db", db, "--base", root / "base.safetensors", *MODEL, "--data", "digits",
                "--block-size", "4", "--epochs", str(epochs), "--batch-size", "64", "--vault", root / "fleet.vault",
                "--master-key", root / "master.key")
    assert r.returncode == 0, r.stderr
    lines = ["device_id,pubkey,target"]
    for i in range(n):
        (root / f"cam-{i}.pub").write_bytes(DeviceKey.generate().public.to_bytes())
        lines.append(f"cam-{i},cam-{i}.pub,jetson-orin")
    (root / "devices.csv").write_text("\n".join(lines) + "\n")
    assert keyedge("fleet", "enroll", "--from-csv", root / "devices.csv", "--db", db, "--master-key",
                   root / "master.key").returncode == 0
    return ["--db", db, "--master-key", str(root / "master.key")]


def _restart_while(postgres, tmp_path, opts: list, command: list, working: str) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "keyedge.cli", "fleet", *command, *opts, "--lease-seconds", "6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not rows(postgres, f"SELECT 1 FROM devices WHERE state = '{working}'"):
        assert time.monotonic() < deadline and worker.poll() is None, worker.communicate()
        time.sleep(0.1)
    postgres.restart()  # every connection the worker holds is cut
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-2000:]


def test_a_postgresql_restart_while_training_and_releasing_loses_no_device_and_does_none_twice(tmp_path, postgres):
    opts = _fleet(tmp_path, postgres, 3)
    _restart_while(postgres, tmp_path, opts, ["train", "--runs", str(tmp_path / "runs")], "training")
    assert dict(rows(postgres, "SELECT device_id, state FROM devices")) == {f"cam-{i}": "trained" for i in range(3)}
    trained = rows(postgres, "SELECT d.device_id FROM events e JOIN devices d ON e.device = d.id "
                             "WHERE e.kind = 'trained'")
    assert sorted(d for (d,) in trained) == ["cam-0", "cam-1", "cam-2"]
    _restart_while(postgres, tmp_path, opts, ["release", "--out", str(tmp_path / "rel"), "--parity-n", "20"],
                   "releasing")
    assert {s for (s,) in rows(postgres, "SELECT state FROM devices")} == {"released"}
    assert sorted(d for (d,) in rows(postgres, "SELECT d.device_id FROM releases r JOIN devices d ON "
                                               "r.device = d.id")) == ["cam-0", "cam-1", "cam-2"]


def test_a_full_disk_during_release_is_one_line_and_leaves_the_device_trained(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let the tests mount a tmpfs")
    try:
        db = str(tmp_path / "fleet.db")
        opts = _fleet(tmp_path, db, 1, epochs=1)
        assert keyedge("fleet", "train", *opts, "--runs", tmp_path / "runs").returncode == 0
        r = keyedge("fleet", "release", *opts, "--out", disk / "rel", "--parity-n", "20")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "No space left on device" in r.stderr
        assert rows(db, "SELECT state, lease_owner FROM devices") == [("trained", None)]
        assert rows(db, "SELECT count(*) FROM releases") == [(0,)]
        left = [p for p in (disk / "rel").rglob("*") if p.is_file()]
        assert left == []  # nothing half-written: the staging directory is gone
        r = keyedge("fleet", "release", *opts, "--out", tmp_path / "rel", "--parity-n", "20")
        assert r.returncode == 0, r.stderr  # the device is released elsewhere as if nothing happened
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
