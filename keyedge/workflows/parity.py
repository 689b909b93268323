"""``keyedge parity``: craft the adversarial sets on the PyTorch reference once, replay them through every
artifact (sealed bundles from memory), and write the reports."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checks.config import ParityConfig
from ..checks.parity import check_artifact, craft, parity_markdown, save_sets
from ..core.data import run_images
from ..core.ensemble import check_key_set, is_ensemble, load_members, read_ensemble
from ..core.errors import KeyedgeError
from ..core.io import atomic_write_text, check_output_dir, staged_dir
from ..core.keys import Key
from ..core.keyset import KeySet
from ..core.manifests import Backend, read_run, write_json
from ..core.progress import Echo, echo
from ..core.runs import base_checkpoint_path, load_run, load_surrogate
from ..runtime.bundle import DeviceAccess
from ..runtime.platform import cpu
from ..runtime.runners import EnsembleRunner, open_runner
from ..runtime.runners.ensemble import MemberView


def _ensemble_runners(reference: Path, keys: KeySet, artifacts: list[Path], opener) -> list[EnsembleRunner]:
    """Each artifact must be the export of the ``reference`` ensemble: the same members, in order."""
    runners = []
    for a in artifacts:
        runner = open_runner(a, opener=opener)
        spec = runner.manifest.ensemble if isinstance(runner, EnsembleRunner) else None
        if not isinstance(runner, EnsembleRunner) or spec is None or list(spec.member_fingerprints) != keys.fingerprints:
            raise KeyedgeError(f"{a} is not an export of the ensemble {reference} (its members' keys differ)")
        runners.append(runner)
    return runners


def run_parity(reference: Path, key_path: Path | Key | KeySet | None, artifacts: list[Path], out: Path | None, *,
               data: str | None = None, base: Path | None = None, cfg: ParityConfig | None = None,
               force: bool = False, access: DeviceAccess = DeviceAccess(), backend: Backend = "onnxruntime",
               inference_precision: str = "fp32", echo: Echo = echo) -> dict[str, Any]:
    """Check every artifact against ``reference``; one line per artifact; the reports into ``out``. Sealed
    bundles open with the device's private key and trusted publishers (``access``). A random ensemble's
    artifact is checked member by member, each against its own PyTorch reference on its own adversarial sets.
    ``backend``: what runs the ONNX artifacts (OpenVINO with its ``inference_precision``: a bf16 execution is
    held to the bf16 rule)."""
    cfg = cfg or ParityConfig()
    if out is not None:
        check_output_dir(out, force)
    ensemble = read_ensemble(reference) if is_ensemble(reference) else None
    if ensemble is not None and key_path is None:
        raise KeyedgeError(f"{reference} is a random ensemble: pass its key set with --key")
    keys = KeySet.given(key_path) if ensemble is not None else None  # type: ignore[arg-type]
    key = None if ensemble is not None else Key.given(key_path)  # type: ignore[arg-type]
    if ensemble is not None:
        check_key_set(ensemble, keys, f"ensemble {reference}")  # type: ignore[arg-type]
    manifest = read_run(reference / ensemble.members[0].run if ensemble is not None else reference)
    opener = access.opener_for(artifacts, echo)
    images = run_images(manifest, cfg.n, seed=cfg.seed, data=data)
    if images is None:
        raise KeyedgeError(f"the run's data set {manifest.data.spec} is not here; pass --data")
    # refuse bad artifacts before crafting
    runners: list = (_ensemble_runners(reference, keys, artifacts, opener) if keys is not None
                     else [open_runner(a, key, opener=opener, backend=backend, inference_precision=inference_precision)
                           for a in artifacts])
    refs = load_members(reference, keys) if keys is not None else [load_run(reference, key)]
    x, y = images
    base_path = base if base is not None else base_checkpoint_path(manifest, verify=False)
    base_model = load_surrogate(base_path, manifest) if base_path is not None else None
    crafted = [craft(ref, x, y, cfg, base_model) for ref in refs]
    cpu_name, cpu_flags = cpu()  # int8 results depend on the ISA: the report names it
    report: dict[str, Any] = {
        "reference": str(reference), "key_fingerprint": keys.fingerprint if keys is not None else
        manifest.key_fingerprint,
        "data": manifest.data.spec if data is None else data, "n": len(y),
        "tolerance": {p: asdict(t) for p, t in cfg.tolerance.items()}, "attack": cfg.attack.linf().describe(),
        "cpu": f"{cpu_name} ({', '.join(cpu_flags) or 'no AVX2'})", "artifacts": {}}
    for artifact, runner in zip(artifacts, runners):
        with runner:
            checks = ([(f"{artifact}[member-{i}]", MemberView(runner, i)) for i in range(len(refs))]
                      if keys is not None else [(str(artifact), runner)])
            for (name, view), ref, sets in zip(checks, refs, crafted):
                with view if view is not runner else nullcontext():
                    result = check_artifact(view, ref, sets, y, cfg.tolerance)
                result["runner"] = view.name
                report["artifacts"][name] = result
                cells = ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({100 * v['difference']:+.1f})"
                                  for k, v in result["sets"].items())
                echo(f"{'PASS' if result['passed'] else 'FAIL'} {name} [{view.name}, {result['precision']}]: {cells}"
                     + f"; clean agreement {100 * result['sets']['clean']['top1_agreement']:.1f}%"
                     + ("" if result["key_fingerprint_match"] else "; made with another key"))
    report["passed"] = all(r["passed"] for r in report["artifacts"].values())
    if out is not None:
        with staged_dir(out, force=force) as stage:
            for i, (ref, sets) in enumerate(zip(refs, crafted)):
                name = "adversarial.npz" if keys is None else f"adversarial-member-{i}.npz"
                save_sets(stage / name, sets, y, ref.key.fingerprint if ref.key is not None else None)
            write_json(stage / "parity.json", report)
            atomic_write_text(stage / "parity.md", parity_markdown(report))
    return report
