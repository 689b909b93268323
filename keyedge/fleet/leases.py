"""Work on a device claimed by a lease (a worker id and an expiry in the device's row), for training and
for releasing alike.

A worker claims one device at a time in one short transaction: ``BEGIN IMMEDIATE`` on SQLite, ``SELECT ...
FOR UPDATE SKIP LOCKED`` on PostgreSQL; a thread renews the lease while the work runs; the result is
recorded, and the lease released, only by the worker that still holds it. A killed worker's lease expires
and another worker takes the device again."""

from __future__ import annotations

import _thread
import datetime as dt
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from ..core.errors import KeyedgeError
from . import db
from .schema import devices, events


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def clock(conn) -> dt.datetime:
    """The time leases are written and compared in, inside the transaction ``conn`` holds: the database
    server's clock on PostgreSQL (workers on many machines, whose clocks differ, share that one), this
    machine's on SQLite (every worker is on the machine that holds the file)."""
    if conn.dialect.name == "postgresql":
        import sqlalchemy as sa

        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    return now()


def default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def rank_worker(worker: str | None) -> str:
    """This process's worker id: under torchrun each rank is a worker of its own."""
    worker = worker or default_worker()
    rank = os.environ.get("RANK")
    if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        worker = f"{worker[:118]}/rank{rank}"
    return worker[:128]  # the column's width


@dataclass(frozen=True)
class Work:
    """A kind of work: the states a device waits for it in, and the state it is in while leased. A device
    in ``working`` whose lease expired is waiting for it too (its worker died)."""
    waiting: tuple[str, ...]
    working: str

    @property
    def claimable(self) -> tuple[str, ...]:
        return (*self.waiting, self.working)


TRAIN = Work(("enrolled",), "training")
RELEASE = Work(("trained",), "releasing")
RELEASE_NAMED = Work(("trained", "failed"), "releasing")  # a failed device is tried again when named


class LeaseLost(KeyedgeError):
    """Another worker took the device, or an operator rotated or revoked it: this worker's work on it stops
    and nothing of it is recorded."""


def claim(database: str, worker: str, lease_s: float, only: list[str] | None = None,
          work: Work = TRAIN) -> dict[str, Any] | None:
    """Take one device waiting for ``work`` whose lease is free or expired; None when there is none. A
    connection lost inside the claim (a server restart) rolled it back: the claim is made again."""
    return db.retried(lambda: _claim(database, worker, lease_s, only, work))


def _claim(database: str, worker: str, lease_s: float, only: list[str] | None, work: Work) -> dict[str, Any] | None:
    import sqlalchemy as sa

    with db.transaction(database) as conn:
        t = clock(conn)
        query = sa.select(devices).where(devices.c.state.in_(work.claimable)).where(
            (devices.c.lease_expires.is_(None)) | (devices.c.lease_expires < t)).order_by(devices.c.id).limit(1)
        if only:
            query = query.where(devices.c.device_id.in_(only))
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row = conn.execute(query).first()
        if row is None:
            return None
        training = work is TRAIN  # attempts count trainings (a release is redone from the same run)
        conn.execute(devices.update().where(devices.c.id == row.id).values(
            state=work.working, lease_owner=worker, lease_expires=t + dt.timedelta(seconds=lease_s),
            attempts=row.attempts + training, updated_at=t))
        detail = {"worker": worker, "previous_owner": row.lease_owner,
                  **({"attempt": row.attempts + 1} if training else {})}
        conn.execute(events.insert().values(device=row.id, kind="claim" if training else "claim_release",
                                            detail=detail, at=t))
        return dict(row._mapping)


def holders(database: str, only: list[str] | None = None, work: Work = TRAIN) -> dict[str, str]:
    """The devices waiting for ``work`` that a worker holds by an unexpired lease, and who holds each."""
    with db.transaction(database) as conn:
        query = devices.select().where(devices.c.state == work.working).where(devices.c.lease_expires >= clock(conn))
        if only:
            query = query.where(devices.c.device_id.in_(only))
        return {r.device_id: r.lease_owner for r in conn.execute(query)}


def leased_elsewhere(database: str, only: list[str] | None = None, work: Work = TRAIN) -> bool:
    """Are devices waiting for ``work`` held by another worker's unexpired lease (to wait for: it may die)?"""
    return bool(holders(database, only, work))


def renew(database: str, device: int, worker: str, lease_s: float) -> bool:
    """Extend the lease if this worker still holds it. A restarting server is waited for (and the renewal
    made again) for at most a third of the lease: the renewer's next tick, while the lease still holds."""
    def once() -> bool:
        with db.transaction(database, reconnect_s=lease_s / 3) as conn:
            done = conn.execute(devices.update().where(devices.c.id == device)
                                .where(devices.c.lease_owner == worker)
                                .values(lease_expires=clock(conn) + dt.timedelta(seconds=lease_s)))
            return done.rowcount == 1

    return db.retried(once, lease_s / 3)


def give_back(database: str, device: int, worker: str, state: str) -> None:
    """Release a lease this worker holds, the device back in ``state``, after its work was interrupted (an
    error, Ctrl-C): another worker need not wait for the lease to expire. Best effort: a database that
    cannot be reached leaves the lease to expire."""
    def once() -> None:
        with db.transaction(database) as conn:
            t = clock(conn)
            done = conn.execute(devices.update().where(devices.c.id == device).where(devices.c.lease_owner == worker)
                                .values(state=state, lease_owner=None, lease_expires=None, updated_at=t))
            if done.rowcount:
                conn.execute(events.insert().values(device=device, kind="interrupted",
                                                    detail={"worker": worker, "back_to": state}, at=t))

    try:
        db.retried(once)
    except KeyedgeError:
        pass


class Renewer(threading.Thread):
    """Renews a lease every third of its length while the block runs (a context manager). When the lease is
    lost, the work in the main thread is interrupted and the block raises :class:`LeaseLost`: a worker
    that lost its lease never goes on writing where the new holder works."""

    def __init__(self, database: str, device: int, worker: str, lease_s: float) -> None:
        super().__init__(daemon=True)
        self.args, self.stop, self.lost = (database, device, worker, lease_s), threading.Event(), False

    def run(self) -> None:
        while not self.stop.wait(self.args[3] / 3):
            try:
                if not renew(*self.args):
                    self.lost = True
                    _thread.interrupt_main()
                    return
            except KeyedgeError:  # the database is busy or restarting: try again at the next tick
                continue

    def __enter__(self) -> "Renewer":
        self.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.stop.set()
        try:
            self.join()
        except KeyboardInterrupt:  # the interruption for the lost lease arrived late
            if not self.lost:
                raise
        if self.lost and (kind is None or issubclass(kind, KeyboardInterrupt)):
            raise LeaseLost("the lease was lost (another worker took the device, or it was rotated or "
                            "revoked); nothing recorded")
