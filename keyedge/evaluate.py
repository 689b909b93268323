"""Clean and robust accuracy of keyed (and plain) models under honest attacks.

Transfer attacks are crafted once on each surrogate and replayed on every target.
Robust accuracy is over all images; the attack success rate (ASR) is over the
images the target classified correctly before the attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .attacks.adaptive import bpda_loss, eot_loss, key_search
from .attacks.autoattack import QUICK, autoattack
from .attacks.pgd import AttackBudget, ce_loss, pgd
from .audit import audit_key
from .keys import Key
from .models import KeyedClassifier

Status = Callable[[str], None]


@dataclass
class EvalConfig:
    n: int = 500
    batch_size: int = 128
    linf_eps: float = 8 / 255
    l2_eps: float = 0.5
    steps: int = 10
    step_size: float | None = 2 / 255  # l_inf step; l_2 uses 2.5 * eps / steps
    random_start: bool = True
    eps_sweep: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255)
    autoattack: str = "quick"  # quick (APGD-CE + APGD-DLR) | standard | off
    autoattack_n: int = 100
    adaptive_n: int = 200
    eot_samples: int = 8
    key_search_random: int = 100
    key_search_swaps: int = 300
    key_search_batch: int = 64
    wrong_keys: int = 5
    seed: int = 0

    @classmethod
    def imagenet(cls, **overrides: Any) -> "EvalConfig":
        """The standard ImageNet threat model: l_inf 4/255, l_2 3.0."""
        base = dict(linf_eps=4 / 255, l2_eps=3.0, step_size=1 / 255, eps_sweep=(1 / 255, 2 / 255, 4 / 255, 8 / 255))
        base.update(overrides)
        return cls(**base)

    def linf(self, eps: float | None = None) -> AttackBudget:
        eps = self.linf_eps if eps is None else eps
        step = self.step_size if eps == self.linf_eps and self.step_size else 2.5 * eps / self.steps
        return AttackBudget("linf", eps, self.steps, step, self.random_start)

    def l2(self) -> AttackBudget:
        return AttackBudget("l2", self.l2_eps, self.steps, None, self.random_start)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    return float((predict(model, x, batch_size) == y).float().mean())


@dataclass
class Outcome:
    robust: float
    asr: float


def outcome(model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor, correct_before: torch.Tensor) -> Outcome:
    after = predict(model, x_adv) == y
    n_correct = int(correct_before.sum())
    fooled = int((correct_before & ~after).sum())
    return Outcome(float(after.float().mean()), fooled / n_correct if n_correct else 0.0)


@dataclass
class Target:
    """A model under evaluation; ``keyed.key is None`` for the plain fine-tuned model."""
    name: str
    keyed: KeyedClassifier
    result: dict[str, Any] = field(default_factory=lambda: {"attacks": {}, "asr": {}})

    def record(self, attack: str, out: Outcome) -> None:
        self.result["attacks"][attack] = out.robust
        self.result["asr"][attack] = out.asr


def _random_keys(key: Key, n: int, gen: torch.Generator) -> list[Key]:
    return [Key(torch.randperm(key.size, generator=gen).numpy(), key.block_size, key.channels) for _ in range(n)]


def _clean(t: Target, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, gen: torch.Generator) -> torch.Tensor:
    """Clean accuracy with the right key, with wrong keys and on un-shuffled input; returns who was right."""
    pred_ok = predict(t.keyed, x) == y
    t.result["clean"] = float(pred_ok.float().mean())
    t.result["plain_input"] = accuracy(t.keyed.with_key(None), x, y)
    if t.keyed.key is not None:
        wrong = _random_keys(t.keyed.key, cfg.wrong_keys, gen)
        t.result["wrong_key"] = sum(accuracy(t.keyed.with_key(w), x, y) for w in wrong) / len(wrong)
    return pred_ok


def _transfer_from_base(tgts: list[Target], base: KeyedClassifier, x: torch.Tensor, y: torch.Tensor,
                        cfg: EvalConfig, correct: dict[str, torch.Tensor]) -> None:
    """Non-adaptive transfer from the public base: PGD l_inf / l_2, AutoAttack, the eps sweep."""
    x_base = pgd(ce_loss(base), x, y, cfg.linf(), cfg.batch_size)
    x_l2 = pgd(ce_loss(base), x, y, cfg.l2(), cfg.batch_size)
    for t in tgts:
        t.record("pgd_linf_transfer_base", outcome(t.keyed, x_base, y, correct[t.name]))
        t.record("pgd_l2_transfer_base", outcome(t.keyed, x_l2, y, correct[t.name]))
    if cfg.autoattack != "off":
        na = min(cfg.autoattack_n, len(x))
        x_aa = autoattack(base, x[:na], y[:na], norm="linf", eps=cfg.linf_eps,
                          attacks=QUICK if cfg.autoattack == "quick" else None, seed=cfg.seed)
        for t in tgts:
            t.record("autoattack_linf_transfer_base", outcome(t.keyed, x_aa, y[:na], correct[t.name][:na]))
    for eps in cfg.eps_sweep:
        x_adv = x_base if eps == cfg.linf_eps else pgd(ce_loss(base), x, y, cfg.linf(eps), cfg.batch_size)
        for t in tgts:
            t.result.setdefault("eps_sweep", {}).setdefault("transfer_base", {})[f"{eps:.6f}"] = \
                outcome(t.keyed, x_adv, y, correct[t.name]).robust


def _adaptive(t: Target, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, correct: torch.Tensor,
              gen: torch.Generator, base_patch_weight: torch.Tensor | None, status: Status) -> None:
    """Attacks that know the method but not the key: a guessed key, EOT, BPDA, key search, key recovery."""
    keyed, k = t.keyed, t.keyed.key
    assert k is not None
    guess = _random_keys(k, 1, gen)[0]
    status(f"{t.name}: transfer from its own weights with a guessed key")
    t.record("pgd_linf_transfer_guessed_key",
             outcome(keyed, pgd(ce_loss(keyed.with_key(guess)), x, y, cfg.linf(), cfg.batch_size), y, correct))
    na = min(cfg.adaptive_n, len(x))
    xa, ya, ca = x[:na], y[:na], correct[:na]
    status(f"{t.name}: adaptive EOT over {cfg.eot_samples} random keys per step")
    t.record("adaptive_eot_linf", outcome(keyed, pgd(eot_loss(keyed, cfg.eot_samples, seed=cfg.seed),
                                                    xa, ya, cfg.linf(), cfg.batch_size), ya, ca))
    status(f"{t.name}: adaptive BPDA through a guessed key")
    t.record("adaptive_bpda_linf", outcome(keyed, pgd(bpda_loss(keyed, guess), xa, ya, cfg.linf(),
                                                     cfg.batch_size), ya, ca))
    status(f"{t.name}: adaptive key search")
    nb = min(cfg.key_search_batch, len(x))
    found = key_search(keyed, x[:nb], y[:nb], random_trials=cfg.key_search_random,
                       swap_trials=cfg.key_search_swaps, seed=cfg.seed)
    t.result["key_search"] = {"trials": found.trials, "batch_loss": found.loss, "batch_accuracy": found.accuracy,
                              "fraction_correct": float((found.key.perm == k.perm).mean())}
    t.record("adaptive_key_search_linf",
             outcome(keyed, pgd(ce_loss(keyed.with_key(found.key)), xa, ya, cfg.linf(), cfg.batch_size), ya, ca))
    if base_patch_weight is not None:
        t.result["key_recovery"] = audit_key(keyed.model.patch_embed.proj.weight, base_patch_weight, k).as_dict()


def _whitebox(t: Target, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, correct: torch.Tensor) -> None:
    """The lower bound: PGD with the right key (l_inf, l_2, and the eps sweep)."""
    keyed = t.keyed
    x_white = pgd(ce_loss(keyed), x, y, cfg.linf(), cfg.batch_size)
    t.record("whitebox_linf", outcome(keyed, x_white, y, correct))
    t.record("whitebox_l2", outcome(keyed, pgd(ce_loss(keyed), x, y, cfg.l2(), cfg.batch_size), y, correct))
    for eps in cfg.eps_sweep:
        x_adv = x_white if eps == cfg.linf_eps else pgd(ce_loss(keyed), x, y, cfg.linf(eps), cfg.batch_size)
        t.result.setdefault("eps_sweep", {}).setdefault("whitebox", {})[f"{eps:.6f}"] = outcome(
            keyed, x_adv, y, correct).robust


def evaluate(targets: dict[str, KeyedClassifier], x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, *,
             base: KeyedClassifier | None = None, plain_ft: KeyedClassifier | None = None,
             base_patch_weight: torch.Tensor | None = None, status: Status = lambda s: None) -> dict[str, Any]:
    """Evaluate every target; returns the JSON-ready results."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    x, y = x[:cfg.n], y[:cfg.n]
    tgts = [Target(name, model.eval()) for name, model in targets.items()]
    correct: dict[str, torch.Tensor] = {}
    for t in tgts:
        status(f"clean accuracy: {t.name}")
        correct[t.name] = _clean(t, x, y, cfg, gen)
    if base is not None:
        status("transfer attacks crafted on the public base")
        _transfer_from_base(tgts, base, x, y, cfg, correct)
    if plain_ft is not None:
        status("transfer attack crafted on a plain fine-tune of the base")
        x_adv = pgd(ce_loss(plain_ft), x, y, cfg.linf(), cfg.batch_size)
        for t in tgts:
            t.record("pgd_linf_transfer_plain_ft", outcome(t.keyed, x_adv, y, correct[t.name]))
    for t in tgts:
        if t.keyed.key is not None:
            _adaptive(t, x, y, cfg, correct[t.name], gen, base_patch_weight, status)
        status(f"{t.name}: white-box with the right key")
        _whitebox(t, x, y, cfg, correct[t.name])
    settings = asdict(cfg)
    settings.update({"linf_budget": cfg.linf().describe(), "l2_budget": cfg.l2().describe(), "n_images": len(x)})
    return {"settings": settings, "models": {t.name: t.result for t in tgts}}
