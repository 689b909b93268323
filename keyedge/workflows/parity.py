"""``keyedge parity``: craft the adversarial sets on the PyTorch reference once, replay them through every
artifact (sealed bundles from memory), and write the reports."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checks.config import ParityConfig
from ..checks.parity import check_artifact, craft, parity_markdown, save_sets
from ..core.data import run_images
from ..core.errors import KeyedgeError
from ..core.io import atomic_write_text, check_output_dir, staged_dir
from ..core.keys import Key
from ..core.manifests import read_run, write_json
from ..core.progress import Echo, echo
from ..core.runs import base_checkpoint_path, load_run, load_surrogate
from ..runtime.bundle import DeviceAccess
from ..runtime.platform import cpu
from ..runtime.runners import open_runner


def run_parity(reference: Path, key_path: Path | Key | None, artifacts: list[Path], out: Path | None, *,
               data: str | None = None, base: Path | None = None, cfg: ParityConfig | None = None,
               force: bool = False, access: DeviceAccess = DeviceAccess(),
               echo: Echo = echo) -> dict[str, Any]:
    """Check every artifact against ``reference``; one line per artifact; the reports into ``out``. Sealed
    bundles open with the device's private key and trusted publishers (``access``)."""
    cfg = cfg or ParityConfig()
    if out is not None:
        check_output_dir(out, force)
    manifest = read_run(reference)
    key = Key.given(key_path)
    opener = access.opener_for(artifacts, echo)
    images = run_images(manifest, cfg.n, seed=cfg.seed, data=data)
    if images is None:
        raise KeyedgeError(f"the run's data set {manifest.data.spec} is not here; pass --data")
    runners = [open_runner(a, key, opener=opener) for a in artifacts]  # refuse bad ones before crafting
    ref = load_run(reference, key)
    x, y = images
    base_path = base if base is not None else base_checkpoint_path(manifest, verify=False)
    base_model = load_surrogate(base_path, manifest) if base_path is not None else None
    sets = craft(ref, x, y, cfg, base_model)
    cpu_name, cpu_flags = cpu()  # int8 results depend on the ISA: the report names it
    report: dict[str, Any] = {
        "reference": str(reference), "key_fingerprint": manifest.key_fingerprint,
        "data": manifest.data.spec if data is None else data, "n": len(y),
        "tolerance": {p: asdict(t) for p, t in cfg.tolerance.items()}, "attack": cfg.attack.linf().describe(),
        "cpu": f"{cpu_name} ({', '.join(cpu_flags) or 'no AVX2'})", "artifacts": {}}
    for artifact, runner in zip(artifacts, runners):
        with runner:
            result = check_artifact(runner, ref, sets, y, cfg.tolerance)
        result["runner"] = runner.name
        report["artifacts"][str(artifact)] = result
        cells = ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({100 * v['difference']:+.1f})"
                          for k, v in result["sets"].items())
        echo(f"{'PASS' if result['passed'] else 'FAIL'} {artifact} [{runner.name}, {result['precision']}]: {cells}"
             + f"; clean agreement {100 * result['sets']['clean']['top1_agreement']:.1f}%"
             + ("" if result["key_fingerprint_match"] else "; made with another key"))
    report["passed"] = all(r["passed"] for r in report["artifacts"].values())
    if out is not None:
        with staged_dir(out, force=force) as stage:
            save_sets(stage / "adversarial.npz", sets, y, manifest.key_fingerprint)
            write_json(stage / "parity.json", report)
            atomic_write_text(stage / "parity.md", parity_markdown(report))
    return report
