"""A randomized defense (a random ensemble of keyed members, or query noise) against every attacker of the
threat model, adaptive ones included, scored over independent draws (:mod:`.attacks.randomized`).

Per target, on the same images for every row:

* score queries: Square at each budget, plain (``k = 1``) and EOT (each query asked ``k`` times, every
  repetition counted), and Square on the defense's *expected* output where the target can answer it (a
  gray-box upper bound of EOT: one such query costs the device ``N / S`` queries);
* label-only queries: HopSkipJump at each budget, plain and EOT;
* transfer: images crafted elsewhere (the public base, the attacker's own-key ensemble), replayed;
* white-box given every key: PGD on the expected output (EOT over the draw, exact), and given one leaked
  member's key and weights: PGD on that member, replayed on the ensemble.

Robust accuracy is the mean over ``draws`` independent draws (and the worst draw, and the images right
under every draw); each threat row combines, draw by draw, every attack that attacker has at that budget
or below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .attacks.pgd import ce_loss, pgd
from .attacks.randomized import combine, correct_under_draws, expectation, hopskipjump_points, score, square_budget
from .config import RandomizedConfig

Predict = Callable[[torch.Tensor], torch.Tensor]
Status = Callable[[str], None]


@dataclass
class RandomizedTarget:
    """A deployed randomized model: ``deployed`` answers each call with a fresh draw (through the artifact);
    ``expected`` answers with the exact expected output (all members), when the target has one; ``whitebox``
    is its expected output in PyTorch given every key; ``leaked``: surrogates an attacker holding one
    member's files has."""
    name: str
    deployed: Predict
    whitebox: nn.Module
    expected: Predict | None = None
    leaked: dict[str, nn.Module] = field(default_factory=dict)


def evaluate_randomized(target: RandomizedTarget, x: torch.Tensor, y: torch.Tensor, cfg: RandomizedConfig, *,
                        transfer: dict[str, torch.Tensor], classes: int, shared: dict[str, torch.Tensor] | None = None,
                        status: Status = lambda s: None) -> dict[str, Any]:
    """Every attack on ``target``; the JSON-ready results (per attack and budget, and the threat rows).

    ``shared``: images crafted without the target's randomness (on the expected output, on a leaked member),
    the same for every draw size ``S`` of one ensemble: reused from it where there, stored into it. Each is
    crafted from ``cfg.seed``, so a later run (another process) crafts the same images."""
    torch.manual_seed(cfg.seed)
    shared = {} if shared is None else shared

    def once(name: str, craft: Callable[[], torch.Tensor]) -> torch.Tensor:
        if name not in shared:  # seeded here, so the images do not depend on what ran before them
            torch.manual_seed(cfg.seed)
            shared[name] = craft()
        return shared[name]

    clean = correct_under_draws(target.deployed, x, y, cfg.draws)
    attacks: dict[str, Any] = {}
    masks: dict[str, torch.Tensor] = {}

    def record(name: str, x_adv: torch.Tensor) -> None:
        attacks[name], masks[name] = score(target.deployed, x, x_adv, y, cfg.draws, clean=clean)

    budgets = sorted(cfg.budgets)
    for k in cfg.eot:
        oracle = expectation(target.deployed, k)
        for b in budgets:
            status(f"{target.name}: Square, {b} queries per image (EOT k={k}: {b // k} answers)")
            record(f"square_k{k}@{b}", square_budget(oracle, x, y, eps=cfg.eps, queries=b // k, seed=cfg.seed))
    if target.expected is not None:
        for b in (b for b in budgets if b <= cfg.square_expected_max):
            status(f"{target.name}: Square on the expected output, {b} queries per image")
            record(f"square_expected@{b}", once(f"square_expected@{b}", lambda b=b: square_budget(
                target.expected, x, y, eps=cfg.eps, queries=b, seed=cfg.seed)))
    if cfg.label_only:
        for k in cfg.eot:
            status(f"{target.name}: HopSkipJump (labels), up to {max(budgets)} queries per image, EOT k={k}")
            points = hopskipjump_points(target.deployed, x, y, eps=cfg.eps, budgets=budgets, classes=classes,
                                        repeats=k, seed=cfg.seed)
            for b in budgets:
                record(f"hopskipjump_k{k}@{b}", points[b])
    for name, x_adv in transfer.items():
        record(f"transfer_{name}", x_adv)
    status(f"{target.name}: white-box PGD on the expected output, every key known ({cfg.whitebox_steps} steps)")
    budget = cfg.linf(cfg.whitebox_steps)
    record("whitebox_eot", once("whitebox_eot", lambda: pgd(ce_loss(target.whitebox), x, y, budget, cfg.batch_size)))
    for name, model in target.leaked.items():
        status(f"{target.name}: white-box PGD on {name}, replayed on the target")
        record(f"leaked_{name}", once(f"leaked_{name}", lambda m=model: pgd(ce_loss(m), x, y, budget, cfg.batch_size)))

    def row(prefixes: tuple[str, ...], at: int | None = None) -> dict[str, float] | None:
        """Every attack of that kind the attacker has: at a budget, those of that budget or less (5,000 queries
        buy any 1,000-query attack too)."""
        chosen = [m for a, m in masks.items()
                  if a.startswith(prefixes) and (at is None or int(a.rsplit("@", 1)[1]) <= at)]
        return combine(chosen) if chosen else None

    transfer_row = row(("transfer_",))
    threat = {"clean": float(clean.float().mean()), "transfer": transfer_row,
              "scores": {str(b): row(("square_",), b) for b in budgets},
              "labels": {str(b): row(("hopskipjump_",), b) for b in budgets} if cfg.label_only else {},
              "leaked_member": row(("leaked_",)), "all_keys": row(("whitebox_eot",))}
    return {"n": len(x), "draws": cfg.draws, "clean_mean": float(clean.float().mean()),
            "clean_worst_draw": float(clean.float().mean(1).min()), "attacks": attacks, "threat_model": threat,
            "settings": asdict(cfg)}
