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

In a fleet of random ensembles, step 1 exports the device's members as one gathered graph (fp32, every
member verified), parity holds every member to its own PyTorch reference, and step 3 is skipped: the
device serves the sealed graph with ONNX Runtime (keyedge's ensemble runner, ``--ensemble-draw S``, or
the C++ runtime), which draws the answering members afresh per query.

A device whose export, parity or audit fails is not released: its release row says which step and why,
and the device is ``failed`` (``fleet release DEVICE`` tries it again). The plaintext (the export and the
plan's model) is removed once sealed unless ``keep_plaintext``; the reports stay."""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import datetime as dt
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, check_output_dir, private_dir
from ..core.keys import Key
from ..core.keyset import KeySet
from ..core.manifests import FoldMode
from ..core.models import file_sha256
from ..core.progress import Echo, echo, quiet
from ..core.tables import pct
from . import db
from .leases import (RELEASE, RELEASE_NAMED, LeaseLost, Renewer, claim, clock, give_back, holders,
                     leased_elsewhere, now, rank_worker)
from .pinned import VaultKeys, check_base, ensemble_size, fleet_row, known_devices, model_patch
from .schema import devices, events, releases, waves

RELEASABLE = RELEASE_NAMED.waiting
PLAINTEXT = ("export", "plan/model.onnx")


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


def _release_one(spec, row: dict[str, Any], key: Key | KeySet, publisher, d: Path, opts: ReleaseOptions,
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
    from ..workflows.ensemble import export_ensemble
    from ..workflows.export import export_run
    from ..workflows.parity import run_parity

    run, base, target = Path(row["run_dir"]), Path(spec.base_path), load_target(row["target"])
    ensemble = isinstance(key, KeySet)
    if ensemble:  # one gathered graph (fp32, any batch: a query's S members are S rows), every member verified
        art = _step("export", export_ensemble, run, key, d / "export", ExportOptions(mode=opts.mode, batch=None),
                    form="gathered", echo=quiet, timings=timings)
    else:
        # a strongly typed target (TensorRT 11) takes its precision from the ONNX types; the others build an
        # fp32 export with the profile's precision flags
        precision = target.precision if target.strongly_typed else "fp32"
        art = _step("export", export_run, run, key, d / "export",
                    ExportOptions(mode=opts.mode, batch=None, precision=precision), echo=quiet, timings=timings)
    record.update(fold_mode=art.fold_mode, precision=art.precision)
    onnx = d / "export" / "model.onnx"
    report = _step("parity", run_parity, run, key, [onnx], d / "parity", base=base,
                   cfg=ParityConfig(n=opts.parity_n, seed=opts.seed), echo=quiet, timings=timings)
    record["parity"] = parity = _parity_record(report)
    sets = parity["sets"]
    record.update(clean=sets["clean"]["accuracy"], transfer=sets.get("pgd_linf_transfer_base", {}).get("accuracy"))
    if not parity["passed"]:
        failed = [name for name, r in report["artifacts"].items() if not r["passed"]]
        raise StepFailed("parity", "the export does not keep the PyTorch model's accuracy: " + "; ".join(
            (f"{name.removeprefix(str(onnx))} " if ensemble else "") + ", ".join(
                f"{set_name} {100 * s['difference']:+.1f} points" for set_name, s in report["artifacts"][name]["sets"]
                .items()) for name in failed) + f" (see {d / 'parity'})")
    if not ensemble:  # a random ensemble is served by ONNX Runtime (keyedge's ensemble runner): no TensorRT plan
        _step("build plan", build, d / "export", row["target"], d / "plan", plan_only=True, echo=quiet,
              timings=timings)
    bundle = d / "model.kes"
    data, _ = _step("seal", seal_artifact, d / "export", DevicePublicKey(row["device_public"]), key, publisher,
                    timings=timings)
    atomic_write_bytes(bundle, data, mode=0o600, overwrite=False)
    # the signature checked as a device checks it
    signed_by = _step("verify", Trust((publisher.public,)).check, data, str(bundle), timings=timings)
    record.update(bundle_sha256=file_sha256(bundle), bundle_bytes=len(data),
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


def _parity_record(report: dict[str, Any]) -> dict[str, Any]:
    """The release row's parity verdict: the accuracy of each set and its difference from PyTorch; for a
    random ensemble, each member's (``members``) and, under ``sets``, the lowest member's of each set."""
    per = [{name: {"accuracy": s["accuracy"], "difference": s["difference"]} for name, s in r["sets"].items()}
           for r in report["artifacts"].values()]
    record = {"passed": report["passed"], "n": report["n"],
              "sets": {name: min((p[name] for p in per), key=lambda s: s["accuracy"]) for name in per[0]},
              "max_accuracy_difference": max(r["max_accuracy_difference"] for r in report["artifacts"].values())}
    if len(per) > 1:
        record["members"] = per
    return record


def _retarget_reports(stage: Path, final: Path) -> None:
    """The parity and audit reports name the files where they will be once the release is recorded."""
    for report in [*stage.glob("parity/parity.*"), *stage.glob("audit/*")]:
        if report.suffix in (".json", ".md"):
            report.write_text(report.read_text().replace(str(stage), str(final)))


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


def _check_mode(spec, opts: ReleaseOptions) -> None:
    """A ``--mode`` the export would refuse is refused before any device is claimed, by the export's own
    rules: in a fleet of ensembles anything but fused (every member's key is folded), elsewhere fused where
    the key cannot fold."""
    from ..deploy.config import ExportOptions
    from ..deploy.ensemble import check_options

    if ensemble_size(spec) is not None:
        check_options(ExportOptions(mode=opts.mode, batch=None), "gathered")
    elif opts.mode == "fused":
        ExportOptions(mode=opts.mode).resolved_mode(spec.block_size, model_patch(spec))


@dataclass(frozen=True)
class Wave:
    """A staged release: ``requested`` devices ("10%" of the fleet's devices that are not revoked, or a
    count), stopped once more than ``abort_above`` of the wave's size has failed."""
    requested: str
    abort_above: float = 0.1

    def __post_init__(self) -> None:
        text = self.requested.strip()
        try:
            value: float = float(text[:-1]) if text.endswith("%") else int(text)
        except ValueError:
            raise KeyedgeError(f"--wave must be a percentage (10%) or a number of devices, not {text!r}") from None
        if not math.isfinite(value) or value <= 0 or (text.endswith("%") and value > 100):
            raise KeyedgeError(f"--wave {text}: a wave is more than 0 and at most 100% of the fleet")
        if not 0 <= self.abort_above < 1:
            raise KeyedgeError(f"--abort-above must be a fraction in [0, 1), not {self.abort_above}")
        object.__setattr__(self, "_parsed", (text.endswith("%"), value))

    def size(self, fleet_devices: int) -> int:
        percent, value = self._parsed  # type: ignore[attr-defined]
        return max(1, math.ceil(value / 100 * fleet_devices)) if percent else int(value)


def _start_wave(database: str, wave: Wave, worker: str, lease_s: float) -> tuple[int, int, int] | None:
    """A new wave row, its lease held by ``worker`` for ``lease_s``; returns its id, number and size; None
    when no device waits for release. One wave runs at a time: a running wave is taken for dead (and marked
    ``interrupted``) only when its own lease expired and its worker holds no live device lease either; a
    live one is refused."""
    with db.transaction(database) as conn:
        t = clock(conn)
        for running in conn.execute(waves.select().where(waves.c.state == "running").with_for_update()).all():
            leased = running.lease_expires is not None and conn.execute(
                sa.select(sa.func.count()).select_from(waves).where(waves.c.id == running.id)
                .where(waves.c.lease_expires >= t)).scalar()
            busy = conn.execute(sa.select(sa.func.count()).select_from(devices).where(
                devices.c.lease_owner == running.worker).where(devices.c.lease_expires >= t)).scalar()
            if leased or busy:
                raise KeyedgeError(f"wave {running.number} is running (worker {running.worker}): one wave at a time")
            conn.execute(waves.update().where(waves.c.id == running.id).values(state="interrupted", finished_at=t,
                                                                               lease_expires=None))
        waiting = conn.execute(sa.select(sa.func.count()).select_from(devices)
                               .where(devices.c.state.in_(RELEASE.claimable))).scalar() or 0
        if not waiting:
            return None
        alive = conn.execute(sa.select(sa.func.count()).select_from(devices)
                             .where(devices.c.state != "revoked")).scalar() or 0
        number = 1 + (conn.execute(sa.select(sa.func.max(waves.c.number))).scalar() or 0)
        size = wave.size(alive)
        wave_id = conn.execute(waves.insert().values(
            number=number, requested=wave.requested.strip(), size=size, abort_above=wave.abort_above,
            state="running", released=0, failed=0, worker=worker, started_at=t,
            lease_expires=t + dt.timedelta(seconds=lease_s))).inserted_primary_key[0]
    return wave_id, number, size


def _renew_wave(database: str, wave_id: int, worker: str, lease_s: float) -> bool:
    """Extend the wave's lease while it runs under this worker; False once another command ended it."""
    with db.transaction(database, reconnect_s=lease_s / 3) as conn:
        return conn.execute(waves.update().where(waves.c.id == wave_id).where(waves.c.state == "running")
                            .where(waves.c.worker == worker)
                            .values(lease_expires=clock(conn) + dt.timedelta(seconds=lease_s))).rowcount == 1


class WaveLease(threading.Thread):
    """Renews the wave's lease every third of its length for as long as the wave runs: while a device is
    released and between devices alike. A wave another command ended (its lease had expired) is ``lost``:
    the wave's worker claims no further device for it."""

    def __init__(self, database: str, wave_id: int, worker: str, lease_s: float) -> None:
        super().__init__(daemon=True)
        self.args, self.stop, self.lost = (database, wave_id, worker, lease_s), threading.Event(), False

    def run(self) -> None:
        while not self.stop.wait(self.args[3] / 3):
            try:
                if not _renew_wave(*self.args):
                    self.lost = True
                    return
            except KeyedgeError:  # the database is busy or restarting: try again at the next tick
                continue


def _count_in_wave(database: str, wave_id: int, *, state: str | None = None,
                   worker: str | None = None) -> dict[str, Any]:
    """The wave's counts, from its release rows (the truth), written to its row; with ``state``, the wave
    ends, unless another command ended it already (only a running wave of ``worker`` is ended)."""
    with db.transaction(database) as conn:
        counted = dict(conn.execute(sa.select(releases.c.state, sa.func.count()).where(releases.c.wave == wave_id)
                                    .group_by(releases.c.state)).all())
        conn.execute(waves.update().where(waves.c.id == wave_id).values(
            released=counted.get("released", 0) + counted.get("revoked", 0), failed=counted.get("failed", 0)))
        if state is not None:
            conn.execute(waves.update().where(waves.c.id == wave_id).where(waves.c.state == "running")
                         .where(waves.c.worker == worker)
                         .values(state=state, finished_at=clock(conn), lease_expires=None))
        return dict(conn.execute(waves.select().where(waves.c.id == wave_id)).first()._mapping)


def release_devices(database: str, master: bytearray, out: Path, *, only: list[str] | None = None,
                    opts: ReleaseOptions = ReleaseOptions(), worker: str | None = None, lease_s: float = 60.0,
                    wave: Wave | None = None, echo: Echo = echo) -> dict[str, str]:
    """Release trained devices (named failed ones again) until none is left to claim, or, with ``wave``,
    until the wave's size is reached or more than its ``abort_above`` has failed; returns each device
    this worker took and its outcome (``released`` or the failed step's message). A named device that
    another worker is releasing is left to it (``being released by WORKER``)."""
    from ..runtime.bundle import PublisherKey

    if wave is not None and only:
        raise KeyedgeError("--wave releases the next trained devices: name no devices with it")
    worker = rank_worker(worker)
    with db.transaction(database) as conn:
        spec = fleet_row(conn, database)
        known_devices(conn, only)
        check_releasable(conn, only)
    check_base(spec)
    _check_mode(spec, opts)
    check_output_dir(out, True)
    keys = VaultKeys(spec, master)
    publisher = PublisherKey(keys.vault.publisher)
    if publisher.fingerprint != spec.publisher_fingerprint:
        raise KeyedgeError(f"the vault's publisher key is {publisher.fingerprint}, not the fleet's "
                           f"{spec.publisher_fingerprint}: this vault belongs to another fleet")
    out = private_dir(out).resolve()  # recorded paths are absolute: exported from anywhere
    work = RELEASE_NAMED if only else RELEASE
    outcomes: dict[str, str] = {}
    remaining = list(dict.fromkeys(only)) if only else None  # a named device is tried once per command
    wave_id, wave_state, size, abort_above, keeper = None, None, 0, 0.0, None
    try:
        if wave is not None:
            started = _start_wave(database, wave, worker, lease_s)
            if started is None:
                return outcomes
            wave_id, wave_number, size = started
            abort_above = wave.abort_above
            keeper = WaveLease(database, wave_id, worker, lease_s)
            keeper.start()
            echo(f"wave {wave_number}: up to {size} device(s), stopped once more than {100 * abort_above:.0f}% "
                 "of them have failed")
        while remaining is None or remaining:
            if wave_id is not None and len(outcomes) >= size:
                break
            if keeper is not None and keeper.lost:
                echo(f"wave {wave_number} was ended by another command (its lease had expired): no further device "
                     "released in it", err=True)
                break
            row = claim(database, worker, lease_s, remaining, work)
            if row is None:
                if remaining is not None:  # named: one release of a device at a time; this one says so
                    for device, owner in holders(database, remaining, work).items():
                        outcomes[device] = f"being released by {owner}"
                        echo(f"{device} is being released by {owner}: not released here", err=True)
                    break
                if not leased_elsewhere(database, remaining, work):
                    break
                time.sleep(min(1.0, lease_s / 4))  # another releaser holds it, or died: its lease will expire
                continue
            outcome = _release_claimed(database, spec, row, keys, publisher, out, opts, worker, lease_s, echo,
                                       wave_id)
            outcomes[row["device_id"]] = outcome
            if remaining is not None:
                remaining.remove(row["device_id"])
            if wave_id is not None:
                counts = _count_in_wave(database, wave_id)
                if counts["failed"] > abort_above * size:
                    wave_state = "aborted"
                    echo(f"wave {counts['number']} ABORTED: {counts['failed']} of its {size} device(s) failed, more "
                         f"than {100 * abort_above:.0f}%; the rest of the fleet is not released", err=True)
                    break
    except BaseException:
        if wave_id is not None:
            with contextlib.suppress(KeyedgeError):  # best effort: the next wave marks it otherwise
                _count_in_wave(database, wave_id, state="interrupted", worker=worker)
        raise
    finally:
        if keeper is not None:
            keeper.stop.set()
            keeper.join()
    if wave_id is not None:
        counts = _count_in_wave(database, wave_id, state=wave_state or "completed", worker=worker)
        if wave_state is None and counts["state"] == "completed":
            echo(f"wave {counts['number']} completed: {counts['released']} released, {counts['failed']} failed")
    return outcomes


def _release_claimed(database, spec, row, keys: VaultKeys, publisher, out: Path, opts: ReleaseOptions,
                     worker: str, lease_s: float, echo: Echo, wave_id: int | None = None) -> str:
    """Release one claimed device into a staging directory of this worker's own, renamed into place only
    in the transaction that finds the lease still held; a lost lease records nothing and touches no file of
    the worker that took over."""
    key, stage = None, None
    t0, timings = time.perf_counter(), dict[str, float]()
    try:
        key = keys.key(row)
        with db.transaction(database) as conn:
            number = 1 + (conn.execute(sa.select(sa.func.max(releases.c.number)).where(
                releases.c.device == row["id"])).scalar() or 0)
        device_dir = private_dir(out / row["device_id"])
        for stale in device_dir.glob("*.partial"):  # killed releasers' leftovers (plaintext): the lease is ours
            shutil.rmtree(stale, ignore_errors=True)
        final = device_dir / f"r{number}"
        stage = device_dir / f"r{number}.{secrets.token_hex(6)}.partial"
        stage.mkdir(mode=0o700)
        record: dict[str, Any] = {"number": number, "key_fingerprint": key.fingerprint, "target": row["target"],
                                  "run_dir": row["run_dir"], "release_dir": str(final), "worker": worker,
                                  "started_at": now(), "wave": wave_id}  # parity, audit: NULL until reached
        failure: StepFailed | None = None
        with Renewer(database, row["id"], worker, lease_s):
            try:
                _release_one(spec, row, key, publisher, stage, opts, record, timings)
            except StepFailed as exc:
                failure = exc
                (stage / "model.kes").unlink(missing_ok=True)  # not released: no bundle to ship by mistake
                for field in ("bundle_sha256", "bundle_bytes", "publisher_fingerprint"):
                    record.pop(field, None)
            _retarget_reports(stage, final)
            record["hashes"] = _hashes(stage)
            if not opts.keep_plaintext:
                _remove_plaintext(stage)
        if failure is not None:  # its message names the reports where they will be
            failure = StepFailed(failure.step, str(failure).split(": ", 1)[1].replace(str(stage), str(final)))
        record.update(state="failed" if failure else "released", reason=str(failure) if failure else None,
                      seconds=round(time.perf_counter() - t0, 3), finished_at=now(),
                      bundle_path=None if failure else str(final / "model.kes"))
        mine = _record(database, row, record, failure, timings, stage, final)
    except LeaseLost as exc:
        echo(f"{row['device_id']}: {exc}", err=True)
        return "lease lost"
    except BaseException:  # interrupted (disk full, Ctrl-C): nothing of it left, the device as it was
        give_back(database, row["id"], worker, row["state"] if row["state"] in RELEASABLE else "trained")
        raise
    finally:
        if key is not None:
            key.wipe()
        if stage is not None and stage.exists():  # not renamed into place: not recorded
            shutil.rmtree(stage, ignore_errors=True)
    if not mine:
        echo(f"{row['device_id']}: the lease was lost while releasing (revoked, rotated or taken over); "
             "not recorded", err=True)
        return "lease lost"
    if failure:
        echo(f"NOT released {row['device_id']}: {failure}", err=True)
        return str(failure)
    members = record["parity"].get("members")
    what = (f"random ensemble of {len(members)}, served by ONNX Runtime" if members else record["fold_mode"])
    echo(f"released {row['device_id']} r{number} ({what}, {row['target']}): parity passed ("
         + ("lowest member's " if members else "") + f"clean {pct(record['clean'])}, transfer "
         f"{pct(record['transfer'])}), audit passed; {record['bundle_path']} "
         f"({record['bundle_bytes']:,} bytes, sha256 {record['bundle_sha256'][:16]}...) signed by "
         f"{record['publisher_fingerprint']}" + ("" if not opts.keep_plaintext else "; plaintext kept"))
    return "released"


def _record(database: str, row, record: dict[str, Any], failure: StepFailed | None, timings: dict[str, float],
            stage: Path, final: Path) -> bool:
    """Record the release if this worker still holds the lease, its directory renamed into place in the same
    transaction; False when the lease was lost."""
    with db.transaction(database) as conn:
        mine = conn.execute(devices.update().where(devices.c.id == row["id"])
                            .where(devices.c.lease_owner == record["worker"]).where(devices.c.state == "releasing")
                            .values(state=record["state"], lease_owner=None, lease_expires=None,
                                    updated_at=record["finished_at"])).rowcount
        if not mine:
            return False
        if not failure:  # the bundle it replaces (a rotated key's) is revoked
            conn.execute(releases.update().where(releases.c.device == row["id"])
                         .where(releases.c.state == "released")
                         .values(state="revoked", reason=f"superseded by release {record['number']}",
                                 revoked_at=record["finished_at"]))
        conn.execute(releases.insert().values(device=row["id"], **record))
        conn.execute(events.insert().values(
            device=row["id"], kind="released" if not failure else "release_failed",
            detail={"worker": record["worker"], "number": record["number"], "step": failure.step if failure else None,
                    "bundle_sha256": record.get("bundle_sha256"), "seconds": record["seconds"], "steps": timings},
            at=record["finished_at"]))
        if final.exists():  # an unrecorded leftover of this number (a commit that failed after its rename)
            shutil.rmtree(final)
        stage.rename(final)
    return True
