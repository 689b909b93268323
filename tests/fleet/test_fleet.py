"""``keyedge fleet`` init, upgrade, enroll and status on a real SQLite file and a real PostgreSQL server:
all-or-nothing enrollment, nothing secret in the database, the vault only under its master key, and every
bad input refused with the database and the vault as they were."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from keyedge import Key
from keyedge.core.progress import quiet
from keyedge.fleet.vault import Vault, read_master_key
from keyedge.runtime.bundle import DeviceKey

from ..helpers import keyedge
from .conftest import state


def _ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _init(root: Path, db: str) -> list:
    (root / "base.safetensors").write_bytes(os.urandom(256))  # pinned by hash; not loaded until training
    _ok(keyedge("fleet", "init", "--db", db, "--base", root / "base.safetensors", "--model", "vit_tiny_patch16_224",
                "--data", "digits", "--block-size", "4", "--img-size", "16", "--patch-size", "4",
                "--vault", root / "fleet.vault", "--master-key", root / "master.key"))
    return ["--db", db, "--master-key", root / "master.key"]


def _devices(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        key = DeviceKey.generate()
        (root / f"dev{i}.pub").write_bytes(key.public.to_bytes())
        paths.append(root / f"dev{i}.pub")
    return paths


def _flow(root: Path, db: str) -> None:
    opts = _init(root, db)
    pubs = _devices(root, 4)
    _ok(keyedge("fleet", "enroll", "cam-0", "--pubkey", pubs[0], "--target", "jetson-orin", *opts))
    (root / "devices.csv").write_text("device_id,pubkey,target\n"
                                      f"cam-1,{pubs[1].name},jetson-orin-nano\ncam-2,{pubs[2].name},desktop\n")
    _ok(keyedge("fleet", "enroll", "--from-csv", root / "devices.csv", *opts))
    report = json.loads(_ok(keyedge("fleet", "status", "--db", db, "--json")).stdout)
    assert [d["device"] for d in report["devices"]] == ["cam-0", "cam-1", "cam-2"]
    assert report["counts"] == {"enrolled": 3} and report["fleet"]["block_size"] == 4
    table = _ok(keyedge("fleet", "status", "--db", db)).stdout
    assert "cam-2" in table and "3 devices: 3 enrolled" in table
    vault = Vault.open(root / "fleet.vault", read_master_key(root / "master.key"))
    keys = {d: Key.from_bytes(k) for d, k in vault.devices.items()}
    assert sorted(keys) == ["cam-0", "cam-1", "cam-2"]
    assert {d["device"]: d["key_fingerprint"] for d in report["devices"]} == {d: k.fingerprint for d, k in keys.items()}
    assert len({k.fingerprint for k in keys.values()}) == 3 and not any(k.insecure for k in keys.values())


def test_a_fleet_on_sqlite(tmp_path):
    db = str(tmp_path / "fleet.db")
    _flow(tmp_path, db)
    assert oct(os.stat(tmp_path / "fleet.vault").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "master.key").st_mode & 0o777) == "0o600"
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0005"
        kinds = [k for (k,) in c.execute("SELECT kind FROM events ORDER BY id")]
    assert kinds == ["init", "enroll", "enroll", "enroll"]
    # nothing secret in the database: no key's permutation, no key file, no vault secret, no master key
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("fleet.db*"))
    vault = Vault.open(tmp_path / "fleet.vault", read_master_key(tmp_path / "master.key"))
    for raw in vault.devices.values():
        perm = Key.from_bytes(raw).perm
        assert perm.astype("<u4").tobytes() not in stored and raw[36:68] not in stored
    assert vault.publisher not in stored and (tmp_path / "master.key").read_bytes()[11:] not in stored


_state = state


@pytest.fixture
def fleet(tmp_path, database):
    db = database
    opts = _init(tmp_path, db)
    pubs = _devices(tmp_path, 3)
    _ok(keyedge("fleet", "enroll", "cam-0", "--pubkey", pubs[0], "--target", "desktop", *opts))
    DeviceKey.generate().save(tmp_path / "private.key")
    (tmp_path / "junk.pub").write_bytes(os.urandom(43))
    (tmp_path / "other.master").write_bytes((tmp_path / "master.key").read_bytes()[:11] + os.urandom(32))
    csv = "device_id,pubkey,target\n"
    (tmp_path / "one_bad_row.csv").write_text(csv + f"cam-1,{pubs[1].name},desktop\ncam-2,junk.pub,desktop\n")
    (tmp_path / "bad_target.csv").write_text(csv + f"cam-1,{pubs[1].name},desktop\ncam-2,{pubs[2].name},gameboy\n")
    (tmp_path / "twice.csv").write_text(csv + f"cam-1,{pubs[1].name},desktop\ncam-1,{pubs[2].name},desktop\n")
    (tmp_path / "columns.csv").write_text("id,key\ncam-1,x\n")
    return tmp_path, db, opts, pubs


BAD = {
    "unknown target": (["enroll", "cam-1", "--pubkey", "P1", "--target", "gameboy"], "unknown target"),
    "not a public key": (["enroll", "cam-1", "--pubkey", "T/junk.pub", "--target", "desktop"], "not a keyedge device"),
    "a private key": (["enroll", "cam-1", "--pubkey", "T/private.key", "--target", "desktop"], "private key, not a public"),
    "enrolled twice": (["enroll", "cam-0", "--pubkey", "P1", "--target", "desktop"], "enrolled already"),
    "its public key twice": (["enroll", "cam-9", "--pubkey", "P0", "--target", "desktop"], "enrolled already"),
    "bad device id": (["enroll", "../cam", "--pubkey", "P1", "--target", "desktop"], "device id"),
    "no pubkey": (["enroll", "cam-1", "--target", "desktop"], "--pubkey"),
    "csv with one bad row": (["enroll", "--from-csv", "T/one_bad_row.csv"], "row 2"),
    "csv with a bad target": (["enroll", "--from-csv", "T/bad_target.csv"], "unknown target"),
    "csv naming a device twice": (["enroll", "--from-csv", "T/twice.csv"], "twice"),
    "csv columns": (["enroll", "--from-csv", "T/columns.csv"], "device_id,pubkey,target"),
    "csv missing": (["enroll", "--from-csv", "T/nope.csv"], "does not exist"),
    "wrong master key": (["enroll", "cam-1", "--pubkey", "P1", "--target", "desktop", "--master-key", "T/other.master"],
                         "another master key"),
    "not a master key": (["enroll", "cam-1", "--pubkey", "P1", "--target", "desktop", "--master-key", "T/junk.pub"],
                         "not a keyedge master key"),
    "release of an untrained device": (["release", "cam-0", "--out", "T/rel"], "only a trained device is released"),
    "release of an unknown device": (["release", "cam-9", "--out", "T/rel"], "unknown device cam-9"),
    "release with the wrong master key": (["release", "--out", "T/rel", "--master-key", "T/other.master"],
                                          "another master key"),
    "release into a file": (["release", "--out", "T/junk.pub"], "not a directory"),
    "rotate of an unknown device": (["rotate", "cam-9", "--runs", "T/runs", "--out", "T/rel"], "unknown device cam-9"),
    "rotate with the wrong master key": (["rotate", "cam-0", "--runs", "T/runs", "--out", "T/rel", "--master-key",
                                          "T/other.master"], "another master key"),
    "rotate reading the master key from stdin": (["rotate", "cam-0", "--master-key", "-"], "three times"),
    "train into runs under a file": (["train", "--runs", "T/junk.pub/runs"], "is not a directory"),
    "rotate into runs under a file": (["rotate", "cam-0", "--runs", "T/junk.pub/runs", "--out", "T/rel"],
                                      "is not a directory"),
    "rotate into an out under a file": (["rotate", "cam-0", "--runs", "T/runs", "--out", "T/junk.pub/rel"],
                                        "is not a directory"),
    "a wave of 0": (["release", "--wave", "0", "--out", "T/rel"], "more than 0"),
    "a wave over 100%": (["release", "--wave", "150%", "--out", "T/rel"], "at most 100%"),
    "a wave that is no size": (["release", "--wave", "half", "--out", "T/rel"], "a percentage"),
    "a wave of nan%": (["release", "--wave", "nan%", "--out", "T/rel"], "more than 0"),
    "an abort fraction without a wave": (["release", "--abort-above", "0.2", "--out", "T/rel"], "--wave"),
    "a wave with named devices": (["release", "cam-0", "--wave", "1", "--out", "T/rel"], "name no devices"),
    "an abort fraction of 1": (["release", "--wave", "1", "--abort-above", "1", "--out", "T/rel"], "fraction"),
    "revoke of an unknown device": (["revoke", "cam-9"], "unknown device cam-9"),
    "revoke with the wrong master key": (["revoke", "cam-0", "--master-key", "T/other.master"], "another master key"),
    "report of a fleet with no trained device": (["report", "--out", "T/rep"], "needs two"),
    "report of one device": (["report", "--out", "T/rep", "--sample", "1"], "--sample"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_leaves_the_database_and_the_vault_as_they_were(fleet, case):
    root, db, opts, pubs = fleet
    args, needle = BAD[case]
    args = [str(pubs[int(a[1])]) if a in ("P0", "P1") else a.replace("T/", f"{root}/") for a in args]
    if "--master-key" not in args:
        args += ["--master-key", str(root / "master.key")]
    before, files = _state(root, db), sorted(root.rglob("*"))
    r = keyedge("fleet", *args, "--db", db)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert _state(root, db) == before and sorted(root.rglob("*")) == files


def test_a_tampered_vault_and_a_newer_schema_are_refused(fleet):
    from keyedge.fleet import db as fleet_db

    root, db, opts, pubs = fleet
    data = bytearray((root / "fleet.vault").read_bytes())
    data[-5] ^= 1
    (root / "fleet.vault").write_bytes(bytes(data))
    before = _state(root, db)
    r = keyedge("fleet", "enroll", "cam-1", "--pubkey", pubs[1], "--target", "desktop", *opts)
    assert r.returncode == 2 and "tampered" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _state(root, db) == before
    with fleet_db.engine_for(db).begin() as c:
        c.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff'")
    before = _state(root, db)
    for args in (["status", "--db", db], ["upgrade", "--db", db], ["enroll", "cam-1", "--pubkey", pubs[1],
                                                                   "--target", "desktop", *opts]):
        r = keyedge("fleet", *args)
        assert r.returncode == 2 and "newer than this keyedge knows" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert _state(root, db) == before  # nothing migrated, enrolled or rewritten


def test_status_says_why_a_device_was_revoked_before_any_release(fleet):
    root, db, opts, pubs = fleet
    _ok(keyedge("fleet", "revoke", "cam-0", "--reason", "lost in transit", *opts))
    device, = json.loads(_ok(keyedge("fleet", "status", "--db", db, "--json")).stdout)["devices"]
    assert device["state"] == "revoked" and device["releases"] == 0 and device["reason"] == "lost in transit"
    assert "lost in transit" in _ok(keyedge("fleet", "status", "--db", db)).stdout


def test_init_refuses_before_writing_anything(tmp_path):
    (tmp_path / "base.safetensors").write_bytes(b"x")
    base = ["fleet", "init", "--db", tmp_path / "f.db", "--base", tmp_path / "base.safetensors", "--vault",
            tmp_path / "v", "--master-key", tmp_path / "m.key"]
    for extra, needle in ((["--block-size", "2"], "2^128"), (["--block-size", "4", "--data", "nope"], "nope"),
                          (["--block-size", "4", "--mode", "half"], "--mode")):
        r = keyedge(*base, *extra)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
    r = keyedge(*[a if a != tmp_path / "base.safetensors" else tmp_path / "none" for a in base], "--block-size", "4")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]
    _ok(keyedge(*base, "--block-size", "4"))
    r = keyedge(*base, "--block-size", "4")
    assert r.returncode == 2 and "exists" in r.stderr


def test_an_unmigrated_database_is_upgraded_by_alembic(tmp_path):
    db = str(tmp_path / "old.db")
    sqlite3.connect(db).close()  # a database of no schema yet
    r = keyedge("fleet", "status", "--db", db)
    assert r.returncode == 2 and "keyedge fleet upgrade" in r.stderr
    assert "schema none -> 0005" in _ok(keyedge("fleet", "upgrade", "--db", db)).stdout
    assert "up to date" in _ok(keyedge("fleet", "upgrade", "--db", db)).stdout


def test_a_fleet_of_an_older_schema_keeps_its_devices_through_the_migration(tmp_path):
    """Revision 0001 (before training leases) with a device in it, upgraded by Alembic to the head."""
    from alembic import command

    from keyedge.fleet import db as fleet_db

    path = str(tmp_path / "fleet.db")
    engine = fleet_db.engine_for(path, must_exist=False)
    with engine.begin() as conn:
        command.upgrade(fleet_db._config(conn), "0001")
        conn.exec_driver_sql("INSERT INTO devices (device_id, target, device_public, device_fingerprint, "
                             "key_fingerprint, state, enrolled_at, updated_at) VALUES ('cam-0', 'desktop', x'00', "
                             "'ab', 'cd', 'enrolled', '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    engine.dispose()
    assert "schema 0001 -> 0005" in _ok(keyedge("fleet", "upgrade", "--db", path)).stdout
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT device_id, state, attempts, lease_owner FROM devices").fetchall() == [
            ("cam-0", "enrolled", 0, None)]


def test_the_migrations_make_the_schema_keyedge_uses(database):
    """Alembic's own comparison of the migrated database with schema.py, on SQLite and on PostgreSQL: no
    table, column, type, nullability or constraint differs."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from keyedge.fleet import db as fleet_db
    from keyedge.fleet.schema import metadata

    engine = fleet_db.engine_for(database, must_exist=False)
    try:
        with engine.begin() as conn:
            fleet_db.upgrade(conn)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
            assert fleet_db.current_revision(conn) == fleet_db.head_revision()
    finally:
        fleet_db.forget(database)
    assert diff == []


def test_the_same_fleet_on_postgresql(tmp_path, postgres):
    from keyedge.fleet.leases import claim, leased_elsewhere

    _flow(tmp_path, postgres)
    # training claims: FOR UPDATE SKIP LOCKED, one device per worker, none twice while leased
    taken = [claim(postgres, w, 60)["device_id"] for w in ("a", "b", "c")]
    assert sorted(taken) == ["cam-0", "cam-1", "cam-2"]
    assert claim(postgres, "d", 60) is None and leased_elsewhere(postgres)
    r = keyedge("fleet", "enroll", "cam-0", "--pubkey", tmp_path / "dev3.pub", "--target", "desktop", "--db",
                postgres, "--master-key", tmp_path / "master.key")
    assert r.returncode == 2 and "enrolled already" in r.stderr
    assert "up to date" in _ok(keyedge("fleet", "upgrade", "--db", postgres)).stdout
    # two enrollments at once: the fleet row's lock serializes their vault writes, neither key is lost
    import threading

    from keyedge.core.progress import quiet
    from keyedge.fleet import commands

    pubs = [tmp_path / f"par{i}.pub" for i in range(2)]
    for path in pubs:
        path.write_bytes(DeviceKey.generate().public.to_bytes())
    errors: list[BaseException] = []

    def enroll(i: int) -> None:
        try:
            commands.enroll(postgres, [commands.Enrollment(f"par-{i}", pubs[i], "desktop")],
                            commands.MasterKey(tmp_path / "master.key"), echo=quiet)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    vault = Vault.open(tmp_path / "fleet.vault", read_master_key(tmp_path / "master.key"))
    assert {"par-0", "par-1"} <= set(vault.devices)


@pytest.mark.parametrize("step", ["vault write", "commit"])
def test_a_failure_at_any_step_of_enroll_leaves_both_as_they_were(fleet, monkeypatch, step):
    import sqlalchemy as sa

    from keyedge.fleet import commands
    from keyedge.fleet.vault import Vault as V

    root, db, opts, pubs = fleet
    before = _state(root, db)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if step == "vault write":
        monkeypatch.setattr(V, "save", boom)
    else:
        monkeypatch.setattr(sa.engine.Connection, "commit", boom)
    with pytest.raises(OSError):
        commands.enroll(db, [commands.Enrollment("cam-1", pubs[1], "desktop")],
                        commands.MasterKey(root / "master.key"))
    monkeypatch.undo()
    assert _state(root, db) == before


def test_release_mode_fused_where_the_key_cannot_fold_is_refused_before_any_claim(tmp_path):
    (tmp_path / "base.safetensors").write_bytes(os.urandom(256))
    db = str(tmp_path / "fleet.db")
    _ok(keyedge("fleet", "init", "--db", db, "--base", tmp_path / "base.safetensors", "--model", "vit_tiny_patch16_224",
                "--data", "digits", "--block-size", "8", "--img-size", "16", "--patch-size", "4",
                "--vault", tmp_path / "fleet.vault", "--master-key", tmp_path / "master.key"))
    before = _state(tmp_path, db)
    r = keyedge("fleet", "release", "--mode", "fused", "--db", db, "--master-key", tmp_path / "master.key",
                "--out", tmp_path / "rel")
    assert r.returncode == 2 and "cannot be folded" in r.stderr and _state(tmp_path, db) == before
    assert not (tmp_path / "rel").exists()


@pytest.mark.parametrize("url", ["postgresql+psycopg://keyedge@/postgres?host=/nonexistent&port=1",
                                 "postgresql+psycopg://nobody:wrong@127.0.0.1:1/fleet"])
def test_a_postgresql_server_that_cannot_be_reached_is_one_line(url):
    pytest.importorskip("psycopg")
    for args in (["status"], ["upgrade"], ["export", "--to", "/nonexistent-parent/x"]):
        r = keyedge("fleet", *args, "--db", url)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and "wrong" not in r.stderr  # the password is never shown


def test_a_refused_password_is_one_line_at_once_and_never_shown(pg_cluster):
    """The session's server asks PASSWORD_ROLE for its password (scram-sha-256 on the unix socket)."""
    import time

    from .conftest import PASSWORD, PASSWORD_ROLE

    wrong = "WRONG-pw-7f3a"
    for args in (["status"], ["upgrade"], ["status", "--json"]):
        t0 = time.monotonic()
        r = keyedge("fleet", *args, "--db", pg_cluster.url("postgres", PASSWORD_ROLE, wrong))
        took = time.monotonic() - t0
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "password authentication failed" in lines[0] and PASSWORD_ROLE in lines[0], r.stderr
        assert wrong not in r.stderr + r.stdout and took < 5  # not waited on as a restarting server is
    # the right password gets past the server's check (to a database that holds no fleet yet)
    r = keyedge("fleet", "status", "--db", pg_cluster.url("postgres", PASSWORD_ROLE, PASSWORD))
    assert r.returncode == 2 and "keyedge fleet upgrade" in r.stderr and "authentication" not in r.stderr
    assert PASSWORD not in r.stderr


@pytest.mark.parametrize("step", ["publisher key write", "migration", "commit"])
@pytest.mark.parametrize("master_exists", [False, True])
def test_init_failing_after_the_vault_is_written_leaves_nothing_behind(tmp_path, database, monkeypatch, step,
                                                                        master_exists):
    """No database (no tables on PostgreSQL), no vault, no publisher key, and no master key it created (one
    that was there stays as it was)."""
    import sqlalchemy as sa

    from keyedge.fleet import commands
    from keyedge.fleet import db as fleet_db
    from keyedge.fleet.vault import new_master_key

    (tmp_path / "base.safetensors").write_bytes(os.urandom(256))
    if master_exists:
        new_master_key(tmp_path / "master.key")
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    target = {"publisher key write": (commands, "atomic_write_bytes"), "migration": (fleet_db, "upgrade"),
              "commit": (sa.engine.Connection, "commit")}[step]
    monkeypatch.setattr(*target, boom)
    with pytest.raises(OSError):
        commands.init(database, commands.FleetSpec(tmp_path / "base.safetensors", "vit_tiny_patch16_224", {},
                                                   "digits", 4), tmp_path / "fleet.vault",
                      commands.MasterKey(tmp_path / "master.key"), echo=quiet)
    monkeypatch.undo()
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before
    if "://" in database:
        with fleet_db.engine_for(database).connect() as c:
            assert sa.inspect(c).get_table_names() == []
    # and the same fleet is created afterwards as if nothing happened
    commands.init(database, commands.FleetSpec(tmp_path / "base.safetensors", "vit_tiny_patch16_224", {},
                                               "digits", 4), tmp_path / "fleet.vault",
                  commands.MasterKey(tmp_path / "master.key"), echo=quiet)
