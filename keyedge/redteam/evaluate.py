"""Clean and robust accuracy of keyed (and plain) models against every attacker of the threat model.

Honest metrics (after Carlini et al., "On Evaluating Adversarial Robustness", and Tramer et al.,
"On Adaptive Attacks to Adversarial Example Defenses"):

* robust accuracy counts an image only if the model was right before *and* after the attack, so
  robust <= clean always (asserted); the attack success rate (ASR) is over the images the model
  had right;
* every attack runs on the same images; the query attacks, too costly for all of them, run on the
  first ``query_n`` and the threat-model table is computed on exactly those, with their own clean
  accuracy beside it;
* PGD keeps each example's best iterate over all steps and restarts; white-box PGD is reported at
  10, 50 and 100 steps (a convergence check) and the eps sweep goes on until robust accuracy is 0;
* the evaluation's randomness follows ``seed``.

The attackers (the threat model in ``docs/architecture.md``), and the rows of
:data:`~keyedge.redteam.config.THREAT_ROWS`: transfer only (the
public base, a plain fine-tune, the attacker's own-key fine-tunes as an MI-DI ensemble, the
key-invariant block-constant subspace); + score queries (Square); + label-only queries
(HopSkipJump); a copy of the fused file (the key read off it, then white-box); un-fused weights +
queries (logit probes recover the key, then white-box; EOT and key search too); the key (white-box).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..core.fold import fold_key
from ..core.keys import Key, can_fold
from ..core.models import KeyedClassifier
from .attacks import keyrecovery
from .attacks.adaptive import eot_loss, key_search
from .attacks.autoattack import QUICK, autoattack
from .attacks.pgd import ce_loss, pgd, pgd_with_checkpoints
from .attacks.query import hopskipjump, square
from .attacks.transfer import block_invariant, mi_di
from .config import THREAT_ROWS, EvalConfig

Status = Callable[[str], None]
Predict = Callable[[torch.Tensor], torch.Tensor]

@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    if isinstance(model, torch.nn.Module):
        model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    return float((predict(model, x, batch_size) == y).float().mean())


@dataclass
class Target:
    """A model under evaluation (``keyed.key is None`` for a plain one) and its per-image record."""
    name: str
    keyed: KeyedClassifier
    deployed: Predict | None = None       # what query attacks query (an artifact's runner), else the model
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    survived: dict[str, torch.Tensor] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=lambda: {"attacks": {}, "asr": {}, "n": {}})

    @property
    def query_model(self) -> Predict:
        return self.deployed or self.keyed

    def record(self, attack: str, x_adv: torch.Tensor, y: torch.Tensor) -> None:
        """Robust = right before and after; on the first ``len(x_adv)`` images."""
        before = self.correct[:len(y)]
        self.record_mask(attack, before & (predict(self.keyed, x_adv) == y))

    def record_mask(self, attack: str, survived: torch.Tensor) -> None:
        before = self.correct[:len(survived)]
        assert not (survived & ~before).any(), "robust must imply right before the attack"
        robust, clean = float(survived.float().mean()), float(before.float().mean())
        assert robust <= clean
        self.survived[attack] = survived
        self.result["attacks"][attack] = robust
        self.result["asr"][attack] = 1 - int(survived.sum()) / int(before.sum()) if before.any() else 0.0
        self.result["n"][attack] = len(survived)


def _clean(t: Target, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, gen: torch.Generator) -> None:
    t.correct = predict(t.keyed, x) == y
    t.result["clean"] = float(t.correct.float().mean())
    t.result["plain_input"] = accuracy(t.keyed.with_key(None), x, y)
    if t.keyed.key is not None:
        k = t.keyed.key
        wrong = [Key(torch.randperm(k.size, generator=gen).numpy(), k.block_size, k.channels)
                 for _ in range(cfg.wrong_keys)]
        t.result["wrong_key"] = sum(accuracy(t.keyed.with_key(w), x, y) for w in wrong) / len(wrong)


def _transfer(tgts: list[Target], x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, base: KeyedClassifier | None,
              plain_ft: KeyedClassifier | None, own_keys: list[KeyedClassifier], status: Status) -> None:
    """Attacks crafted once on what any attacker has, replayed on every target."""
    crafted: dict[str, torch.Tensor] = {}
    if base is not None:
        status("transfer from the public base: PGD l_inf / l_2, AutoAttack, the key-invariant subspace")
        crafted["pgd_linf_transfer_base"] = pgd(ce_loss(base), x, y, cfg.linf(), cfg.batch_size)
        crafted["pgd_l2_transfer_base"] = pgd(ce_loss(base), x, y, cfg.l2(), cfg.batch_size)
        if cfg.autoattack != "off":
            crafted["autoattack_linf_transfer_base"] = autoattack(
                base, x, y, norm="linf", eps=cfg.linf_eps, attacks=QUICK if cfg.autoattack == "quick" else None,
                seed=cfg.seed)
        block = next((t.keyed.block_size for t in tgts if t.keyed.block_size), None)
        if block:
            crafted["block_invariant_transfer_base"] = block_invariant(ce_loss(base), x, y, cfg.linf(), block)
        if own_keys:
            status(f"transfer from an MI-DI ensemble: the base + {len(own_keys)} own-key fine-tunes")
            crafted["mi_di_transfer_own_keys"] = mi_di([base, *own_keys], x, y, cfg.linf())
    if plain_ft is not None:
        crafted["pgd_linf_transfer_plain_ft"] = pgd(ce_loss(plain_ft), x, y, cfg.linf(), cfg.batch_size)
    for name, x_adv in crafted.items():
        for t in tgts:
            t.record(name, x_adv, y)
    if base is not None:  # the eps sweep, until every target is at 0
        for eps in cfg.eps_sweep:
            x_adv = crafted["pgd_linf_transfer_base"] if eps == cfg.linf_eps else \
                pgd(ce_loss(base), x, y, cfg.linf(eps), cfg.batch_size)
            robust = [float((t.correct & (predict(t.keyed, x_adv) == y)).float().mean()) for t in tgts]
            for t, r in zip(tgts, robust):
                t.result.setdefault("eps_sweep", {}).setdefault("transfer_base", {})[f"{eps:.6f}"] = r
            if max(robust) == 0:
                break


def _queries(t: Target, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, classes: int, status: Status) -> None:
    """Square (scores) and HopSkipJump (labels) against the deployed model, per query budget."""
    q = min(cfg.query_n, len(x))
    xq, yq = x[:q], y[:q]
    before = t.correct[:q]
    curves: dict[str, dict[str, float]] = {"square_linf": {}, "hopskipjump_linf": {}}
    status(f"{t.name}: Square l_inf up to {max(cfg.query_budgets)} queries on {q} images")
    broken, _ = square(t.query_model, xq, yq, eps=cfg.linf_eps, budgets=cfg.query_budgets, seed=cfg.seed)
    for budget in sorted(cfg.query_budgets):
        curves["square_linf"][str(budget)] = float((before & ~broken[budget]).float().mean())
    t.record_mask("square_linf", before & ~broken[max(cfg.query_budgets)])
    if cfg.label_only:
        status(f"{t.name}: HopSkipJump (label-only) l_inf up to {max(cfg.query_budgets)} queries on {q} images")
        broken = hopskipjump(t.query_model, xq, yq, eps=cfg.linf_eps, budgets=cfg.query_budgets, classes=classes,
                             seed=cfg.seed)
        for budget in sorted(cfg.query_budgets):
            curves["hopskipjump_linf"][str(budget)] = float((before & ~broken[budget]).float().mean())
        t.record_mask("hopskipjump_linf", before & ~broken[max(cfg.query_budgets)])
    t.result["queries"] = {"n": q, "clean": float(before.float().mean()), "curves": curves}


def _with_recovered_key(t: Target, perm: np.ndarray, attack: str, x: torch.Tensor, y: torch.Tensor,
                        cfg: EvalConfig) -> dict[str, Any]:
    """White-box PGD through the model behind a recovered key, replayed on the target."""
    k = t.keyed.key
    recovered = t.keyed.with_key(Key(perm, k.block_size, k.channels, insecure=True))
    t.record(attack, pgd(ce_loss(recovered), x, y, cfg.linf(steps=50), cfg.batch_size), y)
    return {"fraction_recovered": float(np.mean(perm == k.perm)),
            "agreement": float((predict(recovered, x) == predict(t.keyed, x)).float().mean())}


def _leaks(t: Target, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, base_patch_weight: torch.Tensor | None,
           status: Status) -> None:
    """What a copy of the device's files yields: the fused file (the key read off it), or the un-fused
    weights plus queries (logit probes, EOT, key search, a guessed key)."""
    keyed, k = t.keyed, t.keyed.key
    recovery: dict[str, Any] = {"chance_level": 1.0 / k.size}
    patch = keyed.model.patch_embed.patch_size[0]
    if base_patch_weight is not None and can_fold(k.block_size, patch):
        status(f"{t.name}: the key read off its fused patch embedding, then white-box")
        fused = fold_key(keyed).patch_embed.proj.weight
        perm = keyrecovery.recover_from_fused(fused, base_patch_weight, k.block_size)
        recovery["fused_file"] = _with_recovered_key(t, perm, "fused_file_whitebox_linf", x, y, cfg)
        recovery["unfused_columns"] = keyrecovery.audit_key(keyed.model.patch_embed.proj.weight, base_patch_weight, k).as_dict()
    status(f"{t.name}: logit probes ({k.size} queries) with the un-fused weights, then white-box")
    h, w = keyed.model.patch_embed.img_size
    perm = keyrecovery.probe_key(t.query_model, keyed.classify_shuffled, (h, w), k.channels, k.block_size)
    recovery["probes"] = {**_with_recovered_key(t, perm, "probe_key_whitebox_linf", x, y, cfg), "queries": k.size}
    t.result["key_recovery"] = recovery
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    guess = Key(torch.randperm(k.size, generator=gen).numpy(), k.block_size, k.channels)
    t.record("pgd_linf_transfer_guessed_key", pgd(ce_loss(keyed.with_key(guess)), x, y, cfg.linf(), cfg.batch_size), y)
    status(f"{t.name}: EOT over {cfg.eot_samples} random keys per step (bounded by block-constant perturbations)")
    t.record("adaptive_eot_linf", pgd(eot_loss(keyed, cfg.eot_samples, seed=cfg.seed), x, y, cfg.linf(),
                                      cfg.batch_size), y)
    status(f"{t.name}: key search scored by agreement with the device ({cfg.key_search_batch} queries)")
    nb = min(cfg.key_search_batch, len(x))
    found = key_search(keyed, x[:nb], t.query_model, random_trials=cfg.key_search_random,
                       swap_trials=cfg.key_search_swaps, seed=cfg.seed)
    searched = keyed.with_key(found.key)
    t.result["key_search"] = {"trials": found.trials, "queries": found.queries, "batch_agreement": found.agreement,
                              "agreement": float((predict(searched, x) == predict(keyed, x)).float().mean()),
                              "fraction_correct": float((found.key.perm == k.perm).mean())}
    t.record("adaptive_key_search_linf", pgd(ce_loss(searched), x, y, cfg.linf(), cfg.batch_size), y)


def _whitebox(t: Target, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> None:
    """The lower bound, with a convergence check: the best iterate after 10/50/100 steps of the first
    run, then the best over all restarts."""
    keyed = t.keyed
    strongest = cfg.linf(steps=max(cfg.whitebox_steps), restarts=cfg.whitebox_restarts)
    x_white, snapshots = pgd_with_checkpoints(ce_loss(keyed), x, y, strongest, cfg.whitebox_steps, cfg.batch_size)
    t.result["whitebox_steps"] = {str(k): float((t.correct & (predict(keyed, v) == y)).float().mean())
                                  for k, v in sorted(snapshots.items())}
    t.record("whitebox_linf", x_white, y)
    t.record("whitebox_l2", pgd(ce_loss(keyed), x, y, cfg.l2(), cfg.batch_size), y)
    for eps in cfg.eps_sweep:
        x_adv = x_white if eps == cfg.linf_eps else pgd(ce_loss(keyed), x, y, cfg.linf(eps), cfg.batch_size)
        r = float((t.correct & (predict(keyed, x_adv) == y)).float().mean())
        t.result.setdefault("eps_sweep", {}).setdefault("whitebox", {})[f"{eps:.6f}"] = r
        if r == 0:
            break


def threat_table(t: Target, q: int) -> dict[str, float | None]:
    """Per attacker capability: robust accuracy against everything that attacker has, per image,
    on the first ``q`` images (those the query attacks used)."""
    table: dict[str, float | None] = {"clean": float(t.correct[:q].float().mean())}
    for row, (_, attacks) in THREAT_ROWS.items():
        masks = [t.survived[a][:q] for a in attacks if a in t.survived]
        if t.keyed.key is None and row in ("fused_file", "unfused_queries"):
            masks = [t.survived["whitebox_linf"][:q]]  # a plain model's file *is* its white box
        table[row] = float(torch.stack(masks).all(0).float().mean()) if masks else None
    return table


def evaluate(targets: dict[str, KeyedClassifier], x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, *,
             base: KeyedClassifier | None = None, plain_ft: KeyedClassifier | None = None,
             own_keys: list[KeyedClassifier] = (), deployed: dict[str, Predict] | None = None,
             base_patch_weight: torch.Tensor | None = None, status: Status = lambda s: None) -> dict[str, Any]:
    """Evaluate every target against every attacker; returns the JSON-ready results.

    ``own_keys``: keyed fine-tunes of the base with the attacker's own keys (MI-DI ensemble);
    ``deployed``: per target, the deployed artifact to query (default: the PyTorch model).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    x, y = x[:cfg.n], y[:cfg.n]
    tgts = [Target(name, model.eval(), (deployed or {}).get(name)) for name, model in targets.items()]
    for t in tgts:
        status(f"clean accuracy: {t.name}")
        _clean(t, x, y, cfg, gen)
    _transfer(tgts, x, y, cfg, base, plain_ft, list(own_keys), status)
    classes = int(next(iter(targets.values())).model.num_classes)
    for t in tgts:
        if cfg.query_budgets:
            _queries(t, x, y, cfg, classes, status)
        if t.keyed.key is not None:
            _leaks(t, x, y, cfg, base_patch_weight, status)
        status(f"{t.name}: white-box with the right key (steps {', '.join(map(str, cfg.whitebox_steps))})")
        _whitebox(t, x, y, cfg)
        t.result["threat_model"] = threat_table(t, min(cfg.query_n, len(x)) if cfg.query_budgets else len(x))
    settings = asdict(cfg)
    settings.update({"linf_budget": cfg.linf().describe(), "l2_budget": cfg.l2().describe(), "n_images": len(x),
                     "whitebox_budget": cfg.linf(steps=max(cfg.whitebox_steps),
                                                 restarts=cfg.whitebox_restarts).describe()})
    return {"settings": settings, "models": {t.name: t.result for t in tgts}}


def blast_radius(devices: dict[str, KeyedClassifier], x: torch.Tensor, y: torch.Tensor,
                 cfg: EvalConfig, blast_steps: int = 50) -> dict[str, Any]:
    """K x K: white-box examples made with full knowledge of device A (weights and key), replayed on
    device B, all on the same images. The diagonal is the white-box bound."""
    names = list(devices)
    correct = {n: predict(m, x) == y for n, m in devices.items()}
    matrix = []
    budget = replace(cfg.linf(steps=blast_steps), restarts=1)
    for a in names:
        x_adv = pgd(ce_loss(devices[a]), x, y, budget, cfg.batch_size)
        matrix.append([float((correct[b] & (predict(devices[b], x_adv) == y)).float().mean()) for b in names])
    return {"devices": names, "clean": [float(correct[n].float().mean()) for n in names], "matrix": matrix,
            "n_images": len(x), "attack": budget.describe()}
