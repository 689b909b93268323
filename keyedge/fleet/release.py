"""``keyedge fleet release``: each trained device's model, through keyedge's own commands, into a bundle
only that device opens, signed by the fleet's publisher; every step's verdict and every file's hash recorded.

Per device (claimed by a lease, like training: two releases of one device never run at once):

1. ``keyedge export``: LoRA merged, the key folded into the patch embedding where the block size divides the
   patch size (else the gather), in the target's precision where its TensorRT is strongly typed (else
   fp32, built with the profile's precision flags), ONNX verified against PyTorch with ONNX Runtime;
2. ``keyedge parity``: the export against its PyTorch reference on clean, white-box and transfer examples;
3. ``keyedge build --plan-only``: the target profile's build plan (the engine is built on the device);
4. ``keyedge seal``: sealed to the device's public key, signed with the publisher key from the vault, and
   the signature checked as a device checks it;
5. ``keyedge audit`` as the gate: the bundle, as a copy of it stands, must yield no key and no model.

A device whose export, parity or audit fails is not released: its release row says which step and why,
and the device is ``failed`` (``fleet release DEVICE`` tries it again). The plaintext (the export and the
plan's model) is removed once sealed unless ``keep_plaintext``; the reports stay."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, check_output_dir
from ..core.keys import Key
from ..core.manifests import FoldMode
from ..core.models import file_sha256
from ..core.progress import Echo, echo, quiet
from . import db
from .leases import Renewer, Work, claim, default_worker, give_back, leased_elsewhere, now
from .pinned import check_base, fleet_row, known_devices, open_vault
from .schema import devices, events, releases

RELEASABLE = ("trained", "failed")  # failed: tried again when named
PLAINTEXT = ("export", "plan/model.onnx", "plan/model.onnx.data")


@dataclass(frozen=True)
class ReleaseOptions:
    mode: FoldMode | None = None  # None: fused where the key folds into the patch embedding, else gather
    parity_n: int = 200           # parity images (the run's test set)
    fail_above: float = 0.0       # the audit gate: a bundle that yields any of the key fails
    keep_plaintext: bool = False
    seed: int = 0


class StepFailed(KeyedgeError):
    """A release step's verdict: the device is not released."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _step(name: str, fn, *args, timings: dict[str, float], **kwargs):
    """Run a keyedge command as a release step, timed into ``timings``; its refusal is the step's failure."""
    from ..redteam.audit import KeyLeak

    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except KeyLeak as exc:
        raise StepFailed(name, f"the gate failed: {exc}") from None
    except StepFailed:
        raise
    except KeyedgeError as exc:
        raise StepFailed(name, str(exc)) from None
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)


def _release_one(spec, row: dict[str, Any], key: Key, publisher, d: Path, opts: ReleaseOptions,
                 record: dict[str, Any], timings: dict[str, float]) -> None:
    """The five steps into ``d``; fills ``record`` (the release row) and ``timings`` as it goes."""
    from ..checks.config import ParityConfig
    from ..deploy.config import ExportOptions
    from ..deploy.seal import seal_artifact
    from ..deploy.targets import load_target
    from ..redteam.config import AuditConfig
    from ..runtime.bundle import DevicePublicKey, Trust
    from ..workflows.audit import audit_release
    from ..workflows.build import build
    from ..workflows.export import export_run
    from ..workflows.parity import run_parity

    run, base, target = Path(row["run_dir"]), Path(spec.base_path), load_target(row["target"])
    # a strongly typed target (TensorRT 11) takes its precision from the ONNX types; the others build an
    # fp32 export with the profile's precision flags
    precision = target.precision if target.strongly_typed else "fp32"
    art = _step("export", export_run, run, key, d / "export",
                ExportOptions(mode=opts.mode, batch=None, precision=precision), echo=quiet, timings=timings)
    record.update(fold_mode=art.fold_mode, precision=art.precision)
    onnx = d / "export" / "model.onnx"
    report = _step("parity", run_parity, run, key, [onnx], d / "parity", base=base,
                   cfg=ParityConfig(n=opts.parity_n, seed=opts.seed), echo=quiet, timings=timings)
    result = report["artifacts"][str(onnx)]
    sets = {name: {"accuracy": s["accuracy"], "difference": s["difference"]} for name, s in result["sets"].items()}
    record.update(parity={"passed": result["passed"], "n": report["n"], "sets": sets,
                          "max_accuracy_difference": result["max_accuracy_difference"]},
                  clean=sets["clean"]["accuracy"], transfer=sets.get("pgd_linf_transfer_base", {}).get("accuracy"))
    if not result["passed"]:
        raise StepFailed("parity", "the export does not keep the PyTorch model's accuracy: " + ", ".join(
            f"{name} {100 * s['difference']:+.1f} points" for name, s in sets.items()) + f" (see {d / 'parity'})")
    _step("build plan", build, d / "export", row["target"], d / "plan", plan_only=True, echo=quiet,
          timings=timings)
    bundle = d / "model.kes"
    data, _ = _step("seal", seal_artifact, d / "export", DevicePublicKey(row["device_public"]), key, publisher,
                    timings=timings)
    atomic_write_bytes(bundle, data, mode=0o600, overwrite=False)
    # the signature checked as a device checks it
    signed_by = _step("verify", Trust((publisher.public,)).check, data, str(bundle), timings=timings)
    record.update(bundle_path=str(bundle), bundle_sha256=file_sha256(bundle), bundle_bytes=len(data),
                  publisher_fingerprint=signed_by)
    try:
        _step("audit", audit_release, [bundle], base, key, d / "audit",
              AuditConfig(n=opts.parity_n, seed=opts.seed, fail_above=opts.fail_above), echo=quiet,
              timings=timings)
    finally:  # the gate's report is written whatever its verdict
        if (d / "audit" / "audit.json").is_file():
            audit = json.loads((d / "audit" / "audit.json").read_text())
            record["audit"] = {"passed": audit["passed"], "fail_above": audit["fail_above"], "findings": [
                {k: f[k] for k in ("kind", "holds_key", "leaked", "note")} for f in audit["artifacts"]]}


def _remove_plaintext(d: Path) -> None:
    for name in PLAINTEXT:
        path = d / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_releasable(conn, only: list[str] | None) -> None:
    """Named devices must have a trained run to release."""
    if only:
        for r in conn.execute(devices.select().where(devices.c.device_id.in_(only))):
            if r.state not in (*RELEASABLE, "releasing"):
                raise KeyedgeError(f"device {r.device_id} is {r.state}: only a trained device is released" + {
                    "enrolled": " (keyedge fleet train)", "training": " (keyedge fleet train)",
                    "released": " (keyedge fleet rotate makes a new key, model and release)"}.get(r.state, ""))


def release_devices(database: str, master: bytearray, out: Path, *, only: list[str] | None = None,
                    opts: ReleaseOptions = ReleaseOptions(), worker: str | None = None, lease_s: float = 60.0,
                    echo: Echo = echo) -> dict[str, str]:
    """Release trained devices (named failed ones again) until none is left to claim; returns each
    device this worker took and its outcome (``released`` or the failed step's message)."""
    from ..runtime.bundle import PublisherKey

    worker = worker or default_worker()
    with db.transaction(database) as conn:
        spec = fleet_row(conn, database)
        known_devices(conn, only)
        check_releasable(conn, only)
    check_base(spec)
    check_output_dir(out, True)
    vault = open_vault(spec, master)
    publisher = PublisherKey(vault.publisher)
    if publisher.fingerprint != spec.publisher_fingerprint:
        raise KeyedgeError(f"the vault's publisher key is {publisher.fingerprint}, not the fleet's "
                           f"{spec.publisher_fingerprint}: this vault belongs to another fleet")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Work(RELEASABLE if only else ("trained",), "releasing")
    outcomes: dict[str, str] = {}
    remaining = list(dict.fromkeys(only)) if only else None  # a named device is tried once per command
    while remaining is None or remaining:
        row = claim(database, worker, lease_s, remaining, work)
        if row is None:
            if not leased_elsewhere(database, remaining, work):
                break
            time.sleep(min(1.0, lease_s / 4))
            continue
        outcomes[row["device_id"]] = _release_claimed(database, spec, row, vault, publisher, out, opts, worker,
                                                      lease_s, echo)
        if remaining is not None:
            remaining.remove(row["device_id"])
    return outcomes


def _release_claimed(database, spec, row, vault, publisher, out: Path, opts: ReleaseOptions, worker: str,
                     lease_s: float, echo: Echo) -> str:
    with db.transaction(database) as conn:
        number = 1 + (conn.execute(sa.select(sa.func.max(releases.c.number)).where(
            releases.c.device == row["id"])).scalar() or 0)
    d = out / row["device_id"] / f"r{number}"
    if d.exists():  # a killed worker's partial release of this number: this worker holds the lease now
        shutil.rmtree(d)
    d.parent.mkdir(mode=0o700, exist_ok=True)
    d.mkdir(mode=0o700)
    key = Key.from_bytes(vault.devices[row["device_id"]], source=f"the vault's key of {row['device_id']}")
    record: dict[str, Any] = {"number": number, "key_fingerprint": key.fingerprint, "target": row["target"],
                              "run_dir": row["run_dir"], "release_dir": str(d), "worker": worker,
                              "started_at": now()}  # parity, audit: NULL until reached
    t0, timings = time.perf_counter(), dict[str, float]()
    failure: StepFailed | None = None
    try:
        with Renewer(database, row["id"], worker, lease_s):
            _release_one(spec, row, key, publisher, d, opts, record, timings)
    except StepFailed as exc:
        failure = exc
        (d / "model.kes").unlink(missing_ok=True)  # not released: no bundle to ship by mistake
        for field in ("bundle_path", "bundle_sha256", "bundle_bytes", "publisher_fingerprint"):
            record.pop(field, None)
    except BaseException:  # interrupted (disk full, Ctrl-C): no plaintext, no bundle left, the device as it was
        if not opts.keep_plaintext:
            _remove_plaintext(d)
        (d / "model.kes").unlink(missing_ok=True)
        give_back(database, row["id"], worker, row["state"] if row["state"] in RELEASABLE else "trained")
        raise
    finally:
        key.wipe()
    record["hashes"] = _hashes(d)
    if not opts.keep_plaintext:
        _remove_plaintext(d)
    record.update(state="failed" if failure else "released", reason=str(failure) if failure else None,
                  seconds=round(time.perf_counter() - t0, 3), finished_at=now())
    with db.transaction(database) as conn:
        mine = conn.execute(devices.update().where(devices.c.id == row["id"]).where(devices.c.lease_owner == worker)
                            .where(devices.c.state == "releasing")
                            .values(state=record["state"], lease_owner=None, lease_expires=None,
                                    updated_at=record["finished_at"])).rowcount
        if mine:
            if not failure:  # the bundle it replaces (a rotated key's) is revoked
                conn.execute(releases.update().where(releases.c.device == row["id"])
                             .where(releases.c.state == "released")
                             .values(state="revoked", reason=f"superseded by release {number}",
                                     revoked_at=record["finished_at"]))
            conn.execute(releases.insert().values(device=row["id"], **record))
            conn.execute(events.insert().values(
                device=row["id"], kind="released" if not failure else "release_failed",
                detail={"worker": worker, "number": number, "step": failure.step if failure else None,
                        "bundle_sha256": record.get("bundle_sha256"), "seconds": record["seconds"],
                        "steps": timings},
                at=record["finished_at"]))
    if not mine:
        (d / "model.kes").unlink(missing_ok=True)
        echo(f"{row['device_id']}: the lease was lost while releasing (revoked, rotated or taken over); "
             "not recorded", err=True)
        return "lease lost"
    if failure:
        echo(f"NOT released {row['device_id']}: {failure}", err=True)
        return str(failure)
    echo(f"released {row['device_id']} r{number} ({record['fold_mode']}, {row['target']}): parity passed (clean "
         f"{100 * record['clean']:.1f}%, transfer {_pct(record['transfer'])}), audit passed; {record['bundle_path']} "
         f"({record['bundle_bytes']:,} bytes, sha256 {record['bundle_sha256'][:16]}...) signed by "
         f"{record['publisher_fingerprint']}" + ("" if not opts.keep_plaintext else "; plaintext kept"))
    return "released"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"

