"""Random ensembles of keyed members: ``keyedge train --ensemble N`` (the members' fine-tunes, one key each)
and ``keyedge export`` of an ensemble run (one gathered graph, or the members side by side)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..checks.config import VERIFY_IMAGES
from ..checks.verify import verify, verify_ensemble
from ..core.data import run_images
from ..core.ensemble import check_key_set, load_members, read_ensemble
from ..core.errors import KeyedgeError
from ..core.io import check_output_dir, staged_dir
from ..core.keys import can_fold
from ..core.keyset import KeySet
from ..core.lora import merge_lora
from ..core.manifests import (ArtifactManifest, EnsembleForm, EnsembleManifest, EnsembleSpec, RunManifest, read_run,
                              write_json)
from ..core.models import patch_size_of
from ..core.progress import Echo, echo
from ..deploy.config import ExportOptions
from ..deploy.ensemble import MEMBERS_NAME, check_options, export_gathered, gathered_ensemble
from ..deploy.onnx_export import export_onnx
from ..training.config import TrainConfig
from ..training.ensemble import train_ensemble as train_members
from .export import VerificationFailed


def train_ensemble(cfg: TrainConfig, n: int, *, console=None, echo: Echo = echo) -> EnsembleManifest:
    """Fine-tune the ``n`` members of the key set ``cfg.key`` into ``cfg.out``."""
    if cfg.key is None:
        raise KeyedgeError("--ensemble needs the members' keys: pass --key KEYS (keyedge keygen --ensemble N)")
    keys = KeySet.load(cfg.key)
    if len(keys) != n:
        raise KeyedgeError(f"key set {cfg.key} holds {len(keys)} keys, not --ensemble {n}")
    manifest, runs = train_members(cfg, keys, console)
    if int(os.environ.get("RANK", 0)) == 0:
        accs = ", ".join(f"{r.metrics['test_acc']:.4f}" for r in runs)
        per_member = sum(r.per_key_bytes or 0 for r in runs) // len(runs)
        echo(f"wrote {cfg.out}: {n} members (key set {keys.fingerprint}), test accuracy {accs}\n"
             f"per-member storage: {per_member:,} bytes (full model {runs[0].full_model_bytes:,} bytes)")
    return manifest


def export_ensemble(run: Path, keys_path: Path | KeySet, out: Path, opts: ExportOptions, *,
                    form: EnsembleForm | None = None, force: bool = False, echo: Echo = echo) -> ArtifactManifest:
    """Export a random ensemble into ``out``: one gathered graph (LoRA members; the default for them) or the
    members' merged models side by side (``separate``; full fine-tunes), every member verified with ONNX
    Runtime against its PyTorch reference; nothing is written when one fails."""
    check_output_dir(out, force)
    ens = read_ensemble(run)
    keys = KeySet.given(keys_path)
    check_key_set(ens, keys, f"ensemble {run}")
    form = form or ("gathered" if ens.mode == "lora" else "separate")
    if form == "gathered":
        if ens.mode != "lora":
            raise KeyedgeError("only LoRA members share a base to gather from: export full fine-tunes "
                               "--ensemble-form separate")
        opts = replace(opts, batch=None)  # any batch: a query's S members are S rows
    check_options(opts, form)
    runs = [read_run(run / m.run) for m in ens.members]
    patch = patch_size_of(runs[0].model.name, **runs[0].model.kwargs)
    if not can_fold(keys.block_size, patch):
        raise KeyedgeError(f"block size {keys.block_size} does not divide patch size {patch}: an ensemble's keys are "
                           "folded into its members, so M must divide P")
    if form == "gathered":  # the members read once: un-merged for the graph, merged copies as references
        unmerged = load_members(run, keys, merge=False)
        merged = [merge_lora(m.copy()) for m in unmerged]
    else:
        merged = load_members(run, keys)
    real = run_images(runs[0], VERIFY_IMAGES)
    fps = tuple(keys.fingerprints)
    with staged_dir(out, force=force) as stage:
        if form == "gathered":
            graph = gathered_ensemble(unmerged)
            spec = EnsembleSpec("gathered", fps, member_input=MEMBERS_NAME)
            manifest = export_gathered(graph, merged[0], stage, opts, runs[0], spec, keys.fingerprint,
                                       source=str(run.resolve()))
            report = verify_ensemble(stage, merged, real[0] if real else None)
        else:
            files = tuple(f"{m.run}/model.onnx" for m in ens.members)
            reports = {}
            for m, member, member_run in zip(ens.members, merged, runs):
                (stage / m.run).mkdir(mode=0o700)
                art = export_onnx(member, stage / m.run, replace(opts, mode="fused"), member_run,
                                  source=str((run / m.run).resolve()))
                reports[m.run] = verify(stage / m.run / "model.onnx", member, art, real[0] if real else None)
            manifest = replace(art, key_fingerprint=keys.fingerprint, source_run=str(run.resolve()),
                               ensemble=EnsembleSpec("separate", fps, files=files))
            manifest.write(stage / "manifest.json")
            report = {"members": reports, "passed": all(r["passed"] for r in reports.values())}
        if not report["passed"]:
            failed = [k for k, r in report["members"].items() if not r["passed"]]
            raise VerificationFailed(f"ONNX Runtime verification failed for {', '.join(failed)} of the ensemble; "
                                     "nothing written")
        write_json(stage / "verification.json", report)
    worst = max(r[s]["rel_error"] for r in report["members"].values() for s in ("random", "real") if s in r)
    echo(f"wrote {out} ({form} ensemble of {len(keys)} members, key set {keys.fingerprint}); every member "
         f"verified with ONNX Runtime, largest rel err {worst:.2e}")
    echo(f"WARNING: {manifest.secret}", err=True)
    return manifest
