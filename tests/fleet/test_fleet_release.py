"""``keyedge fleet release`` when a step fails: a device whose parity or audit fails is not released (no
bundle, no plaintext left) and its status says why; a failed device is tried again only when named; a
killed releaser's device is taken over once its lease expires; ``rotate`` and ``revoke`` that fail at the
vault write or the commit leave the database and the vault as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keyedge.core.progress import quiet
from keyedge.fleet import commands
from keyedge.fleet.leases import RELEASE, claim
from keyedge.fleet.release import ReleaseOptions, release_devices
from keyedge.fleet.training import train_devices
from keyedge.fleet.vault import read_master_key
from keyedge.runtime.bundle import DeviceKey

from ..helpers import keyedge
from .conftest import as_json, rows
from .conftest import state as _state
from .test_fleet_train import MODEL

OPTS = ReleaseOptions(parity_n=30)


@pytest.fixture
def trained(enrolled):
    """Two devices trained (in this process) from a random-init base: enough for every release step."""
    tmp_path, db, master = enrolled
    train_devices(db, master, tmp_path / "runs", echo=quiet)
    return tmp_path, db, master


@pytest.fixture
def enrolled(tmp_path, database):
    """Two devices enrolled in a fleet of a random-init base."""
    from safetensors.torch import save_file

    from keyedge import create_vit

    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=3,
                       num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    db = database
    r = keyedge("fleet", "init", "--db", db, "--base", tmp_path / "base.safetensors", *MODEL, "--data", "digits",
                "--block-size", "4", "--epochs", "1", "--vault", tmp_path / "fleet.vault", "--master-key",
                tmp_path / "master.key")
    assert r.returncode == 0, r.stderr
    for i, target in enumerate(("jetson-orin", "jetson-orin-nano")):  # fp32 exports: a random-init model's
        # logits are near ties, which fp16 (the desktop profile's) flips often enough to fail its parity rule
        key = DeviceKey.generate()
        key.save(tmp_path / f"cam-{i}.key")
        (tmp_path / f"cam-{i}.pub").write_bytes(key.public.to_bytes())
        r = keyedge("fleet", "enroll", f"cam-{i}", "--pubkey", tmp_path / f"cam-{i}.pub", "--target", target,
                    "--db", db, "--master-key", tmp_path / "master.key")
        assert r.returncode == 0, r.stderr
    return tmp_path, db, read_master_key(tmp_path / "master.key")


_rows = rows


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: its mode and, for a file, its bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _left(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root / "rel")) for p in (root / "rel").rglob("*") if p.is_file())


def test_a_device_failing_parity_is_not_released_and_says_why(trained, monkeypatch):
    from keyedge.checks import config

    root, db, master = trained
    impossible = {p: config.Tolerance(t.accuracy, 1.01, t.paired_test, t.alpha)  # top-1 agreement above 100%
                  for p, t in config.DEFAULT_TOLERANCE.items()}
    monkeypatch.setattr(config, "DEFAULT_TOLERANCE", impossible)
    outcomes = release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet)
    assert outcomes["cam-0"].startswith("parity: the export does not keep")
    assert str(root / "rel" / "cam-0" / "r1" / "parity") in outcomes["cam-0"]
    status = {d["device"]: d for d in commands.status(db)["devices"]}
    assert status["cam-0"]["state"] == "failed" and status["cam-0"]["reason"].startswith("parity:")
    assert status["cam-0"]["bundle"] is None
    left = _left(root)
    assert not [f for f in left if f.endswith((".kes", ".onnx"))]  # no bundle, no plaintext
    assert "cam-0/r1/parity/parity.json" in left  # the report that says why
    (state, parity, audit, sha), = _rows(db, "SELECT state, parity, audit, bundle_sha256 FROM releases")
    assert state == "failed" and as_json(parity)["passed"] is False and audit is None and sha is None
    monkeypatch.undo()
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet) == {"cam-0": "released"}
    assert [(n, s) for n, s in _rows(db, "SELECT r.number, r.state FROM releases r JOIN devices d ON r.device = d.id "
                                         "WHERE d.device_id = 'cam-0' ORDER BY number")] == [(1, "failed"), (2, "released")]


def test_a_failed_device_is_tried_again_only_when_named(trained, monkeypatch):
    from keyedge.checks import config

    root, db, master = trained
    impossible = {p: config.Tolerance(t.accuracy, 1.01, t.paired_test, t.alpha)
                  for p, t in config.DEFAULT_TOLERANCE.items()}
    monkeypatch.setattr(config, "DEFAULT_TOLERANCE", impossible)
    assert set(release_devices(db, master, root / "rel", opts=OPTS, echo=quiet)) == {"cam-0", "cam-1"}
    monkeypatch.undo()
    assert release_devices(db, master, root / "rel", opts=OPTS, echo=quiet) == {}
    assert release_devices(db, master, root / "rel", only=["cam-1"], opts=OPTS, echo=quiet) == {"cam-1": "released"}


def test_the_audit_gate_stops_a_bundle_that_holds_the_key(trained, monkeypatch):
    """A sealer that let the key's permutation into the bundle's bytes: the audit finds it, the gate fails."""
    from keyedge.redteam import audit

    root, db, master = trained
    real = audit.find_sealed

    def leaky(path, key, opener=None):
        leaked = path.with_name("leaky.kes")
        leaked.write_bytes(path.read_bytes() + key.perm.astype("<u4").tobytes())
        return real(leaked, key, opener)

    monkeypatch.setattr(audit, "find_sealed", leaky)
    outcomes = release_devices(db, master, root / "rel", only=["cam-1"], opts=OPTS, echo=quiet)
    assert outcomes["cam-1"].startswith("audit: the gate failed")
    (state, reason, parity, audit_json, sha), = _rows(db, "SELECT state, reason, parity, audit, bundle_sha256 "
                                                          "FROM releases")
    assert state == "failed" and as_json(parity)["passed"] and sha is None
    assert as_json(audit_json)["passed"] is False and as_json(audit_json)["findings"][0]["leaked"] == 1.0
    assert not (root / "rel" / "cam-1" / "r1" / "model.kes").exists()
    assert commands.status(db)["devices"][1]["state"] == "failed"


def test_keep_plaintext_keeps_the_export_and_its_recorded_hashes(trained):
    import hashlib

    root, db, master = trained
    opts = ReleaseOptions(parity_n=30, keep_plaintext=True)
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=opts, echo=quiet) == {"cam-0": "released"}
    (hashes,), = _rows(db, "SELECT hashes FROM releases")
    d = root / "rel" / "cam-0" / "r1"
    for name in ("export/model.onnx", "plan/model.onnx", "model.kes"):
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == as_json(hashes)[name]
        assert os.stat(d / name).st_mode & 0o777 == 0o600


def test_a_killed_releaser_s_device_is_released_once_its_lease_expires(trained):
    root, db, master = trained
    dead = claim(db, "dead", 0.5, ["cam-0"], RELEASE)  # a releaser that claimed cam-0 and was killed
    assert dead is not None and dead["device_id"] == "cam-0"
    partial = root / "rel" / "cam-0" / "r1" / "export"
    partial.mkdir(parents=True)
    (partial / "model.onnx").write_bytes(b"half written")
    outcomes = release_devices(db, master, root / "rel", opts=OPTS, worker="alive", lease_s=5, echo=quiet)
    assert outcomes == {"cam-0": "released", "cam-1": "released"}
    assert not partial.exists()
    claims = _rows(db, "SELECT e.detail FROM events e WHERE e.kind = 'claim_release'")
    assert [as_json(d)["previous_owner"] for (d,) in claims].count("dead") == 1


@pytest.mark.parametrize("command", ["rotate", "revoke"])
@pytest.mark.parametrize("step", ["vault write", "commit"])
def test_a_failure_at_any_step_of_rotate_or_revoke_leaves_both_as_they_were(trained, monkeypatch, command, step):
    import sqlalchemy as sa

    from keyedge.fleet.vault import Vault

    root, db, master = trained
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet) == {"cam-0": "released"}
    before = _state(root, db)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(*((Vault, "save", boom) if step == "vault write" else (sa.engine.Connection, "commit", boom)))
    with pytest.raises(OSError):
        getattr(commands, command)(db, "cam-0", commands.MasterKey(root / "master.key"), echo=quiet)
    monkeypatch.undo()
    assert _state(root, db) == before


def test_a_release_interrupted_by_a_full_disk_leaves_the_device_trained_and_no_plaintext(trained, monkeypatch):
    from keyedge.fleet import release

    root, db, master = trained

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(release, "atomic_write_bytes", full)  # the bundle's write
    with pytest.raises(OSError):
        release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet)
    monkeypatch.undo()
    device = commands.status(db)["devices"][0]
    assert device["state"] == "trained" and device["worker"] is None and device["releases"] == 0
    assert not [f for f in _left(root) if f.endswith((".kes", ".onnx"))]
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet) == {"cam-0": "released"}


def test_release_refuses_a_changed_base_before_anything(trained):
    root, db, master = trained
    with open(root / "base.safetensors", "ab") as fh:
        fh.write(b"\0")
    before = _state(root, db)
    r = keyedge("fleet", "release", "--db", db, "--master-key", root / "master.key", "--out", root / "rel")
    assert r.returncode == 2 and "changed since fleet init" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _state(root, db) == before and not (root / "rel").exists()


def test_a_gather_release_carries_the_key_inside_the_sealed_bundle(trained):
    from keyedge.runtime.bundle import DeviceAccess, open_bundle

    root, db, master = trained
    opts = ReleaseOptions(parity_n=30, mode="gather")
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=opts, echo=quiet) == {"cam-0": "released"}
    bundle = Path(commands.status(db)["devices"][0]["bundle"]["path"])
    access = DeviceAccess(root / "cam-0.key", trust=(root / "publisher.pub",))
    opened = open_bundle(bundle, access.opener(quiet))
    try:
        assert {"model.onnx", "manifest.json", "key.bin"} <= set(opened.plain.spans)
    finally:
        opened.wipe()
    (fold,), = _rows(db, "SELECT fold_mode FROM releases")
    assert fold == "gather"


def test_a_worker_that_started_before_a_rotation_or_an_enrollment_takes_the_keys_as_they_are_now(trained):
    from keyedge.fleet import db as fleet_db
    from keyedge.fleet.pinned import VaultKeys, fleet_row

    root, db, master = trained
    with fleet_db.transaction(db) as conn:
        spec = fleet_row(conn, db)
    keys = VaultKeys(spec, master)  # opened when the worker started
    new = commands.rotate(db, "cam-0", commands.MasterKey(root / "master.key"), echo=quiet)
    assert keys.key({"device_id": "cam-0", "key_fingerprint": new}).fingerprint == new
    (root / "cam-9.pub").write_bytes(DeviceKey.generate().public.to_bytes())
    commands.enroll(db, [commands.Enrollment("cam-9", root / "cam-9.pub", "desktop")],
                    commands.MasterKey(root / "master.key"), echo=quiet)
    (fp,), = _rows(db, "SELECT key_fingerprint FROM devices WHERE device_id = 'cam-9'")
    assert keys.key({"device_id": "cam-9", "key_fingerprint": fp}).fingerprint == fp
    with pytest.raises(Exception, match="holds no key"):
        keys.key({"device_id": "cam-9", "key_fingerprint": "0" * 32})


def test_two_releases_of_one_device_at_once_one_wins_the_other_says_so(trained):
    root, db, master = trained
    assert claim(db, "first", 60, ["cam-0"], RELEASE) is not None  # the first release is under way
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet) == {
        "cam-0": "being released by first"}
    r = keyedge("fleet", "release", "cam-0", "--db", db, "--master-key", root / "master.key", "--out", root / "rel")
    assert r.returncode == 1 and "cam-0 is being released by first: not released here" in r.stderr
    assert _rows(db, "SELECT count(*) FROM releases") == [(0,)]


def test_a_release_whose_lease_is_lost_records_nothing_and_stops(trained, monkeypatch):
    """Revoked while its export runs: the renewer finds the lease gone, the release stops, nothing recorded."""
    import time

    from keyedge.workflows import export

    root, db, master = trained
    real = export.export_run

    def export_then_revoked(*args, **kwargs):
        real(*args, **kwargs)
        commands.revoke(db, "cam-0", commands.MasterKey(root / "master.key"), echo=quiet)
        # work goes on in Python steps (the interruption lands between two bytecodes: a single 30 s sleep in C
        # would be woken by nothing); the renewer (every 0.5 s) finds the lease gone and interrupts it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(export, "export_run", export_then_revoked)
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, lease_s=1.5,
                           echo=quiet) == {"cam-0": "lease lost"}
    assert _rows(db, "SELECT count(*) FROM releases") == [(0,)]
    assert commands.status(db)["devices"][0]["state"] == "revoked"
    assert _left(root) == []  # its staging directory, plaintext included, is gone


def test_waves_stop_when_too_many_fail_and_the_next_goes_on_from_there(trained, monkeypatch):
    from keyedge.checks import config
    from keyedge.fleet.release import Wave

    root, db, master = trained
    impossible = {p: config.Tolerance(t.accuracy, 1.01, t.paired_test, t.alpha)
                  for p, t in config.DEFAULT_TOLERANCE.items()}
    monkeypatch.setattr(config, "DEFAULT_TOLERANCE", impossible)
    # a wave of the whole fleet that aborts at its first failure: the second device is not touched
    assert len(release_devices(db, master, root / "rel", opts=OPTS, wave=Wave("100%", 0.0), echo=quiet)) == 1
    monkeypatch.undo()
    status = commands.status(db)
    assert [d["state"] for d in status["devices"]] == ["failed", "trained"]
    assert status["waves"][0] | {"started_at": None} == {
        "wave": 1, "requested": "100%", "size": 2, "abort_above": 0.0, "state": "aborted", "released": 0,
        "failed": 1, "started_at": None}
    # the next wave (50% of 2 devices: 1) goes on with the device the last one did not reach
    assert release_devices(db, master, root / "rel", opts=OPTS, wave=Wave("50%"), echo=quiet) == {"cam-1": "released"}
    wave = commands.status(db)["waves"][1]
    assert (wave["size"], wave["state"], wave["released"], wave["failed"]) == (1, "completed", 1, 0)
    (w,), = _rows(db, "SELECT wave FROM releases r JOIN devices d ON r.device = d.id WHERE d.device_id = 'cam-1'")
    assert w is not None
    assert "wave 2 (50%, up to 1): completed, 1 released, 0 failed" in keyedge("fleet", "status", "--db", db).stdout


def test_export_hands_the_released_bundles_and_one_index_to_an_ota_system(trained):
    import hashlib

    root, db, master = trained
    assert release_devices(db, master, root / "rel", opts=OPTS, echo=quiet) == {"cam-0": "released",
                                                                                 "cam-1": "released"}
    commands.revoke(db, "cam-0", commands.MasterKey(root / "master.key"), reason="lost", echo=quiet)
    r = keyedge("fleet", "export", "--to", root / "ota", "--db", db)
    assert r.returncode == 0, r.stderr
    index = json.loads((root / "ota" / "index.json").read_text())
    entries = {e["device"]: e for e in index["devices"]}
    assert entries["cam-0"]["state"] == "revoked" and entries["cam-0"]["bundle"] is None
    assert entries["cam-0"]["revoked"][0]["reason"] == "lost" and entries["cam-0"]["revoked"][0]["sha256"]
    shipped = root / "ota" / entries["cam-1"]["bundle"]
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == entries["cam-1"]["sha256"]
    assert entries["cam-1"]["bytes"] == shipped.stat().st_size and entries["cam-1"]["state"] == "released"
    assert (root / "ota" / "publisher.pub").read_bytes() == (root / "publisher.pub").read_bytes()
    assert index["publisher"]["fingerprint"] == entries["cam-1"]["publisher"]
    assert sorted(p.name for p in (root / "ota" / "bundles").iterdir()) == ["cam-1.kes"]
    # into a non-empty directory, or from a bundle changed since its release: one line, nothing written
    before = _tree(root / "ota")
    r = keyedge("fleet", "export", "--to", root / "ota", "--db", db)
    assert r.returncode == 2 and "not an empty directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _tree(root / "ota") == before  # every path, its mode and its bytes as they were
    # a copy that fails half-way (the disk fills up): the new directory is not there, not half-written
    from keyedge.fleet import export

    def half_then_full(source, dest, chunk=1 << 22):
        dest.write_bytes(source.read_bytes()[:100])
        raise OSError(28, "No space left on device")

    for to in (root / "ota3", root / "empty"):
        if to.name == "empty":
            to.mkdir()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(export, "_copy_hashed", half_then_full)
            r = keyedge("fleet", "export", "--to", to, "--db", db)
        assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert (not to.exists()) if to.name == "ota3" else list(to.iterdir()) == []
    assert not list(root.glob(".*.partial"))  # the staging directory is gone too
    bundle = Path(commands.status(db)["devices"][1]["bundle"]["path"])
    bundle.write_bytes(bundle.read_bytes() + b"x")
    r = keyedge("fleet", "export", "--to", root / "ota2", "--db", db)
    assert r.returncode == 2 and "changed since its release" in r.stderr and not (root / "ota2").exists()


def test_a_release_failing_at_any_step_leaves_the_device_trained_and_nothing_behind(trained, monkeypatch):
    """Each step does its work (its files written), then the process fails (an OSError, not a verdict):
    no release recorded, the device trained and free, no bundle and no plaintext left."""
    from keyedge.deploy import seal
    from keyedge.runtime.bundle import Trust
    from keyedge.workflows import build, export

    root, db, master = trained
    before = _state(root, db)

    def after(real):
        def fn(*args, **kwargs):
            real(*args, **kwargs)
            raise OSError(28, "No space left on device")
        return fn

    for step, (owner, name) in {"export": (export, "export_run"), "build plan": (build, "build"),
                                "seal": (seal, "seal_artifact"), "verify": (Trust, "check")}.items():
        with pytest.MonkeyPatch.context() as m:
            m.setattr(owner, name, after(getattr(owner, name)))
            with pytest.raises(OSError):
                release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet)
        assert _rows(db, "SELECT state, lease_owner FROM devices WHERE device_id = 'cam-0'") == [("trained", None)], step
        assert _rows(db, "SELECT count(*) FROM releases") == [(0,)], step
        assert _left(root) == [], step  # no bundle, no plaintext, no report: the staging directory is gone
        kinds = [k for (k,) in _rows(db, "SELECT kind FROM events ORDER BY id")]
        assert "released" not in kinds and "release_failed" not in kinds, step
    assert _state(root, db)[1] == before[1]  # the vault as it was
    assert release_devices(db, master, root / "rel", only=["cam-0"], opts=OPTS, echo=quiet) == {"cam-0": "released"}


def test_train_failing_at_its_record_step_leaves_the_device_to_train_again(enrolled, monkeypatch):
    import sqlalchemy as sa

    from keyedge.fleet import training

    root, db, master = enrolled
    vault = _state(root, db)[1]
    armed: list[bool] = []
    real_train, real_commit = training._train_one, sa.engine.Connection.commit

    def train_then_arm(*args, **kwargs):
        result = real_train(*args, **kwargs)
        armed.append(True)  # the next commit is the record's
        return result

    def commit(self):
        if armed:
            armed.clear()
            raise OSError(28, "No space left on device")
        return real_commit(self)

    monkeypatch.setattr(training, "_train_one", train_then_arm)
    monkeypatch.setattr(sa.engine.Connection, "commit", commit)
    with pytest.raises(OSError):
        train_devices(db, master, root / "runs", only=["cam-0"], echo=quiet)
    monkeypatch.undo()
    assert _rows(db, "SELECT state, lease_owner, lease_expires, run_dir FROM devices WHERE device_id = 'cam-0'") == [
        ("enrolled", None, None, None)]
    kinds = [k for (k,) in _rows(db, "SELECT kind FROM events ORDER BY id")]
    assert "trained" not in kinds and kinds[-1] == "interrupted"
    assert _state(root, db)[1] == vault
    assert train_devices(db, master, root / "runs", only=["cam-0"], echo=quiet) == ["cam-0"]
    assert [k for (k,) in _rows(db, "SELECT kind FROM events ORDER BY id")].count("trained") == 1
