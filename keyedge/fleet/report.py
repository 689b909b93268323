"""``keyedge fleet report``: the blast radius across a sample of the fleet's devices (``keyedge``'s own
K x K measurement, :func:`~keyedge.redteam.evaluate.blast_radius`), and what each device costs: its adapter
(or model) bytes, its training and release time and its bundle, against one full model. A device that
serves a random ensemble is attacked, and scored, on its expected answer (the mean probability over all of
its members: EOT over its draw, exactly); its per-device weights are all of its members'."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_text, check_output_dir, staged_dir
from ..core.keyset import KeySet, key_or_set_from_bytes
from ..core.manifests import read_run, write_json
from ..core.progress import Echo, echo
from ..core.tables import markdown_table, pct
from . import db
from .pinned import ensemble_size, fleet_row, open_vault
from .schema import devices, events, releases

def _costs(conn) -> list[dict[str, Any]]:
    """Per device with a run: its current run's bytes and training time, its latest release's time and
    bundle."""
    rows = conn.execute(devices.select().where(devices.c.run_dir.is_not(None)).order_by(devices.c.device_id)).all()
    trained: dict[tuple[int, str], dict[str, Any]] = {}
    for e in conn.execute(events.select().where(events.c.kind == "trained").order_by(events.c.id)):
        trained[(e.device, e.detail.get("run"))] = e.detail
    latest: dict[int, Any] = {}
    for r in conn.execute(releases.select().order_by(releases.c.number)):
        latest[r.device] = r
    costs = []
    for d in rows:
        detail, rel = trained.get((d.id, d.run_dir), {}), latest.get(d.id)
        if rel is not None and rel.run_dir != d.run_dir:
            rel = None  # a release of a rotated key's run
        costs.append({"device": d.device_id, "target": d.target, "state": d.state,
                      "key_fingerprint": d.key_fingerprint, "adapter_bytes": detail.get("per_key_bytes"),
                      "full_model_bytes": detail.get("full_model_bytes"), "train_seconds": detail.get("seconds"),
                      "test_acc": detail.get("test_acc"),
                      "release_seconds": rel.seconds if rel is not None else None,
                      "release_state": rel.state if rel is not None else None,
                      "bundle_bytes": rel.bundle_bytes if rel is not None else None, "run": d.run_dir})
    return costs


def fleet_report(database: str, master: bytearray, out: Path, *, sample: int = 4, n: int = 100, seed: int = 0,
                 force: bool = False, echo: Echo = echo) -> dict[str, Any]:
    """Write ``report.md`` and ``report.json`` into ``out``: the blast radius over ``sample`` trained
    devices (drawn with ``seed``) on ``n`` test images, and every trained device's cost."""
    from ..core.data import run_images
    from ..core.ensemble import is_ensemble, load_members, read_ensemble
    from ..core.runs import load_run
    from ..redteam.attacks.randomized import ExpectedOutput
    from ..redteam.config import EvalConfig
    from ..redteam.evaluate import blast_radius

    if sample < 2:
        raise KeyedgeError("--sample must be at least 2: the blast radius is across devices")
    check_output_dir(out, force)
    with db.transaction(database) as conn:
        spec = fleet_row(conn, database)
        costs = _costs(conn)
        mode = spec.mode
    if len(costs) < 2:
        raise KeyedgeError(f"the fleet has {len(costs)} trained device(s): the report needs two (keyedge fleet train)")
    vault = open_vault(spec, master)
    chosen = sorted(random.Random(seed).sample([c["device"] for c in costs], min(sample, len(costs))))
    by_device = {c["device"]: c for c in costs}
    runs = {c["device"]: Path(c["run"]) for c in costs}
    models = {}
    for device in chosen:  # a revoked device's model too: a stolen device is what the blast radius is about
        key = key_or_set_from_bytes(vault.key_file(device, by_device[device]["key_fingerprint"]),
                                    source=f"the vault's key of {device}")
        models[device] = (ExpectedOutput(load_members(runs[device], key)) if isinstance(key, KeySet)
                          else load_run(runs[device], key))
    first = runs[chosen[0]]
    images = run_images(read_run(first / read_ensemble(first).members[0].run if is_ensemble(first) else first), n,
                        seed=seed)
    if images is None:
        raise KeyedgeError(f"the fleet's data set {spec.data} is not here")
    echo(f"blast radius across {len(chosen)} devices on {n} images (white-box PGD of each, replayed on the others)")
    blast = blast_radius(models, *images, EvalConfig(n=n, seed=seed))
    report = {"fleet": {"model": spec.model, "mode": mode, "block_size": spec.block_size,
                        "base_sha256": spec.base_sha256, "ensemble": ensemble_size(spec)},
              "blast_radius": blast, "costs": costs, "summary": _summary(costs, blast)}
    with staged_dir(out, force=force) as stage:
        write_json(stage / "report.json", report)
        atomic_write_text(stage / "report.md", report_markdown(report))
    s = report["summary"]
    echo(f"wrote {out / 'report.md'} and {out / 'report.json'}: off-diagonal (another device's white-box examples) "
         f"mean {pct(s['cross_device_robust_mean'])}, diagonal {pct(s['own_whitebox_robust_mean'])}; adapter "
         f"{_kib(s['adapter_bytes_median'])} per device against a {_kib(s['full_model_bytes'])} model")
    return report


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _summary(costs: list[dict[str, Any]], blast: dict[str, Any]) -> dict[str, Any]:
    m, k = blast["matrix"], len(blast["matrix"])
    off = [m[i][j] for i in range(k) for j in range(k) if i != j]
    full = _median([c["full_model_bytes"] for c in costs])
    adapter = _median([c["adapter_bytes"] for c in costs])
    return {"devices": len(costs), "sampled": k,
            "cross_device_robust_mean": sum(off) / len(off), "cross_device_robust_min": min(off),
            "own_whitebox_robust_mean": sum(m[i][i] for i in range(k)) / k,
            "adapter_bytes_median": adapter, "full_model_bytes": full,
            "adapter_to_model": adapter / full if adapter and full else None,
            "train_seconds_median": _median([c["train_seconds"] for c in costs]),
            "release_seconds_median": _median([c["release_seconds"] for c in costs]),
            "bundle_bytes_median": _median([c["bundle_bytes"] for c in costs])}


def _kib(v: float | None) -> str:
    return "—" if v is None else f"{v / 1024:,.0f} KiB"


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} s"


def report_markdown(report: dict[str, Any]) -> str:
    b, s, f = report["blast_radius"], report["summary"], report["fleet"]
    eps = b["attack"]["eps"] * 255
    n = f.get("ensemble")
    of = f", every device a random ensemble of {n} keyed members" if n else ""
    lines = [f"# keyedge fleet report: {f['model']} ({f['mode']}{of}), {s['devices']} trained devices", "",
             f"## Blast radius: {s['sampled']} devices, {b['n_images']} test images", "",
             "Attacker: has everything of device A (" + (
                 "every member's weights and key: white-box PGD on its expected answer, the mean probability over "
                 "all its members" if n else "its weights and its key: white-box PGD") + f" l_inf "
             f"{eps:.0f}/255, {b['attack']['steps']} steps), and replays those examples on device B, whose key"
             + (" set" if n else "") + " and model it does not have. Each cell is B's robust accuracy (right on "
             "the clean image and on the example" + ("; B scored on its expected answer" if n else "")
             + "). The diagonal is the white-box bound: a device whose key" + (" set" if n else "")
             + " leaked.", "",
             markdown_table(["crafted on \\ replayed on", *b["devices"]],
                            [[a, *(pct(v) for v in row)] for a, row in zip(b["devices"], b["matrix"])]), "",
             "Clean: " + ", ".join(f"{d} {pct(c)}" for d, c in zip(b["devices"], b["clean"])) + ".", "",
             f"Off the diagonal (one device's leak used against another): mean {pct(s['cross_device_robust_mean'])}, "
             f"lowest {pct(s['cross_device_robust_min'])}; on it: mean {pct(s['own_whitebox_robust_mean'])}.", "",
             "## Per-device cost", "",
             f"Median: {_kib(s['adapter_bytes_median'])} of per-device weights against one full model of "
             f"{_kib(s['full_model_bytes'])}" + (f" ({100 * s['adapter_to_model']:.1f}%)" if s["adapter_to_model"]
                                                  else "")
             + f"; training {_s(s['train_seconds_median'])}, release {_s(s['release_seconds_median'])}, bundle "
               f"{_kib(s['bundle_bytes_median'])}.", "",
             markdown_table(["device", "target", "state", "per-device weights", "full model", "train", "test acc",
                             "release", "bundle"],
                            [[c["device"], c["target"], c["state"], _kib(c["adapter_bytes"]),
                              _kib(c["full_model_bytes"]), _s(c["train_seconds"]), pct(c["test_acc"]),
                              _s(c["release_seconds"]) + (f" ({c['release_state']})" if c["release_state"] else ""),
                              _kib(c["bundle_bytes"])] for c in report["costs"]]), ""]
    return "\n".join(lines)
