"""``fleet train`` under torchrun on a real PostgreSQL server: two CPU ranks, each claiming devices of its own
(no rendezvous between devices), one rank killed with SIGKILL while it trains; torchrun restarts the
group, the killed rank's lease expires and the device is trained by a rank of the new group; every device
ends trained exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import sqlalchemy as sa

from keyedge.runtime.bundle import DeviceKey

from ..helpers import keyedge
from .test_fleet_train import MODEL


def _rows(url: str, sql: str) -> list:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return c.execute(sa.text(sql)).all()
    finally:
        engine.dispose()


def test_torchrun_ranks_split_the_fleet_and_a_killed_rank_s_device_is_trained_once(tmp_path, postgres):
    from safetensors.torch import save_file

    from keyedge import create_vit

    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=3,
                       num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    r = keyedge("fleet", "init", "--db", postgres, "--base", tmp_path / "base.safetensors", *MODEL, "--data",
                "digits", "--block-size", "4", "--epochs", "3", "--batch-size", "64", "--vault",
                tmp_path / "fleet.vault", "--master-key", tmp_path / "master.key")
    assert r.returncode == 0, r.stderr
    rows = ["device_id,pubkey,target"]
    for i in range(4):
        (tmp_path / f"cam-{i}.pub").write_bytes(DeviceKey.generate().public.to_bytes())
        rows.append(f"cam-{i},cam-{i}.pub,jetson-orin")
    (tmp_path / "devices.csv").write_text("\n".join(rows) + "\n")
    assert keyedge("fleet", "enroll", "--from-csv", tmp_path / "devices.csv", "--db", postgres, "--master-key",
                   tmp_path / "master.key").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
         "1", "-m", "keyedge.cli", "fleet", "train", "--db", postgres, "--master-key", str(tmp_path / "master.key"),
         "--runs", str(tmp_path / "runs"), "--lease-seconds", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while True:
        held = _rows(postgres, "SELECT lease_owner FROM devices WHERE state = 'training' AND lease_owner LIKE '%/rank%'")
        if held:
            break
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.1)
    victim = held[0][0]
    assert {owner.rsplit("/", 1)[1] for (owner,) in held} <= {"rank0", "rank1"}
    os.kill(int(victim.split(":")[-1].split("/")[0]), signal.SIGKILL)  # a rank, mid-training
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    states = dict(_rows(postgres, "SELECT device_id, state FROM devices"))
    assert states == {f"cam-{i}": "trained" for i in range(4)}
    trained = _rows(postgres, "SELECT d.device_id FROM events e JOIN devices d ON e.device = d.id "
                              "WHERE e.kind = 'trained'")
    assert sorted(d for (d,) in trained) == sorted(states)  # exactly once each
    claims = _rows(postgres, "SELECT e.detail FROM events e WHERE e.kind = 'claim'")
    import json

    owners = {json.loads(d)["worker"] if isinstance(d, str) else d["worker"] for (d,) in claims}
    assert victim in owners and len({o.rsplit("/", 1)[1] for o in owners}) == 2  # both ranks claimed devices
