"""Query attackers against random ensembles of keyed LoRA members, and RND, through the deployed artifacts.

On scikit-learn's digits (the demo's small ViT, patch 4, key block 4): a plain base is pre-trained; 8 keyed
LoRA members are fine-tuned from it (one key set); the attacker fine-tunes 2 members of its own keys. The
targets, all exported to ONNX and run by ONNX Runtime as deployed:

* ``N1``: one keyed model (member 0, fused): the single-key defense;
* ``N4 S1``, ``N4 S2``: members 0-3 as one gathered graph, 1 or 2 of them drawn per query (OS CSPRNG);
* ``N8 S1``, ``N8 S2``: all 8 members;
* ``RND``: ``N1`` with Gaussian noise (sigma ``--sigma``) added to every query (Qin et al., NeurIPS 2021).

Every target meets the same images and attacks (:mod:`keyedge.redteam.randomized`): Square and
HopSkipJump at each budget, plain and EOT (k repeats per query, all counted), Square on the expected
output, transfer from the public base and from the attacker's own-key ensemble, white-box PGD on the
expected output given every key, and PGD on one leaked member; each final image scored over independent
draws. Clean accuracy, latency (batch 1, per query, side by side in this run) and the artifact's bytes
are recorded beside each row.

    python benchmarks/ensemble_attack_bench.py --out /tmp/ens-bench            # the recorded run
    python benchmarks/ensemble_attack_bench.py --out /tmp/ens-q --quick         # a smoke run

The whole run is longer than one sitting on 2 cores (HopSkipJump spends its 5,000 queries per image on most
images of an ensemble), so it goes on where a previous run stopped: the keys are seeded (insecure: these
models guard nothing) and training is deterministic on one CPU, so a later run rebuilds the same models; the
targets already in ``--json`` are kept when its models' SHA-256 and settings are this run's, and refused
(exit 2) otherwise unless ``--fresh``. ``--stop-after S`` starts no target after ``S`` seconds. Each row
records the machine it ran on; the latency columns are measured again, side by side, for every target in
the JSON at the end of each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from keyedge.core.data import load_data, sample
from keyedge.core.ensemble import load_members, read_ensemble
from keyedge.core.keyset import KeySet
from keyedge.core.manifests import EnsembleManifest, write_json
from keyedge.workflows.config import SMALL_VIT
from keyedge.core.progress import quiet
from keyedge.core.runs import WEIGHTS, load_run
from keyedge.deploy.config import ExportOptions
from keyedge.redteam.attacks.pgd import ce_loss, pgd
from keyedge.redteam.attacks.query import runner_model
from keyedge.redteam.attacks.randomized import ExpectedOutput, NoisyInput
from keyedge.redteam.config import RandomizedConfig
from keyedge.redteam.randomized import RandomizedTarget, evaluate_randomized
from keyedge.runtime.platform import machine_info
from keyedge.runtime.runners import OnnxRunner
from keyedge.runtime.runners.ensemble import EnsembleRunner, QueryNoise
from keyedge.training.config import TrainConfig
from keyedge.training.ensemble import train_ensemble
from keyedge.training.train import train
from keyedge.workflows.ensemble import export_ensemble
from keyedge.workflows.export import export_run

COMMON = dict(model="vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10, model_kwargs=dict(SMALL_VIT),
              data="digits", batch_size=64, force=True)


def _train(out: Path, args) -> tuple[Path, Path, Path]:
    """The base, the defender's 8 members and the attacker's own 4 (skipped when already there)."""
    base = out / "base"
    if not (base / WEIGHTS).is_file():
        train(TrainConfig(out=str(base), epochs=args.base_epochs, lr=2e-3, seed=args.seed, **COMMON))
    for name, n, seed in (("defender", 8, args.seed + 100), ("attacker", 2, args.seed + 200)):
        if not (out / name / "ensemble" / "ensemble.json").is_file():
            (out / name).mkdir(parents=True, exist_ok=True, mode=0o700)
            keys = KeySet.generate(n, 4, seed=seed)  # seeded (insecure): a later run rebuilds the same models
            keys.save(out / name / "keys.bin", overwrite=True)
            train_ensemble(TrainConfig(out=str(out / name / "ensemble"), checkpoint=str(base / WEIGHTS),
                                       mode="lora", lora_rank=8, epochs=args.member_epochs, lr=3e-3, seed=seed,
                                       **COMMON), keys)
    return base, out / "defender", out / "attacker"


def _first(defender: Path, n: int) -> tuple[Path, KeySet]:
    """An ensemble run of the defender's first ``n`` members (the same member runs, referenced)."""
    ens = read_ensemble(defender / "ensemble")
    keys = KeySet.load(defender / "keys.bin")
    sub = defender / f"first{n}"
    sub.mkdir(exist_ok=True, mode=0o700)
    subset = KeySet(list(keys)[:n])
    EnsembleManifest(key_set_fingerprint=subset.fingerprint, mode=ens.mode,
                     members=tuple(replace(m, run=f"../ensemble/{m.run}") for m in ens.members[:n])).write(
        sub / "ensemble.json")
    return sub, subset


TARGETS = ("N1", "N4S1", "N8S1", "RND", "N4S2", "N8S2")
# what must be equal for a target measured by an earlier run to stand beside this run's
SAME_SETTINGS = ("n", "budgets", "eot", "draws", "sigma", "base_epochs", "member_epochs", "expected_max", "seed")


def _models_sha256(out: Path) -> str:
    """One SHA-256 over every weights file the run trained (base, members, the attacker's), in path order."""
    h = hashlib.sha256()
    for f in sorted(out.glob("*/**/*.safetensors")):
        if f.relative_to(out).parts[0] in ("base", "defender", "attacker"):
            h.update(str(f.relative_to(out)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _kept_targets(path: Path, identity: dict, fresh: bool) -> dict:
    """The targets an earlier run of the same models and settings measured (none when ``fresh`` or no file);
    exit 2 when ``path`` holds another run's. ``identity`` may lack the models' hash (checked before training)."""
    if fresh or not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    differ = sorted(k for k in identity if earlier.get("identity", {}).get(k) != identity[k])
    if differ:
        print(f"error: {path} was measured with other {', '.join(differ)}; --fresh starts it anew", file=sys.stderr)
        sys.exit(2)
    return earlier["targets"]


def _latency(runner, x: np.ndarray, iters: int) -> float:
    """Median ms per query (batch 1)."""
    runner(x[:1])
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        runner(x[i % len(x):i % len(x) + 1])
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="working directory (runs, artifacts); required unless --table")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--budgets", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--eot", type=int, nargs="+", default=[1, 4])
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--sigma", type=float, default=0.02)
    p.add_argument("--base-epochs", type=int, default=12)
    p.add_argument("--member-epochs", type=int, default=8)
    p.add_argument("--expected-max", type=int, default=1000, help="Square on the expected output up to this budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--quick", action="store_true", help="tiny budgets and images: a smoke run")
    p.add_argument("--json", type=Path, default=None,
                   help="results (default: results/ensemble_attack.json; with --quick, OUT/ensemble_attack.json)")
    p.add_argument("--table", action="store_true", help="print the markdown tables of --json and stop")
    p.add_argument("--fresh", action="store_true", help="start --json anew (its targets were made with other models)")
    p.add_argument("--stop-after", type=float, default=None, help="start no target after this many seconds")
    args = p.parse_args()
    if args.json is None:
        args.json = (args.out if args.quick and args.out else Path(__file__).parent / "results") / "ensemble_attack.json"
    if args.table:
        print(markdown(json.loads(args.json.read_text())))
        return
    if args.out is None:
        p.error("--out is required")
    if args.quick:
        args.n, args.budgets, args.draws, args.base_epochs, args.member_epochs = 8, [20, 60], 3, 2, 1
        args.expected_max = 60
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}: choose from {list(TARGETS)}")
    _kept_targets(args.json, {k: getattr(args, k) for k in SAME_SETTINGS}, args.fresh)  # before any training
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base_dir, defender, attacker = _train(out, args)
    arts = out / "artifacts"
    keys8 = KeySet.load(defender / "keys.bin")
    four, keys4 = _first(defender, 4)
    opts = ExportOptions(batch=None)  # any batch: attacks query many images at once
    if not (arts / "N1" / "model.onnx").is_file():
        export_run(defender / "ensemble" / "member-0", keys8[0], arts / "N1", opts, force=True, echo=quiet)
    for name, run, keys in (("N4", four, keys4), ("N8", defender / "ensemble", keys8)):
        if not (arts / name / "model.onnx").is_file():
            export_ensemble(run, keys, arts / name, opts, force=True, echo=quiet)
    train_s = time.perf_counter() - t_start
    identity = {"models_sha256": _models_sha256(out), **{k: getattr(args, k) for k in SAME_SETTINGS}}
    kept = _kept_targets(args.json, identity, args.fresh)

    data = load_data("digits", 32)
    x, y = sample(data.test, args.n, seed=args.seed)
    base = load_run(base_dir, None)
    members8 = load_members(defender / "ensemble", keys8)
    own = load_members(attacker / "ensemble", KeySet.load(attacker / "keys.bin"))
    cfg = RandomizedConfig(budgets=tuple(args.budgets), eot=tuple(args.eot), draws=args.draws, seed=args.seed,
                           square_expected_max=args.expected_max)
    shared: dict[str, dict] = {}  # per ensemble: images crafted without its randomness, the same for S = 1 and 2
    torch.manual_seed(args.seed)
    step = cfg.linf(10)
    transfer = {"base": pgd(ce_loss(base), x, y, step, cfg.batch_size),
                "own_key_ensemble": pgd(ce_loss(ExpectedOutput(own)), x, y, step, cfg.batch_size)}
    results: dict = {"targets": kept, "identity": identity,
                     "settings": {**vars(args), "out": str(args.out), "json": str(args.json)}}
    xs = x.numpy()
    with ExitStack() as stack:
        single = stack.enter_context(OnnxRunner(arts / "N1" / "model.onnx"))
        runners = {"N1": (single, arts / "N1", ExpectedOutput(members8[:1]), None, {}),
                   "RND": (stack.enter_context(QueryNoise(OnnxRunner(arts / "N1" / "model.onnx"), args.sigma)),
                           arts / "N1", NoisyInput(members8[0], args.sigma, samples=8), None, {})}
        for n, members in ((4, members8[:4]), (8, members8)):
            everyone = stack.enter_context(EnsembleRunner(arts / f"N{n}", draw=n))  # the exact expectation
            for s in (1, 2):
                runners[f"N{n}S{s}"] = (stack.enter_context(EnsembleRunner(arts / f"N{n}", draw=s)), arts / f"N{n}",
                                        ExpectedOutput(members), runner_model(everyone),
                                        {"member_0": members[0]})
        for name in args.targets:
            if name in kept:
                print(f"{name}: kept from {args.json} (measured on {kept[name]['machine']['cpu']})", flush=True)
                continue
            if args.stop_after is not None and time.perf_counter() - t_start > args.stop_after:
                print(f"{name}: not started (--stop-after {args.stop_after:.0f} s)", flush=True)
                continue
            runner, art, whitebox, expected, leaked = runners[name]
            t0 = time.perf_counter()
            target = RandomizedTarget(name, runner_model(runner), whitebox, expected, leaked)
            r = evaluate_randomized(target, x, y, cfg, transfer=transfer, classes=10,
                                    shared=shared.setdefault(name[:2], {}),
                                    status=lambda s: print(f"[{time.perf_counter() - t_start:7.0f} s] {s}",
                                                           flush=True))
            r["latency_ms_batch1"] = _latency(runner, xs, 200)
            r["artifact_bytes"] = sum(f.stat().st_size for f in art.glob("*.onnx*"))
            r["rows_per_query"] = int(name[-1]) if name.startswith("N") and "S" in name else 1
            r["eval_s"] = time.perf_counter() - t0
            r["machine"] = machine_info()
            results["targets"][name] = r
            print(f"{name}: clean {r['clean_mean']:.3f}, {r['eval_s']:.0f} s", flush=True)
            write_json(args.json, {**results, "machine": machine_info(), "python": platform.python_version(),
                                   "torch": torch.__version__, "train_export_s": train_s})
    # latencies of every target in the JSON measured again side by side, interleaved, once no attack runs
    names = [n for n in TARGETS if n in results["targets"]]
    lat: dict[str, list[float]] = {name: [] for name in names}
    with ExitStack() as stack:
        live = {name: stack.enter_context(_reopen(name, arts, args.sigma)) for name in names}
        for _ in range(5):
            for name, runner in live.items():
                lat[name].append(_latency(runner, xs, 100))
    for name in names:
        results["targets"][name]["latency_ms_batch1_interleaved"] = float(np.median(lat[name]))
    results["latency_machine"] = machine_info()
    write_json(args.json, {**results, "machine": machine_info(), "python": platform.python_version(),
                           "torch": torch.__version__, "train_export_s": train_s,
                           "total_s": time.perf_counter() - t_start})
    print(json.dumps({n: {"clean": r["clean_mean"], "threat": r["threat_model"]}
                      for n, r in results["targets"].items()}, indent=1))


def markdown(results: dict) -> str:
    """BENCHMARKS.md's tables from the results JSON: robust accuracy (mean over draws, worst draw in brackets)."""
    targets = results["targets"]
    budgets = results["settings"]["budgets"]
    eot = results["settings"]["eot"]

    def cell(r: dict, attack: str) -> str:
        a = r["attacks"].get(attack)
        return "—" if a is None else f"{100 * a['robust_mean']:.0f}% ({100 * a['robust_worst_draw']:.0f})"

    def table(columns: list[tuple[str, str]]) -> list[str]:
        lines = ["| target | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, r in targets.items():
            lines.append(f"| {name} | " + " | ".join(cell(r, a) for _, a in columns) + " |")
        return lines

    square = [(f"Square k={k} @{b}", f"square_k{k}@{b}") for k in eot for b in budgets]
    square += [(f"Square expected @{b}", f"square_expected@{b}") for b in budgets
               if b <= results["settings"]["expected_max"]]
    labels = [(f"HSJ k={k} @{b}", f"hopskipjump_k{k}@{b}") for k in eot for b in budgets]
    other = [("transfer base", "transfer_base"), ("transfer own-key ens.", "transfer_own_key_ensemble"),
             ("white-box EOT, all keys", "whitebox_eot"), ("one leaked member", "leaked_member_0")]
    costs = ["| target | clean (worst draw) | ms / query, batch 1 | artifact bytes | rows per query | attacked on |",
             "|---|---|---|---|---|---|"]
    for name, r in targets.items():
        costs.append(f"| {name} | {100 * r['clean_mean']:.0f}% ({100 * r['clean_worst_draw']:.0f}) | "
                     f"{r.get('latency_ms_batch1_interleaved', r['latency_ms_batch1']):.2f} | "
                     f"{r['artifact_bytes']:,} | {r['rows_per_query']} | "
                     f"{r.get('machine', {}).get('cpu', '?')}, {r['eval_s'] / 60:.0f} min |")
    def row(r: dict | None) -> str:
        return "—" if r is None else (f"{100 * r['robust_mean']:.0f}% ({100 * r['robust_worst_draw']:.0f}; "
                                      f"{100 * r['robust_every_draw']:.0f})")

    rows = [("scores", b) for b in budgets] + [("labels", b) for b in budgets]
    threat = ["| target | " + " | ".join(f"{kind} @{b}" for kind, b in rows) + " | transfer | one leaked member "
              "| all keys |", "|---" * (len(rows) + 4) + "|"]
    for name, r in targets.items():
        t = r["threat_model"]
        threat.append(f"| {name} | " + " | ".join(row(t[kind].get(str(b))) for kind, b in rows) + " | "
                      + " | ".join(row(t[k]) for k in ("transfer", "leaked_member", "all_keys")) + " |")
    return "\n".join([*costs, "", *table(square), "", *table(labels), "", *table(other), "", *threat])


def _reopen(name: str, arts: Path, sigma: float):
    if name == "N1":
        return OnnxRunner(arts / "N1" / "model.onnx")
    if name == "RND":
        return QueryNoise(OnnxRunner(arts / "N1" / "model.onnx"), sigma)
    return EnsembleRunner(arts / name[:2], draw=int(name[-1]))


if __name__ == "__main__":
    main()
