"""A random ensemble of keyed models, read back, and its PyTorch reference semantics.

An ensemble run (written by :mod:`keyedge.training.ensemble`) is a directory of member runs, each an
ordinary run of one key of a :class:`~keyedge.core.keyset.KeySet`, fine-tuned from the same base::

    ensemble/
      ensemble.json     format keyedge-ensemble-run: the key set's fingerprint, the mode, the members
      member-0/ ...     member i: a run directory (keyedge.core.runs), trained with the set's key i

Served, a query is answered by ``S`` members drawn at random from the ``N`` (a fresh draw from the OS
CSPRNG per query, :func:`draw_members`): the mean of their softmax probabilities. Member ``i``'s logits
for an image are ``KeyedClassifier(member i, key i)(image)``, the same as a single keyed model's.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import torch
from torch import nn

from .errors import KeyedgeError
from .keyset import KeySet
from .manifests import EnsembleManifest
from .models import KeyedClassifier
from .runs import load_run

ENSEMBLE = "ensemble.json"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE).is_file()


def read_ensemble(run_dir: str | Path) -> EnsembleManifest:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KeyedgeError(f"ensemble directory {run_dir} does not exist")
    return EnsembleManifest.read(run_dir / ENSEMBLE)


def check_key_set(manifest: EnsembleManifest, keys: KeySet, where: str) -> None:
    """The key set is the ensemble's: the same members' fingerprints, in the same order."""
    want = [m.key_fingerprint for m in manifest.members]
    if keys.fingerprints != want:
        if sorted(keys.fingerprints) == sorted(want):
            raise KeyedgeError(f"the key set holds {where}'s keys in another order")
        raise KeyedgeError(f"key set {keys.fingerprint} ({len(keys)} keys) is not {where}'s "
                           f"({manifest.key_set_fingerprint}, {len(want)} members)")


def load_members(run_dir: str | Path, keys: KeySet, *, merge: bool = True,
                 device: str | torch.device = "cpu") -> list[KeyedClassifier]:
    """Every member as its keyed PyTorch reference (LoRA merged unless ``merge=False``)."""
    run_dir = Path(run_dir)
    manifest = read_ensemble(run_dir)
    check_key_set(manifest, keys, f"ensemble {run_dir}")
    return [load_run(run_dir / m.run, key, merge=merge, device=device) for m, key in zip(manifest.members, keys)]


def check_draw(n: int, s: int) -> None:
    if not 1 <= s <= n:
        raise KeyedgeError(f"cannot draw {s} of {n} members: the draw is 1 to {n}")


def draw_members(n: int, s: int) -> list[int]:
    """``s`` distinct members of ``n``, uniformly, from the OS CSPRNG (never a seeded generator: a draw an
    attacker could predict would let them attack the members that will answer)."""
    check_draw(n, s)
    return secrets.SystemRandom().sample(range(n), s)


class EnsembleClassifier(nn.Module):
    """The members' keyed models side by side: ``member_logits(x, m)`` runs image ``j`` through member ``m[j]``;
    ``forward(x, draw)`` is the ensemble's answer to ``x`` from the members in ``draw`` (mean probability)."""

    def __init__(self, members: list[KeyedClassifier]) -> None:
        super().__init__()
        if len(members) < 2:
            raise KeyedgeError("an ensemble has at least 2 members")
        self.members = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.members)

    def member_logits(self, x: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        if member.shape != (len(x),):
            raise KeyedgeError(f"one member index per image: {len(x)} images, {tuple(member.shape)} indices")
        out: torch.Tensor | None = None
        for m in member.unique().tolist():
            rows = (member == m).nonzero().flatten()
            logits = self.members[m](x[rows])
            out = logits.new_zeros(len(x), logits.shape[1]) if out is None else out
            out[rows] = logits
        assert out is not None
        return out

    def forward(self, x: torch.Tensor, draw: list[int]) -> torch.Tensor:
        """Mean softmax probability of the ``draw``'s members (an (N, classes) tensor)."""
        members = torch.tensor(draw, device=x.device).repeat_interleave(len(x))
        logits = self.member_logits(x.repeat(len(draw), 1, 1, 1), members)
        return logits.softmax(1).view(len(draw), len(x), -1).mean(0)
