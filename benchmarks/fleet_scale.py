"""The fleet registry's measured limits, SQLite and PostgreSQL side by side in one run, through keyedge's own
fleet code (no training: the database, the claims and the vault):

* enroll N devices (``--devices``, default 10,000) in all-or-nothing batches of ``--batch`` (a CSV each);
* claims per second with 1, 4 and 8 concurrent claimer processes (``fleet train``'s own ``claim``) over
  ``--claim-devices`` devices, and the double claims (must be 0);
* ``fleet status`` (its JSON) latency, and database bytes per device, at N devices;
* the vault's size and open time at N keys.

PostgreSQL: a throwaway cluster in a temporary directory on a unix socket (as ``nobody`` when run as
root), started and stopped here; skipped where ``initdb`` is not installed.

    python benchmarks/fleet_scale.py --out benchmarks/results/fleet_scale_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from keyedge.core.progress import quiet
from keyedge.fleet import commands
from keyedge.fleet.leases import claim
from keyedge.fleet.vault import Vault
from keyedge.runtime.bundle import DeviceKey
from keyedge.runtime.platform import cpu


@contextlib.contextmanager
def postgres_server():
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                                                        reverse=True)), None)
    if initdb is None:
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="keyedge-pg-bench-"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "nobody")
    pg_ctl = str(Path(initdb).parent / "pg_ctl")
    subprocess.run([*as_user, str(initdb), "-D", str(root / "data"), "-U", "keyedge", "--auth=trust"], check=True,
                   capture_output=True)
    port = "25432"
    subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-w", "-l", str(root / "log"), "-o",
                    f"-p {port} -k {root} -c listen_addresses=''", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://keyedge@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _claimer(db: str, worker: str, ready, start, queue) -> None:
    from keyedge.fleet.leases import leased_elsewhere

    leased_elsewhere(db)  # imported and connected before the clock starts
    ready.put(worker)
    start.wait()
    mine = []
    while (row := claim(db, worker, 3600)) is not None:
        mine.append(row["device_id"])
    queue.put(mine)


def _reset(db: str, n: int) -> None:
    import sqlalchemy as sa

    from keyedge.fleet import db as fleet_db
    from keyedge.fleet.schema import devices

    with fleet_db.transaction(db) as conn:
        conn.execute(devices.update().values(state="trained", lease_owner=None, lease_expires=None))
        ids = [r.id for r in conn.execute(sa.select(devices.c.id).order_by(devices.c.id).limit(n))]
        conn.execute(devices.update().where(devices.c.id.in_(ids)).values(state="enrolled"))


def _db_bytes(db: str) -> int:
    import sqlalchemy as sa

    if "://" not in db:
        import sqlite3

        with sqlite3.connect(db) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(p.stat().st_size for p in Path(db).parent.glob(Path(db).name + "*"))
    engine = sa.create_engine(db)
    try:
        with engine.connect() as c:
            return int(c.execute(sa.text("SELECT pg_database_size(current_database())")).scalar())
    finally:
        engine.dispose()


def measure(db: str, root: Path, n: int, batch: int, claim_n: int) -> dict:
    (root / "base.safetensors").write_bytes(os.urandom(1024))
    master = commands.MasterKey(root / "master.key")
    empty = None
    commands.init(db, commands.FleetSpec(root / "base.safetensors", "vit_tiny_patch16_224", {}, "digits", 4),
                  root / "fleet.vault", master, echo=quiet)
    empty = _db_bytes(db)
    pubs = root / "pubs"
    pubs.mkdir()
    rows = []
    for i in range(n):
        (pubs / f"d{i}.pub").write_bytes(DeviceKey.generate().public.to_bytes())
        rows.append(commands.Enrollment(f"dev-{i:06d}", pubs / f"d{i}.pub", "jetson-orin"))
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        commands.enroll(db, rows[start:start + batch], master, echo=quiet)
    enroll_s = time.perf_counter() - t0
    result = {"devices": n, "enroll_batch": batch, "enroll_s": enroll_s, "enroll_devices_per_s": n / enroll_s}
    times = []
    for _ in range(3):
        t = time.perf_counter()
        commands.status(db)
        times.append(time.perf_counter() - t)
    result["status_s_median"] = statistics.median(times)
    result["db_bytes_per_device"] = (_db_bytes(db) - empty) / n
    vault = root / "fleet.vault"
    key = master.read()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        Vault.open(vault, key)
        times.append(time.perf_counter() - t)
    result.update(vault_bytes=vault.stat().st_size, vault_open_s_median=statistics.median(times))
    result["claims"] = {}
    ctx = mp.get_context("spawn")
    for claimers in (1, 4, 8):
        _reset(db, claim_n)
        queue, ready, start = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_claimer, args=(db, f"w{i}", ready, start, queue)) for i in range(claimers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get()
        t = time.perf_counter()
        start.set()
        got = [queue.get() for _ in procs]
        elapsed = time.perf_counter() - t
        for p in procs:
            p.join()
        claimed = [d for g in got for d in g]
        result["claims"][str(claimers)] = {"devices": claim_n, "claimed": len(claimed),
                                           "double_claims": len(claimed) - len(set(claimed)),
                                           "claims_per_s": len(claimed) / elapsed, "seconds": elapsed}
        print(db.split(":")[0], claimers, result["claims"][str(claimers)], flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1_000)
    ap.add_argument("--claim-devices", type=int, default=2_000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "sqlite").mkdir()
        results["sqlite"] = measure(str(root / "sqlite" / "fleet.db"), root / "sqlite", args.devices, args.batch,
                                    args.claim_devices)
        print("sqlite", json.dumps(results["sqlite"]), flush=True)
        with postgres_server() as url:
            if url is None:
                results["postgresql"] = "not measured: PostgreSQL's server (initdb) is not installed"
            else:
                (root / "pg").mkdir()
                results["postgresql"] = measure(url, root / "pg", args.devices, args.batch, args.claim_devices)
    name, flags = cpu()
    results.update(cpu=f"{name} ({', '.join(flags)})", cores=os.cpu_count(),
                   command="python benchmarks/fleet_scale.py")
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
