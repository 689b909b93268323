"""``keyedge fleet``: init, upgrade, enroll, rotate, revoke and status. Each command is one database transaction, and the
vault is written atomically inside it (and put back if the transaction fails), so a failed command
leaves both as they were. Every input is checked before anything is written."""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, check_output_file
from ..core.keys import can_fold, check_keyspace
from ..core.keyset import MAX_MEMBERS, MIN_MEMBERS, KeySet
from ..core.models import file_sha256
from ..core.progress import Echo, echo
from ..deploy.targets import load_target
from ..runtime.bundle import DevicePublicKey, PublisherKey
from . import db
from .leases import now
from .pinned import ensemble_size, fleet_row, model_patch, new_device_key
from .schema import STATES, devices, events, fleet, releases, waves
from .vault import Vault, new_master_key, read_master_key

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class MasterKey:
    """Where the operator's master key comes from (a file, ``-``, or a command)."""
    path: Path | None = None
    command: str | None = None

    def read(self) -> bytearray:
        return read_master_key(self.path, self.command)


@dataclass(frozen=True)
class FleetSpec:
    """What ``fleet init`` pins: the public base, the model, the data, the key shape and the recipe (whose
    ``ensemble``, where set, makes every device a random ensemble of that many keyed LoRA members)."""
    base: Path
    model: str
    model_kwargs: dict[str, Any]
    data: str
    block_size: int
    channels: int = 3
    mode: str = "lora"
    recipe: dict[str, Any] | None = None


def init(database: str, spec: FleetSpec, vault_path: Path, master: MasterKey, *, publisher_pub: Path | None = None,
         echo: Echo = echo) -> str:
    """Create a fleet: the database (migrated to this keyedge's schema), the publisher's signing key in a
    new vault (its public key in ``publisher_pub``, default ``publisher.pub`` beside the vault: what every
    device trusts), and a new master key where ``master.path`` does not exist yet. Returns the publisher's
    fingerprint."""
    publisher_pub = publisher_pub or vault_path.with_name("publisher.pub")
    if spec.mode not in ("full", "lora"):
        raise KeyedgeError(f"--mode must be full or lora, not {spec.mode!r}")
    if not spec.base.is_file():
        raise KeyedgeError(f"base checkpoint {spec.base} does not exist")
    check_keyspace(spec.block_size, spec.channels)
    _check_ensemble(spec)
    if spec.data != "digits" and not Path(spec.data).is_dir():
        raise KeyedgeError(f"data {spec.data} is neither 'digits' nor a directory")
    url = db.database_url(database)
    if url.startswith("sqlite:///") and Path(url.removeprefix("sqlite:///")).exists():
        raise KeyedgeError(f"fleet database {db.shown(database)} exists: one fleet per database")
    check_output_file(vault_path, False)
    check_output_file(publisher_pub, False)
    new_master = master.path is not None and str(master.path) != "-" and not master.path.exists()
    if new_master:
        check_output_file(master.path, False)  # type: ignore[arg-type]
    base_sha256 = file_sha256(spec.base)
    created: list[Path] = []
    try:
        if new_master:
            new_master_key(master.path)  # type: ignore[arg-type]
            created.append(master.path)  # type: ignore[arg-type]
        key = master.read()
        publisher = PublisherKey.generate()
        Vault(publisher.seed(), {}).save(vault_path, key, overwrite=False)
        created.append(vault_path)
        atomic_write_bytes(publisher_pub, publisher.public.to_bytes(), overwrite=False)
        created.append(publisher_pub)
        with db.transaction(database, must_exist=False, at_head=False) as conn:
            db.upgrade(conn)
            if conn.execute(fleet.select()).first() is not None:
                raise KeyedgeError(f"{db.shown(database)} already holds a fleet")
            conn.execute(fleet.insert().values(
                name=Path(database).stem if "://" not in database else "fleet", base_path=str(spec.base.resolve()),
                base_sha256=base_sha256, model=spec.model, model_kwargs=spec.model_kwargs, data=spec.data,
                block_size=spec.block_size, channels=spec.channels, mode=spec.mode, recipe=spec.recipe or {},
                publisher_fingerprint=publisher.fingerprint, publisher_public=publisher.public.raw,
                vault_path=str(vault_path.resolve()), created_at=now()))
            conn.execute(events.insert().values(device=None, kind="init", detail={"base_sha256": base_sha256},
                                                at=now()))
    except BaseException:
        for path in reversed(created):
            path.unlink(missing_ok=True)
        if url.startswith("sqlite:///"):
            db.forget(database)
            for suffix in ("", "-wal", "-shm"):
                Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
        raise
    echo(f"created fleet {db.shown(database)}: base {spec.base.name} (sha256 {base_sha256[:16]}...), {spec.model}, "
         f"{spec.mode}, block size {spec.block_size}"
         + (f", every device a random ensemble of {ensemble_size(spec)} members" if ensemble_size(spec) else "")
         + f"; publisher {publisher.fingerprint} ({publisher_pub}: every "
         f"device trusts it); vault {vault_path}"
         + (f"; new master key {master.path} (0600: keep it apart from the vault)" if new_master else ""))
    return publisher.fingerprint


def _check_ensemble(spec: FleetSpec) -> None:
    """An ensemble fleet's devices get one gathered graph each: LoRA members of one base, every key folded."""
    n = ensemble_size(spec)
    if n is None:
        return
    if not MIN_MEMBERS <= n <= MAX_MEMBERS:
        raise KeyedgeError(f"--ensemble must be {MIN_MEMBERS} to {MAX_MEMBERS} members, not {n}")
    if spec.mode != "lora":
        raise KeyedgeError("--ensemble needs --mode lora: a device's members are gathered into one graph over the "
                           "shared base, the one form a bundle carries")
    patch = model_patch(spec)
    if not can_fold(spec.block_size, patch):
        raise KeyedgeError(f"--ensemble: block size {spec.block_size} does not divide patch size {patch}; an "
                           "ensemble's keys are folded into its members, so M must divide P")


def _shown(key) -> str:
    return f"key set {key.fingerprint} ({len(key)} members)" if isinstance(key, KeySet) else f"key {key.fingerprint}"


def upgrade(database: str, *, echo: Echo = echo) -> str:
    """Migrate the fleet database to this keyedge's schema (Alembic); a newer schema is refused."""
    with db.transaction(database, at_head=False) as conn:
        before, after = db.upgrade(conn)
    echo(f"{db.shown(database)}: schema {before or 'none'} -> {after}" if before != after else
         f"{db.shown(database)}: schema {after}, up to date")
    return after


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    pubkey: Path
    target: str


def _check(e: Enrollment, where: str) -> DevicePublicKey:
    """A device's id, target and public key, checked; ``where``: the CSV row it came from."""
    try:
        if not _DEVICE_ID.match(e.device_id):
            raise KeyedgeError(f"device id {e.device_id!r} must be 1-128 letters, digits, '.', '_', ':' or '-'")
        load_target(e.target)
        return DevicePublicKey.load(e.pubkey)
    except KeyedgeError as exc:
        raise KeyedgeError(f"{where}{exc}" + (" (nothing enrolled)" if where else "")) from None


@contextlib.contextmanager
def _vault_writes(path: Path) -> Iterator[None]:
    """Put the vault file back as it was if the block fails (after the vault was written, before the
    database committed)."""
    before = path.read_bytes()
    try:
        yield
    except BaseException:
        atomic_write_bytes(path, before, mode=0o600)
        raise


def enroll(database: str, enrollments: list[Enrollment], master: MasterKey, *, where: str = "",
           echo: Echo = echo) -> list[str]:
    """Enroll devices, all or none: a fresh CSPRNG key each into the vault, a row each in the database.
    Returns the keys' fingerprints."""
    checked = [(e, _check(e, f"{where}row {i + 1}: " if where else "")) for i, e in enumerate(enrollments)]
    ids = [e.device_id for e in enrollments]
    if len(set(ids)) != len(ids):
        raise KeyedgeError(f"{where or 'the enrollment'} names a device twice")
    key = master.read()
    with db.transaction(database) as conn:
        # the fleet row locked for the whole command (SQLite's BEGIN IMMEDIATE locks the database already):
        # two enrollments never read and rewrite the vault at once
        row = fleet_row(conn, database, lock=True)
        vault_path = Path(row.vault_path)
        vault = Vault.open(vault_path, key)
        for e, pub in checked:
            taken = conn.execute(devices.select().where(
                (devices.c.device_id == e.device_id) | (devices.c.device_fingerprint == pub.fingerprint))).first()
            if taken is not None:
                raise KeyedgeError(f"device {e.device_id} (or its public key {pub.fingerprint}) is enrolled already "
                                   f"as {taken.device_id}")
        fingerprints, shown = [], []
        for e, pub in checked:
            k = new_device_key(row)
            vault.devices[e.device_id] = bytes(k.to_bytes())
            t = now()
            device = conn.execute(devices.insert().values(
                device_id=e.device_id, target=e.target, device_public=pub.raw, device_fingerprint=pub.fingerprint,
                key_fingerprint=k.fingerprint, state="enrolled", enrolled_at=t, updated_at=t)).inserted_primary_key[0]
            conn.execute(events.insert().values(device=device, kind="enroll",
                                                detail={"key_fingerprint": k.fingerprint, "target": e.target}, at=t))
            fingerprints.append(k.fingerprint)
            shown.append(_shown(k))
            k.wipe()
        with _vault_writes(vault_path):
            vault.save(vault_path, key)
            conn.commit()
    for e, what in zip(enrollments, shown):
        echo(f"enrolled {e.device_id} ({e.target}): {what}")
    return fingerprints


def read_csv(path: Path) -> list[Enrollment]:
    """``device_id,pubkey,target`` rows (a header row of those names first); relative pubkey paths are
    relative to the CSV's directory."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise KeyedgeError(f"CSV {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KeyedgeError(f"cannot read CSV {path}: {exc}") from None
    if not rows or set(rows[0]) != {"device_id", "pubkey", "target"}:
        raise KeyedgeError(f"CSV {path} needs the columns device_id,pubkey,target and at least one row")
    return [Enrollment(r["device_id"] or "", path.parent / (r["pubkey"] or ""), r["target"] or "") for r in rows]


def _one_device(conn, device_id: str):
    """The device's row, locked for the transaction (on PostgreSQL: a release recording meanwhile waits, or
    is waited for, so that no bundle of a revoked device stays current)."""
    row = conn.execute(devices.select().where(devices.c.device_id == device_id).with_for_update()).first()
    if row is None:
        raise KeyedgeError(f"unknown device {device_id}")
    return row


def rotate(database: str, device_id: str, master: MasterKey, *, echo: Echo = echo) -> str:
    """A new key for a device (the old one retired in the vault): the device is trained and released again;
    its current bundle stays valid until the new one is released, which revokes it. Returns the new key's
    fingerprint."""
    key = master.read()
    with db.transaction(database) as conn:
        spec = fleet_row(conn, database, lock=True)
        row = _one_device(conn, device_id)
        if row.state == "revoked":
            raise KeyedgeError(f"device {device_id} is revoked: a revoked device is never released again "
                               "(enroll it anew under another id)")
        vault_path = Path(spec.vault_path)
        vault = Vault.open(vault_path, key)
        vault.retire(device_id, row.key_fingerprint)
        k = new_device_key(spec)
        vault.devices[device_id] = bytes(k.to_bytes())
        t = now()
        conn.execute(devices.update().where(devices.c.id == row.id).values(
            key_fingerprint=k.fingerprint, state="enrolled", lease_owner=None, lease_expires=None, run_dir=None,
            attempts=0, updated_at=t))  # a lease held on the old key's work is void: its worker records nothing
        conn.execute(events.insert().values(device=row.id, kind="rotate", detail={
            "old_key_fingerprint": row.key_fingerprint, "key_fingerprint": k.fingerprint, "state_before": row.state},
            at=t))
        fingerprint, what = k.fingerprint, _shown(k)
        k.wipe()
        with _vault_writes(vault_path):
            vault.save(vault_path, key)
            conn.commit()
    echo(f"rotated {device_id}: key {row.key_fingerprint} retired, new {what}; its current bundle stays "
         "valid until the new one is released")
    return fingerprint


def revoke(database: str, device_id: str, master: MasterKey, *, reason: str = "revoked by the operator",
           echo: Echo = echo) -> int:
    """Revoke a device for good: its bundles are marked revoked, its key retired in the vault, and it is
    never trained or released again. Returns how many released bundles were revoked."""
    key = master.read()
    with db.transaction(database) as conn:
        spec = fleet_row(conn, database, lock=True)
        row = _one_device(conn, device_id)
        if row.state == "revoked":
            raise KeyedgeError(f"device {device_id} is revoked already")
        vault_path = Path(spec.vault_path)
        vault = Vault.open(vault_path, key)
        vault.retire(device_id, row.key_fingerprint)
        t = now()
        revoked = conn.execute(releases.update().where(releases.c.device == row.id)
                               .where(releases.c.state == "released")
                               .values(state="revoked", reason=reason, revoked_at=t)).rowcount
        conn.execute(devices.update().where(devices.c.id == row.id).values(
            state="revoked", lease_owner=None, lease_expires=None, updated_at=t))
        conn.execute(events.insert().values(device=row.id, kind="revoke", detail={
            "reason": reason, "key_fingerprint": row.key_fingerprint, "bundles_revoked": revoked,
            "state_before": row.state}, at=t))
        with _vault_writes(vault_path):
            vault.save(vault_path, key)
            conn.commit()
    echo(f"revoked {device_id}: {revoked} released bundle(s) marked revoked, key {row.key_fingerprint} retired")
    return revoked


def status(database: str) -> dict[str, Any]:
    """The fleet and every device with its latest release, as data (``fleet status --json``)."""
    with db.transaction(database) as conn:
        return status_in(conn, database)


def status_in(conn, database: str) -> dict[str, Any]:
    """:func:`status` inside a transaction the caller holds."""
    import sqlalchemy as sa

    spec = fleet_row(conn, database)
    rows = conn.execute(devices.select().order_by(devices.c.device_id)).all()
    latest = sa.select(releases.c.device, sa.func.max(releases.c.number).label("number")).group_by(
        releases.c.device).subquery()
    last = {r.device: r for r in conn.execute(releases.select().join(
        latest, (releases.c.device == latest.c.device) & (releases.c.number == latest.c.number)))}
    current = {r.device: r for r in conn.execute(releases.select().where(releases.c.state == "released"))}
    counted = dict(conn.execute(sa.select(releases.c.device, sa.func.count()).group_by(releases.c.device)).all())
    # why a device was revoked: its revoke event says so, released or not (the last one: a device is revoked once)
    revoked_why = {e.device: (e.detail or {}).get("reason") for e in conn.execute(
        events.select().where(events.c.kind == "revoke").order_by(events.c.id))}
    staged = [{"wave": w.number, "requested": w.requested, "size": w.size, "abort_above": w.abort_above,
               "state": w.state, "released": w.released, "failed": w.failed,
               "started_at": w.started_at.isoformat()}
              for w in conn.execute(waves.select().order_by(waves.c.number))]
    listed = []
    for r in rows:
        rel, cur = last.get(r.id), current.get(r.id)
        listed.append({
            "device": r.device_id, "target": r.target, "key_fingerprint": r.key_fingerprint,
            "device_fingerprint": r.device_fingerprint, "state": r.state, "worker": r.lease_owner,
            "attempts": r.attempts, "run": r.run_dir, "releases": counted.get(r.id, 0),
            "reason": revoked_why.get(r.id) if r.state == "revoked" else
            rel.reason if rel is not None and r.state == "failed" else None,
            "bundle": None if cur is None else {
                "release": cur.number, "path": cur.bundle_path, "sha256": cur.bundle_sha256,
                "bytes": cur.bundle_bytes, "key_fingerprint": cur.key_fingerprint, "fold_mode": cur.fold_mode,
                "clean": cur.clean, "transfer": cur.transfer, "publisher": cur.publisher_fingerprint,
                "released_at": cur.finished_at.isoformat()},
            "enrolled_at": r.enrolled_at.isoformat(), "updated_at": r.updated_at.isoformat()})
    counts = {s: sum(d["state"] == s for d in listed) for s in STATES if any(d["state"] == s for d in listed)}
    return {"fleet": {"model": spec.model, "mode": spec.mode, "block_size": spec.block_size,
                      "ensemble": ensemble_size(spec), "base_sha256": spec.base_sha256,
                      "publisher": spec.publisher_fingerprint},
            "devices": listed, "counts": counts, "waves": staged}
