"""``keyedge fleet train``: each pending device's adapter (or model) trained from the fleet's base with
keyedge's trainer, the work claimed in the database so that any number of workers split it. In a fleet of
random ensembles, a device's N members are trained one after another into one ensemble run (its key set's).

A worker claims one device at a time with a lease (its id and an expiry) in one short transaction:
``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; a thread renews the
lease while the device trains; the run is recorded, and the lease released, only by the worker that
still holds it. A killed worker's lease expires and another worker takes the device again, from its
last epoch checkpoint where there is one. A trained device is never claimed again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..core.io import check_output_dir, private_dir
from ..core.ensemble import ENSEMBLE
from ..core.keys import Key
from ..core.keyset import MAX_MEMBERS, KeySet
from ..core.progress import Echo, echo
from ..core.runs import CHECKPOINT
from . import db
from .leases import TRAIN, LeaseLost, Renewer, claim, rank_worker, give_back, leased_elsewhere, now
from .pinned import VaultKeys, check_base, fleet_row, known_devices
from .schema import devices, events



def run_dir_for(runs: Path, device_id: str, key_fingerprint: str) -> Path:
    """One run per device and key: a rotated key trains a new run (the old one stays, as history)."""
    return runs / device_id / key_fingerprint


def _train_one(spec, row: dict[str, Any], key: Key | KeySet, run_dir: Path, epochs: int | None) -> dict[str, Any]:
    from ..training.config import TrainConfig
    from ..training.ensemble import train_ensemble
    from ..training.train import train

    kwargs = dict(spec.model_kwargs)
    top = {k: kwargs.pop(k) for k in ("img_size", "patch_size", "num_classes") if k in kwargs}
    recipe = {k: v for k, v in (spec.recipe or {}).items() if k in ("lr", "batch_size", "lora_rank", "max_steps")}
    private_dir(run_dir.parent)
    ensemble = isinstance(key, KeySet)
    resume = (run_dir / (ENSEMBLE if ensemble else CHECKPOINT)).is_file()
    cfg = TrainConfig(model=spec.model, out=str(run_dir), data=spec.data, checkpoint=spec.base_path,
                      mode=spec.mode, model_kwargs=kwargs, progress=False,
                      epochs=epochs or (spec.recipe or {}).get("epochs", 1), resume=resume, force=not resume,
                      # member i of an ensemble takes seed + i: devices' seeds MAX_MEMBERS apart never overlap
                      seed=row["id"] * (MAX_MEMBERS if ensemble else 1), workers=0, **top,
                      **recipe)  # the rest: TrainConfig's own defaults
    t0 = time.perf_counter()
    if ensemble:  # members finished are kept, the interrupted one continues from its checkpoint
        _, members = train_ensemble(cfg, key, alone=True)
    else:
        members = [train(cfg, key=key, alone=True)]  # the key from the vault, in memory; one device per rank
    accs = [(m.metrics or {}).get("test_acc") for m in members]
    result = {"run": str(run_dir), "resumed": resume, "epochs": members[-1].epochs_done,
              "test_acc": accs[0] if len(accs) == 1 else sum(accs) / len(accs),  # an ensemble's: its members' mean
              "per_key_bytes": sum(m.per_key_bytes or 0 for m in members) or None,
              "full_model_bytes": members[0].full_model_bytes, "seconds": round(time.perf_counter() - t0, 3)}
    if ensemble:
        result["members_test_acc"] = accs
    return result


def train_devices(database: str, master: bytearray, runs: Path, *, only: list[str] | None = None,
                  epochs: int | None = None, worker: str | None = None, lease_s: float = 60.0,
                  echo: Echo = echo) -> list[str]:
    """Train pending devices until none is left to claim; returns the ids this worker trained."""
    worker = rank_worker(worker)
    with db.transaction(database) as conn:
        spec = fleet_row(conn, database)
        known_devices(conn, only)
    check_base(spec)
    check_output_dir(runs, True)
    keys = VaultKeys(spec, master)
    done: list[str] = []
    while True:
        row = claim(database, worker, lease_s, only, TRAIN)
        if row is None:
            if not leased_elsewhere(database, only, TRAIN):
                return done
            time.sleep(min(1.0, lease_s / 4))  # another worker trains it, or died: its lease will expire
            continue
        key = None
        try:
            key = keys.key(row)
            with Renewer(database, row["id"], worker, lease_s):
                run_dir = run_dir_for(private_dir(runs), row["device_id"], key.fingerprint)
                result = _train_one(spec, row, key, run_dir, epochs)
        except LeaseLost as exc:
            echo(f"{row['device_id']}: {exc}", err=True)
            continue
        except BaseException:  # interrupted: the device waits for training again (from its checkpoint)
            give_back(database, row["id"], worker, "enrolled")
            raise
        finally:
            if key is not None:
                key.wipe()
        try:
            with db.transaction(database) as conn:
                recorded = conn.execute(devices.update().where(devices.c.id == row["id"])
                                        .where(devices.c.lease_owner == worker).where(devices.c.state == "training")
                                        .values(state="trained", lease_owner=None, lease_expires=None,
                                                run_dir=result["run"], updated_at=now())).rowcount
                if recorded:
                    conn.execute(events.insert().values(device=row["id"], kind="trained",
                                                        detail={"worker": worker, **result}, at=now()))
        except BaseException:  # not recorded (rolled back): the device waits for training again, from its run
            give_back(database, row["id"], worker, "enrolled")
            raise
        if recorded:
            done.append(row["device_id"])
            accs = result.get("members_test_acc")
            echo(f"trained {row['device_id']} ({'resumed' if result['resumed'] else 'from the base'}): "
                 + (f"{len(accs)} members, test accuracy {', '.join(f'{a:.4f}' for a in accs)}" if accs else
                    f"test accuracy {result['test_acc']}"))
        else:
            echo(f"{row['device_id']}: the lease was lost while training (another worker took it); not recorded",
                 err=True)
