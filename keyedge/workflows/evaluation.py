"""``keyedge eval``: a run against every attacker of the threat model, the query attacks through the
artifact as deployed; ``report.md``, ``results.json`` and the plots."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from ..core.data import load_data, sample
from ..core.io import check_output_dir, staged_dir
from ..core.keys import Key
from ..core.manifests import check_key, read_run
from ..core.progress import Echo, echo, status_printer
from ..core.runs import base_checkpoint_path, load_run, load_surrogate
from ..redteam.attacks.query import runner_model
from ..redteam.config import EvalConfig
from ..redteam.evaluate import evaluate
from ..redteam.report import write_eval_report
from ..runtime.runners import open_runner


def evaluate_run(run: Path, key_path: Path | Key | None, out: Path, cfg: EvalConfig, *, data: str | None = None,
                 base: Path | None = None, plain_ft: Path | None = None, own_keys: Sequence[Path] = (),
                 artifact: Path | None = None, device: str = "cpu", force: bool = False,
                 console: Console | None = None, echo: Echo = echo) -> dict[str, Any]:
    """Evaluate ``run`` (with its key) against every attacker; ``own_keys``: the attacker's own-key fine-tunes
    (run directories with their key.bin); ``artifact``: what the query attacks query (default: the run);
    ``data``: ``digits`` or an ImageFolder root (default: the run's own data set)."""
    manifest = read_run(run)
    key = Key.given(key_path)
    check_key(manifest, key, f"run {run}", strict=True)
    check_output_dir(out, force)  # refuse before the (long) evaluation
    own = [load_run(r, Key.load(r / "key.bin"), device=device) for r in own_keys]
    target = load_run(run, key, device=device)
    base_path = base if base is not None else base_checkpoint_path(manifest)
    base_model = load_surrogate(base_path, manifest).to(device) if base_path is not None else None
    plain_model = load_run(plain_ft, None, device=device) if plain_ft is not None else None
    splits = load_data(data or manifest.data.spec, manifest.input.size[0], manifest.input.channels)
    x, y = sample(splits.test, cfg.n, seed=cfg.seed)
    runner = open_runner(artifact, key) if artifact is not None else None
    with runner if runner is not None else contextlib.nullcontext():
        results = evaluate({run.name: target}, x.to(device), y.to(device), cfg, base=base_model,
                           plain_ft=plain_model, own_keys=own,
                           deployed={run.name: runner_model(runner)} if runner is not None else None,
                           base_patch_weight=base_model.model.patch_embed.proj.weight if base_model else None,
                           status=status_printer(console or Console(stderr=True), "eval"))
    results["key_fingerprint"] = manifest.key_fingerprint
    with staged_dir(out, force=force) as stage:
        write_eval_report(results, stage)
    echo(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return results
