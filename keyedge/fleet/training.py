"""``keyedge fleet train``: each pending device's adapter (or model) trained from the fleet's base with
keyedge's trainer, the work claimed in the database so that any number of workers split it.

A worker claims one device at a time with a lease (its id and an expiry) in one short transaction:
``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; a thread renews the
lease while the device trains; the run is recorded, and the lease released, only by the worker that
still holds it. A killed worker's lease expires and another worker takes the device again, from its
last epoch checkpoint where there is one. A trained device is never claimed again."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.keys import Key
from ..core.models import file_sha256
from ..core.progress import Echo, echo
from . import db
from .schema import devices, events, fleet
from .vault import Vault

PENDING = ("enrolled", "training")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(database: str, worker: str, lease_s: float, only: list[str] | None = None) -> dict[str, Any] | None:
    """Take one pending device whose lease is free or expired; None when there is none."""
    import sqlalchemy as sa

    with db.transaction(database) as conn:
        now = _now()
        query = sa.select(devices).where(devices.c.state.in_(PENDING)).where(
            (devices.c.lease_expires.is_(None)) | (devices.c.lease_expires < now)).order_by(devices.c.id).limit(1)
        if only:
            query = query.where(devices.c.device_id.in_(only))
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row = conn.execute(query).first()
        if row is None:
            return None
        conn.execute(devices.update().where(devices.c.id == row.id).values(
            state="training", lease_owner=worker, lease_expires=now + dt.timedelta(seconds=lease_s),
            attempts=row.attempts + 1, updated_at=now))
        conn.execute(events.insert().values(device=row.id, kind="claim",
                                            detail={"worker": worker, "attempt": row.attempts + 1,
                                                    "previous_owner": row.lease_owner}, at=now))
        return dict(row._mapping)


def leased_elsewhere(database: str, only: list[str] | None = None) -> bool:
    """Are pending devices held by another worker's unexpired lease (to wait for: it may die)?"""
    import sqlalchemy as sa

    with db.transaction(database) as conn:
        query = sa.select(sa.func.count()).select_from(devices).where(devices.c.state.in_(PENDING)).where(
            devices.c.lease_expires >= _now())
        if only:
            query = query.where(devices.c.device_id.in_(only))
        return bool(conn.execute(query).scalar())


def renew(database: str, device: int, worker: str, lease_s: float) -> bool:
    """Extend the lease if this worker still holds it."""
    with db.transaction(database) as conn:
        done = conn.execute(devices.update().where(devices.c.id == device).where(devices.c.lease_owner == worker)
                            .values(lease_expires=_now() + dt.timedelta(seconds=lease_s)))
        return done.rowcount == 1


class _Renewer(threading.Thread):
    """Renews a lease every third of its length until stopped."""

    def __init__(self, database: str, device: int, worker: str, lease_s: float) -> None:
        super().__init__(daemon=True)
        self.args, self.stop, self.lost = (database, device, worker, lease_s), threading.Event(), False

    def run(self) -> None:
        while not self.stop.wait(self.args[3] / 3):
            try:
                if not renew(*self.args):
                    self.lost = True
                    return
            except KeyedgeError:  # the database is busy: try again at the next tick
                continue


def _train_one(spec, row: dict[str, Any], key: Key, run_dir: Path, epochs: int | None) -> dict[str, Any]:
    from ..training.config import TrainConfig
    from ..training.train import train

    kwargs = dict(spec.model_kwargs)
    top = {k: kwargs.pop(k) for k in ("img_size", "patch_size", "num_classes") if k in kwargs}
    recipe = {k: v for k, v in (spec.recipe or {}).items() if k in ("lr", "batch_size", "lora_rank")}
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = run_dir / "key.bin"
    key.save(key_path, overwrite=True)
    resume = (run_dir / "run" / "checkpoint.pt").is_file()
    cfg = TrainConfig(model=spec.model, out=str(run_dir / "run"), data=spec.data, key=str(key_path),
                      checkpoint=spec.base_path, mode=spec.mode, model_kwargs=kwargs, progress=False,
                      epochs=epochs or (spec.recipe or {}).get("epochs", 1), resume=resume, force=not resume,
                      seed=row["id"], workers=0, **top, **recipe)  # the rest: TrainConfig's own defaults
    manifest = train(cfg)
    return {"run": str(run_dir / "run"), "resumed": resume, "epochs": manifest.epochs_done,
            "test_acc": (manifest.metrics or {}).get("test_acc"), "per_key_bytes": manifest.per_key_bytes}


def train_devices(database: str, master: bytearray, runs: Path, *, only: list[str] | None = None,
                  epochs: int | None = None, worker: str | None = None, lease_s: float = 60.0,
                  echo: Echo = echo) -> list[str]:
    """Train pending devices until none is left to claim; returns the ids this worker trained."""
    worker = worker or default_worker()
    with db.transaction(database) as conn:
        spec = conn.execute(fleet.select()).first()
        if spec is None:
            raise KeyedgeError(f"{database} holds no fleet (keyedge fleet init)")
        if only:
            known = {r.device_id for r in conn.execute(devices.select().where(devices.c.device_id.in_(only)))}
            if set(only) - known:
                raise KeyedgeError(f"unknown device {sorted(set(only) - known)[0]}")
    if file_sha256(spec.base_path) != spec.base_sha256:
        raise KeyedgeError(f"base checkpoint {spec.base_path} changed since fleet init (sha256 mismatch)")
    vault = Vault.open(Path(spec.vault_path), master)
    done: list[str] = []
    while True:
        row = claim(database, worker, lease_s, only)
        if row is None:
            if not leased_elsewhere(database, only):
                return done
            time.sleep(min(1.0, lease_s / 4))  # another worker trains it, or died: its lease will expire
            continue
        key = Key.from_bytes(vault.devices[row["device_id"]], source=f"the vault's key of {row['device_id']}")
        renewer = _Renewer(database, row["id"], worker, lease_s)
        renewer.start()
        try:
            result = _train_one(spec, row, key, runs / row["device_id"], epochs)
        finally:
            renewer.stop.set()
            renewer.join()
            key.wipe()
        with db.transaction(database) as conn:
            recorded = conn.execute(devices.update().where(devices.c.id == row["id"])
                                    .where(devices.c.lease_owner == worker).where(devices.c.state == "training")
                                    .values(state="trained", lease_owner=None, lease_expires=None,
                                            run_dir=result["run"], updated_at=_now())).rowcount
            if recorded:
                conn.execute(events.insert().values(device=row["id"], kind="trained",
                                                    detail={"worker": worker, **result}, at=_now()))
        if recorded:
            done.append(row["device_id"])
            echo(f"trained {row['device_id']} ({'resumed' if result['resumed'] else 'from the base'}): "
                 f"test accuracy {result['test_acc']}")
        else:
            echo(f"{row['device_id']}: the lease was lost while training (another worker took it); not recorded",
                 err=True)
