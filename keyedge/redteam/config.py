"""The threat model as data: the attackers' rows, the attacks' names, and the evaluation and audit
budgets -- the one source of their defaults (the CLI reads them). No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .attacks.budget import AttackBudget

Threat = Literal["small", "imagenet"]
AutoAttackVersion = Literal["quick", "standard", "off"]

# transfer attacks that need neither the key, nor the target's weights, nor queries (l_inf)
TRANSFER_LINF = ("pgd_linf_transfer_base", "autoattack_linf_transfer_base", "pgd_linf_transfer_plain_ft",
                 "mi_di_transfer_own_keys", "block_invariant_transfer_base")
THREAT_ROWS = {  # row: (label, the attacks that attacker has)
    "transfer": ("transfer only (public base, own-key surrogates, the method)", TRANSFER_LINF),
    "scores": ("+ queries with scores (Square)", (*TRANSFER_LINF, "square_linf")),
    "labels": ("+ label-only queries (HopSkipJump)", (*TRANSFER_LINF, "hopskipjump_linf")),
    "fused_file": ("has a copy of the fused file (key read off it, then white-box)", ("fused_file_whitebox_linf",)),
    "unfused_queries": ("has un-fused weights + queries (probes recover the key, then white-box)",
                        ("probe_key_whitebox_linf", "adaptive_eot_linf", "adaptive_key_search_linf",
                         "pgd_linf_transfer_guessed_key")),
    "key": ("has the key (white-box PGD)", ("whitebox_linf",)),
}


@dataclass
class EvalConfig:
    n: int = 500
    batch_size: int = 128
    linf_eps: float = 8 / 255
    l2_eps: float = 0.5
    steps: int = 10                       # transfer and adaptive PGD
    step_size: float | None = 2 / 255     # l_inf step; l_2 uses 2.5 * eps / steps
    random_start: bool = True
    restarts: int = 1
    whitebox_steps: tuple[int, ...] = (10, 50, 100)
    whitebox_restarts: int = 2
    eps_sweep: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, 128 / 255)
    autoattack: AutoAttackVersion = "quick"  # quick (APGD-CE + APGD-DLR) | standard | off
    eot_samples: int = 8
    key_search_random: int = 100
    key_search_swaps: int = 300
    key_search_batch: int = 64
    query_n: int = 32                     # images the query attacks (and the threat table) use
    query_budgets: tuple[int, ...] = (100, 1000, 5000)
    label_only: bool = True
    wrong_keys: int = 5
    seed: int = 0

    @classmethod
    def for_threat(cls, threat: Threat, **overrides: Any) -> "EvalConfig":
        """The defaults of a threat model (``small`` or ``imagenet``), with ``overrides``."""
        return cls.imagenet(**overrides) if threat == "imagenet" else cls(**overrides)

    @classmethod
    def imagenet(cls, **overrides: Any) -> "EvalConfig":
        """The standard ImageNet threat model: l_inf 4/255, l_2 3.0, AutoAttack standard."""
        base = dict(linf_eps=4 / 255, l2_eps=3.0, step_size=1 / 255, autoattack="standard",
                    eps_sweep=(1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255))
        base.update(overrides)
        return cls(**base)

    def linf(self, eps: float | None = None, steps: int | None = None, restarts: int | None = None) -> AttackBudget:
        eps = self.linf_eps if eps is None else eps
        steps = self.steps if steps is None else steps
        step = self.step_size if eps == self.linf_eps and self.step_size and steps == self.steps \
            else 2.5 * eps / steps
        return AttackBudget("linf", eps, steps, step, self.random_start, restarts or self.restarts)

    def l2(self) -> AttackBudget:
        return AttackBudget("l2", self.l2_eps, self.steps, None, self.random_start, self.restarts)


ATTACK_LABELS = {
    "pgd_linf_transfer_base": "PGD l_inf, transfer from the public base",
    "pgd_l2_transfer_base": "PGD l_2, transfer from the public base",
    "autoattack_linf_transfer_base": "AutoAttack l_inf, transfer from the public base",
    "block_invariant_transfer_base": "PGD l_inf in the key-invariant (block-constant) subspace, from the base",
    "mi_di_transfer_own_keys": "MI-DI-FGSM l_inf, ensemble of the base + own-key fine-tunes",
    "pgd_linf_transfer_plain_ft": "PGD l_inf, transfer from a plain fine-tune of the base",
    "square_linf": "Square l_inf, score queries (largest budget)",
    "hopskipjump_linf": "HopSkipJump l_inf, label-only queries (largest budget)",
    "fused_file_whitebox_linf": "key read off the fused file, then white-box PGD",
    "probe_key_whitebox_linf": "un-fused weights + probe queries recover the key, then white-box PGD",
    "pgd_linf_transfer_guessed_key": "PGD l_inf from the keyed weights with a guessed key",
    "adaptive_eot_linf": "EOT over random keys (bounded by block-constant perturbations)",
    "adaptive_key_search_linf": "key search (agreement with the device), then PGD",
    "whitebox_linf": "white-box PGD l_inf with the key (best of restarts, best iterate)",
    "whitebox_l2": "white-box PGD l_2 with the key",
}


@dataclass
class AuditConfig:
    """``keyedge audit``: what the attacker may do, and the release gate."""
    queries: int = 0                # queries of a run directory's deployed model (logit probes need C*M*M)
    n: int = 200                    # real images for the functional scores
    seed: int = 0
    fail_above: float | None = None  # exit 3 when an artifact leaks more than this fraction of the key
    attack: AttackBudget = field(default_factory=lambda: AttackBudget("linf", 8 / 255, 50, 2 / 255, True))


@dataclass
class RandomizedConfig:
    """The evaluation of a randomized defense (:mod:`keyedge.redteam.randomized`)."""
    budgets: tuple[int, ...] = (100, 1000, 5000)   # queries per image, every EOT repetition counted
    eot: tuple[int, ...] = (1, 4)                  # each query asked k times and averaged
    square_expected_max: int = 1000                # Square on the exact expected output (where there is one) up to
                                                   # this budget: each such query costs N member rows
    label_only: bool = True
    draws: int = 10                                # independent draws that score every final image
    eps: float = 8 / 255
    whitebox_steps: int = 20
    batch_size: int = 128
    seed: int = 0

    def linf(self, steps: int) -> AttackBudget:
        return AttackBudget("linf", self.eps, steps, 2.5 * self.eps / steps, True, 1)
