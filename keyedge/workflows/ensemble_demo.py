"""The demo's randomized defenses: a random ensemble of keyed LoRA members (one key each, from the demo's
base), served as one gathered graph with ``S`` members drawn per query, and RND (fresh Gaussian noise on every
query of the keyed LoRA model), each against the query attackers who know about it
(:mod:`keyedge.redteam.randomized`), on the images the demo's query attacks use."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..core.ensemble import load_members
from ..core.keys import Key
from ..core.keyset import KeySet
from ..core.progress import quiet, status_printer
from ..core.tables import markdown_table, pct
from ..core.runs import WEIGHTS, load_run
from ..deploy.config import ExportOptions
from ..redteam.attacks.pgd import ce_loss, pgd
from ..redteam.attacks.query import runner_model
from ..redteam.attacks.randomized import ExpectedOutput, NoisyInput
from ..redteam.randomized import RandomizedTarget, evaluate_randomized
from ..runtime.runners import EnsembleRunner, OnnxRunner, QueryNoise
from ..training.config import TrainConfig
from .config import DemoConfig
from .ensemble import export_ensemble, train_ensemble


def ensemble_targets(cfg: DemoConfig, out: Path, common: dict[str, Any], key: Key, x: torch.Tensor,
                     y: torch.Tensor, console: Console) -> dict[str, Any]:
    """Train and export the ensemble, then every randomized target against every attacker; JSON-ready."""
    runs, keys_path = out / "runs", out / "keys" / "ensemble.bin"
    keys_path.parent.mkdir(mode=0o700, exist_ok=True)
    keys = KeySet.generate(cfg.ensemble_members, cfg.block_size)
    keys.save(keys_path, overwrite=True)
    console.print(f"[bold]ensemble[/]: {len(keys)} keyed LoRA members from the base ({cfg.ensemble_epochs} epochs "
                  "each), one gathered graph")
    train_ensemble(TrainConfig(out=str(runs / "ensemble"), checkpoint=str(runs / "base" / WEIGHTS), mode="lora",
                               key=str(keys_path), epochs=cfg.ensemble_epochs, lr=cfg.lora_lr,
                               lora_rank=cfg.lora_rank, **common),
                   len(keys), console=console, echo=quiet)
    graph = out / "artifacts" / "ensemble" / "gathered"
    export_ensemble(runs / "ensemble", keys, graph, ExportOptions(), force=True, echo=quiet)
    members = load_members(runs / "ensemble", keys)
    own = [load_run(p, Key.load(out / "keys" / f"{p.name}.bin")) for p in sorted(runs.glob("own_key_*"))]
    rcfg = cfg.randomized
    torch.manual_seed(cfg.seed)
    step = rcfg.linf(cfg.eval.steps)
    transfer = {"base": pgd(ce_loss(load_run(runs / "base", None)), x, y, step, rcfg.batch_size)}
    if own:  # the attacker's own keyed fine-tunes, as an ensemble of its own
        transfer["own_keys"] = pgd(ce_loss(ExpectedOutput(own)), x, y, step, rcfg.batch_size)
    lora = load_run(runs / "keyed_lora", key)
    status = status_printer(console, "ensemble")
    results: dict[str, Any] = {"members": len(keys), "key_set_fingerprint": keys.fingerprint, "n": len(x),
                               "sigma": cfg.rnd_sigma, "targets": {}}
    shared: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        everyone = runner_model(stack.enter_context(EnsembleRunner(graph, draw=len(keys))))
        targets = [RandomizedTarget(f"ensemble N{len(keys)} S{s}",
                                    runner_model(stack.enter_context(EnsembleRunner(graph, draw=s))),
                                    ExpectedOutput(members), everyone, {"member_0": members[0]})
                   for s in cfg.ensemble_draws]
        single = out / "artifacts" / "keyed_lora" / "fused_fp32" / "model.onnx"
        targets.append(RandomizedTarget(
            f"RND sigma {cfg.rnd_sigma:g}", runner_model(stack.enter_context(QueryNoise(OnnxRunner(single),
                                                                                       cfg.rnd_sigma))),
            NoisyInput(lora, cfg.rnd_sigma, samples=4)))
        for t in targets:
            r = evaluate_randomized(t, x, y, rcfg, transfer=transfer, classes=10, status=status,
                                    shared=shared if t.expected is not None else None)
            results["targets"][t.name] = r
    return results


def threat_columns(randomized: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The randomized targets as columns of the demo's threat-model table (mean over draws): a copy of an
    ensemble's graph gives every member's key, so its file row is the white-box row."""
    columns = {}
    for name, r in randomized["targets"].items():
        t = r["threat_model"]
        top = str(max(int(b) for b in t["scores"]))

        def mean(cell: dict[str, float] | None) -> float | None:
            return None if cell is None else cell["robust_mean"]

        columns[name] = {"clean": t["clean"], "transfer": mean(t["transfer"]), "scores": mean(t["scores"][top]),
                         "labels": mean(t["labels"].get(top)), "fused_file": mean(t["all_keys"]),
                         "unfused_queries": None, "key": mean(t["all_keys"])}
    return columns


def randomized_markdown(randomized: dict[str, Any]) -> str:
    """The randomized targets attack by attack: mean over independent draws (worst draw in brackets)."""
    names = list(randomized["targets"])
    first = randomized["targets"][names[0]]
    attacks = list(first["attacks"])

    def cell(r: dict[str, Any], attack: str) -> str:
        a = r["attacks"].get(attack)
        return "—" if a is None else f"{pct(a['robust_mean'])} ({pct(a['robust_worst_draw'])})"

    rows = [["clean", *(f"{pct(r['clean_mean'])} ({pct(r['clean_worst_draw'])})"
                        for r in randomized["targets"].values())]]
    rows += [[a, *(cell(r, a) for r in randomized["targets"].values())] for a in attacks]
    return "\n".join([
        f"## Randomized defenses against attackers who know about them ({first['n']} images, {first['draws']} draws)",
        "", f"A random ensemble of {randomized['members']} keyed LoRA members (S drawn per query, CSPRNG) and RND "
        f"(Gaussian noise, sigma {randomized['sigma']:g}, on the keyed LoRA model). Each final image is scored over "
        "independent draws: mean (worst draw). `square_kK@B`: Square with B queries per image, each query asked K "
        "times and averaged (every repetition counted); `square_expected@B`: on the ensemble's exact expected "
        "output; `hopskipjump_kK@B`: label-only; `whitebox_eot`: PGD on the expected output with every key; "
        "`leaked_member_0`: PGD on one member's files.", "", markdown_table(["attack", *names], rows)])
