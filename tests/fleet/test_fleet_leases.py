"""Leases against real databases: a running wave holds a lease of its own (a wave between two devices is not
taken over; one whose lease expired is, and its worker then overwrites nothing); leases on PostgreSQL run
on the server's clock (a worker whose own clock runs ahead takes no live lease); a server restarted inside
a claim's transaction (the claim is made again: no device lost, none claimed twice)."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest

from keyedge.core.errors import KeyedgeError
from keyedge.core.progress import quiet
from keyedge.fleet import commands, leases
from keyedge.fleet.release import Wave, WaveLease, _count_in_wave, _start_wave
from keyedge.runtime.bundle import DeviceKey

from .conftest import as_json, rows


def _fleet(root: Path, db: str, n: int = 2) -> None:
    """A fleet of ``n`` enrolled devices (a random base, pinned by hash; nothing here trains)."""
    (root / "base.safetensors").write_bytes(os.urandom(256))
    master = commands.MasterKey(root / "master.key")
    commands.init(db, commands.FleetSpec(root / "base.safetensors", "vit_tiny_patch16_224",
                                         {"img_size": 16, "patch_size": 4}, "digits", 4),
                  root / "fleet.vault", master, echo=quiet)
    enrollments = []
    for i in range(n):
        (root / f"cam-{i}.pub").write_bytes(DeviceKey.generate().public.to_bytes())
        enrollments.append(commands.Enrollment(f"cam-{i}", root / f"cam-{i}.pub", "desktop"))
    commands.enroll(db, enrollments, master, echo=quiet)


def _trained(db: str) -> None:
    """Every device waits for release (what training leaves; the wave's bookkeeping needs no model)."""
    from keyedge.fleet import db as fleet_db

    with fleet_db.engine_for(db).begin() as c:
        c.exec_driver_sql("UPDATE devices SET state = 'trained'")


def _wave_state(db: str, wave_id: int) -> str:
    (state,), = rows(db, f"SELECT state FROM waves WHERE id = {int(wave_id)}")
    return state


def test_a_wave_between_two_devices_is_not_taken_over_and_one_whose_lease_expired_is(tmp_path, database):
    db = database
    _fleet(tmp_path, db)
    _trained(db)
    first, _, _ = _start_wave(db, Wave("1"), "first", 1.5)
    keeper = WaveLease(db, first, "first", 1.5)
    keeper.start()
    try:
        time.sleep(3.5)  # more than twice the lease; "first" holds no device lease (between two devices)
        with pytest.raises(KeyedgeError, match="wave 1 is running"):
            _start_wave(db, Wave("1"), "second", 60)
        assert _wave_state(db, first) == "running" and not keeper.lost
    finally:
        keeper.stop.set()
        keeper.join()
    # its lease expired but its worker holds a device: still alive
    assert leases.claim(db, "first", 60, ["cam-0"], leases.RELEASE) is not None
    time.sleep(1.7)
    with pytest.raises(KeyedgeError, match="wave 1 is running"):
        _start_wave(db, Wave("1"), "second", 60)
    # its lease expired and its worker holds nothing: dead, marked interrupted, the new wave starts
    leases.give_back(db, rows(db, "SELECT id FROM devices WHERE device_id = 'cam-0'")[0][0], "first", "trained")
    second, number, _ = _start_wave(db, Wave("1"), "second", 60)
    assert number == 2 and _wave_state(db, first) == "interrupted" and _wave_state(db, second) == "running"
    # the first wave's worker, back late, overwrites nothing: its renewal fails, its end leaves the state
    keeper = WaveLease(db, first, "first", 0.3)
    keeper.start()
    keeper.join(timeout=5)
    assert keeper.lost
    assert _count_in_wave(db, first, state="completed", worker="first")["state"] == "interrupted"
    assert _count_in_wave(db, second, state="completed", worker="first")["state"] == "running"  # not its wave
    assert _count_in_wave(db, second, state="completed", worker="second")["state"] == "completed"


def test_a_worker_whose_clock_runs_ahead_takes_no_live_lease_on_postgresql(tmp_path, postgres, monkeypatch):
    _fleet(tmp_path, postgres)
    held = leases.claim(postgres, "on-time", 60, ["cam-0"])
    assert held is not None and held["device_id"] == "cam-0"
    (expires, server_now), = rows(postgres, "SELECT lease_expires, clock_timestamp() FROM devices "
                                            "WHERE device_id = 'cam-0'")
    assert dt.timedelta(seconds=55) < expires - server_now <= dt.timedelta(seconds=60)  # the server's clock
    real = leases.now
    monkeypatch.setattr(leases, "now", lambda: real() + dt.timedelta(hours=1))  # this worker's clock: 1 h ahead
    assert leases.claim(postgres, "ahead", 60, ["cam-0"]) is None
    assert leases.holders(postgres) == {"cam-0": "on-time"}
    taken = leases.claim(postgres, "ahead", 60)  # the free device, leased on the server's clock
    assert taken is not None and taken["device_id"] == "cam-1"
    (expires, server_now), = rows(postgres, "SELECT lease_expires, clock_timestamp() FROM devices "
                                            "WHERE device_id = 'cam-1'")
    assert expires - server_now <= dt.timedelta(seconds=60)  # not an hour later
    assert leases.renew(postgres, taken["id"], "ahead", 60)
    (expires, server_now), = rows(postgres, "SELECT lease_expires, clock_timestamp() FROM devices "
                                            "WHERE device_id = 'cam-1'")
    assert expires - server_now <= dt.timedelta(seconds=60)


def test_a_server_restart_inside_a_claim_transaction_makes_the_claim_again(tmp_path, postgres):
    import sqlalchemy as sa

    from keyedge.fleet import db as fleet_db

    _fleet(tmp_path, postgres, 3)
    engine = fleet_db.engine_for(postgres)
    restarts = []

    def restart_inside_the_claim(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE DEVICES") and not restarts:
            restarts.append(statement)
            postgres.restart()  # the device row is locked FOR UPDATE by this transaction, not yet updated

    sa.event.listen(engine, "before_cursor_execute", restart_inside_the_claim)
    try:
        t0 = time.monotonic()
        taken = leases.claim(postgres, "w", 60)
        took = time.monotonic() - t0
    finally:
        sa.event.remove(engine, "before_cursor_execute", restart_inside_the_claim)
    assert restarts and taken is not None and taken["device_id"] == "cam-0" and took < 30
    assert rows(postgres, "SELECT device_id, state, lease_owner, attempts FROM devices ORDER BY id") == [
        ("cam-0", "training", "w", 1), ("cam-1", "enrolled", None, 0), ("cam-2", "enrolled", None, 0)]
    claims = rows(postgres, "SELECT detail FROM events WHERE kind = 'claim'")
    assert [as_json(d)["worker"] for (d,) in claims] == ["w"]  # the rolled-back claim left nothing
    # the rest of the fleet is claimed as if nothing happened, each device once
    assert [leases.claim(postgres, "w", 60)["device_id"] for _ in range(2)] == ["cam-1", "cam-2"]
    assert leases.claim(postgres, "w", 60) is None
