"""Random ensembles of keyed members: ``keyedge train --ensemble N`` (the members' fine-tunes, one key each)."""

from __future__ import annotations

import os

from ..core.errors import KeyedgeError
from ..core.keyset import KeySet
from ..core.manifests import EnsembleManifest
from ..core.progress import Echo, echo
from ..training.config import TrainConfig
from ..training.ensemble import train_ensemble as train_members


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
