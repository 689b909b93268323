"""``keyedge train --ensemble N``: N keyed members fine-tuned from one base, member ``i`` with key ``i`` of one
key set, each an ordinary run (full or LoRA) in ``out/member-i`` (layout: :mod:`keyedge.core.ensemble`).

Members are trained one after another, each by the one trainer (so torchrun's ranks train each member
together); member ``i`` draws its data order and initialisation from ``seed + i``. ``--resume`` keeps the
members that finished, continues the one that was interrupted from its checkpoint and trains the rest.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ..core.ensemble import ENSEMBLE, check_key_set, read_ensemble
from ..core.errors import KeyedgeError
from ..core.io import check_output_dir
from ..core.keyset import KeySet
from ..core.manifests import MANIFEST, EnsembleManifest, EnsembleMember, RunManifest, read_run
from ..core.runs import CHECKPOINT
from .config import TrainConfig
from .train import _dist_env, train


def _finished(run: Path, cfg: TrainConfig) -> bool:
    if not (run / MANIFEST).is_file():
        return False
    done = read_run(run)
    return done.epochs_done >= cfg.epochs or (cfg.max_steps is not None and bool(done.history)
                                              and done.history[-1]["step"] >= cfg.max_steps)


def train_ensemble(cfg: TrainConfig, keys: KeySet | str | Path, console=None, *,
                   alone: bool = False) -> tuple[EnsembleManifest, list[RunManifest]]:
    """Train every member of ``keys`` into ``cfg.out``; returns the ensemble's manifest and the members'.
    ``alone``: this rank trains the whole ensemble by itself (``fleet train``: one device per rank)."""
    keys = KeySet.given(keys)
    out = Path(cfg.out)
    manifest = EnsembleManifest(key_set_fingerprint=keys.fingerprint, mode=cfg.mode,
                                members=tuple(EnsembleMember(f"member-{i}", k.fingerprint)
                                              for i, k in enumerate(keys)))
    main_process = alone or _dist_env()[1] == 0
    created = not out.exists()
    if cfg.resume:
        if not (out / ENSEMBLE).is_file():
            raise KeyedgeError(f"nothing to resume: {out / ENSEMBLE} does not exist")
        check_key_set(read_ensemble(out), keys, f"ensemble {out}")
    elif main_process:
        check_output_dir(out, cfg.force, alternative="--resume to continue it, or ")
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        manifest.write(out / ENSEMBLE)  # first: a --resume finds the members' keys (removed if none trains)
    try:
        return manifest, _train_members(cfg, manifest, keys, out, console, alone)
    except BaseException:  # a command's own new run that trained nothing is removed; never a fleet's (``alone``):
        # a worker that lost its lease would remove the run the device's new holder trains in
        if main_process and not alone and not cfg.resume and not any((out / m.run / MANIFEST).is_file()
                                                                     for m in manifest.members):
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                (out / ENSEMBLE).unlink(missing_ok=True)
        raise


def _train_members(cfg: TrainConfig, manifest: EnsembleManifest, keys: KeySet, out: Path,
                   console, alone: bool) -> list[RunManifest]:
    runs: list[RunManifest] = []
    for i, (member, key) in enumerate(zip(manifest.members, keys)):
        run = out / member.run
        if cfg.resume and _finished(run, cfg):
            runs.append(read_run(run))
            continue
        resume = cfg.resume and (run / CHECKPOINT).is_file()
        member_cfg = dataclasses.replace(cfg, out=str(run), key=None, seed=cfg.seed + i,
                                         resume=resume, force=True)
        runs.append(train(member_cfg, console, key=key, alone=alone))
        if console is not None:  # after: a refusal of the first member is the command's only line
            console.print(f"[bold]{member.run}[/] (key {key.fingerprint}) trained: test accuracy "
                          f"{runs[-1].metrics['test_acc']:.4f}")
    return runs
