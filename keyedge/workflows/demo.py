"""The main job on the built-in data: the whole defense shown on real handwritten digits.

A small ViT (32x32 input, patch 4, key block 4) on scikit-learn's digits:

1. pre-train a plain base: the stand-in for the public pre-trained model;
2. fine-tune from it (i) plainly, (ii) keyed, fully, (iii) keyed, with LoRA, and (iv) keyed with
   two more keys: the attacker's own-key surrogates, and two more devices of a fleet;
3. export (fused / gather, fp32 / int8), seal the keyed fused and gather artifacts to a demo device,
   and prove parity of every artifact (the bundles run from memory); audit what a copy of each file
   gives an attacker who has the public base;
4. evaluate all three deployed models against every attacker of the threat model (transfer,
   score and label-only queries through the exported artifacts, a copy of the fused file,
   un-fused weights + queries, the key) and the blast radius across the three keyed devices;
5. benchmark; write ``report.md``, ``results.json`` and the plots.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console

from ..checks.bench import run_bench
from ..checks.config import BenchConfig, ParityConfig
from ..core.data import load_data, sample
from ..core.io import atomic_write_text, check_output_dir
from ..core.keys import Key
from ..core.manifests import RunManifest, library_versions, write_json
from ..core.progress import quiet, status_printer
from ..core.runs import WEIGHTS, load_run
from ..core.tables import markdown_table, pct
from ..deploy.config import ExportOptions
from ..redteam.attacks.query import runner_model
from ..redteam.config import AuditConfig
from ..redteam.evaluate import blast_radius, evaluate
from ..redteam.report import eps_plot, eval_markdown, query_plot
from ..runtime.bundle import DeviceAccess
from ..runtime.runners import OnnxRunner
from ..training.config import TrainConfig
from ..training.train import train
from .audit import audit_release
from .config import DemoConfig
from .ensemble_demo import ensemble_targets, randomized_markdown, threat_columns
from .export import export_run
from .keys import device_keygen, publisher_keygen
from .parity import run_parity
from .sealing import seal_to


def train_kwargs(cfg: DemoConfig) -> dict[str, Any]:
    """What every training run of the demo shares."""
    return dict(model=cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=10,
                model_kwargs=cfg.model_kwargs, data="digits", seed=cfg.seed, force=True, batch_size=64)


def _train_models(cfg: DemoConfig, out: Path, key_path: Path, console: Console,
                  timings: dict[str, float]) -> dict[str, RunManifest]:
    """The base, then three fine-tunes of it: plain, keyed full, keyed LoRA."""
    runs = out / "runs"
    common = train_kwargs(cfg)
    base_ckpt = str(runs / "base" / WEIGHTS)
    plan = [
        ("base", "pre-train the plain base (stand-in for the public model)",
         TrainConfig(out=str(runs / "base"), epochs=cfg.base_epochs, lr=cfg.base_lr, **common)),
        ("plain", "fine-tune plainly from the base",
         TrainConfig(out=str(runs / "plain"), checkpoint=base_ckpt, epochs=cfg.plain_epochs,
                     lr=cfg.plain_lr, **common)),
        ("keyed_full", "fine-tune keyed, all weights",
         TrainConfig(out=str(runs / "keyed_full"), checkpoint=base_ckpt, key=str(key_path),
                     epochs=cfg.keyed_epochs, lr=cfg.keyed_lr, **common)),
        ("keyed_lora", "fine-tune keyed, LoRA",
         TrainConfig(out=str(runs / "keyed_lora"), checkpoint=base_ckpt, key=str(key_path), mode="lora",
                     epochs=cfg.lora_epochs, lr=cfg.lora_lr, lora_rank=cfg.lora_rank, **common)),
    ]
    for i in range(cfg.own_keys):  # keys the attacker draws (and other devices of the same fleet)
        own = out / "keys" / f"own_key_{i + 1}.bin"
        own.parent.mkdir(exist_ok=True)
        Key.generate(cfg.block_size).save(own, overwrite=True)
        plan.append((f"own_key_{i + 1}", "fine-tune keyed with another key (attacker surrogate / device)",
                     TrainConfig(out=str(runs / f"own_key_{i + 1}"), checkpoint=base_ckpt, key=str(own),
                                 epochs=cfg.own_key_epochs, lr=cfg.keyed_lr, **common)))
    manifests = {}
    for name, what, tcfg in plan:
        console.print(f"[bold]{name}[/]: {what} ({tcfg.epochs} epochs)")
        manifests[name] = _timed(timings, f"train_{name}", lambda tcfg=tcfg: train(tcfg, console=console))
    return manifests


def _timed(timings: dict[str, float], name: str, step):
    t0 = time.perf_counter()
    value = step()
    timings[name] = time.perf_counter() - t0
    return value


def _evaluate(cfg: DemoConfig, out: Path, key: Key, manifests: dict[str, RunManifest],
              console: Console) -> dict[str, Any]:
    """Every attacker against the three fine-tunes, the query attacks through their exported fused
    artifacts (as deployed); then the blast radius across the keyed devices; same test images."""
    runs = out / "runs"
    base = load_run(runs / "base", None)
    plain = load_run(runs / "plain", None)
    targets = {"plain": plain, "keyed_full": load_run(runs / "keyed_full", key),
               "keyed_lora": load_run(runs / "keyed_lora", key)}
    own = {name: load_run(runs / name, Key.load(out / "keys" / f"{name}.bin"))
           for name in manifests if name.startswith("own_key_")}
    data = load_data("digits", cfg.img_size)
    x, y = sample(data.test, cfg.eval.n, seed=cfg.seed)
    status = status_printer(console, "eval")
    with ExitStack() as stack:
        deployed = {name: runner_model(stack.enter_context(OnnxRunner(
            out / "artifacts" / name / "fused_fp32" / "model.onnx", key if name != "plain" else None)))
            for name in targets}
        results = evaluate(targets, x, y, cfg.eval, base=base, plain_ft=plain, own_keys=list(own.values()),
                           deployed=deployed, base_patch_weight=base.model.patch_embed.proj.weight, status=status)
    if own:
        status(f"blast radius across {1 + len(own)} keyed devices")
        results["blast_radius"] = blast_radius({"keyed_full": targets["keyed_full"], **own}, x, y, cfg.eval)
    results["data"] = data.description
    results["models"]["base"] = {"clean": manifests["base"].metrics["test_acc"]}
    for name in targets:
        m = manifests[name]
        results["models"][name]["train"] = {
            "epochs": m.epochs_done, "test_acc": m.metrics["test_acc"], "trainable_params": m.trainable_params,
            "per_key_bytes": m.per_key_bytes, "full_model_bytes": m.full_model_bytes}
    return results


def _randomized(cfg: DemoConfig, out: Path, key: Key, console: Console) -> dict[str, Any]:
    """The random ensemble and RND on the images the query attacks used (the first ``query_n``)."""
    x, y = sample(load_data("digits", cfg.img_size).test, cfg.eval.n, seed=cfg.seed)
    q = min(cfg.eval.query_n, len(x))
    return ensemble_targets(cfg, out, train_kwargs(cfg), key, x[:q], y[:q], console)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    out = check_output_dir(cfg.out, cfg.force)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, keyed weights
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    key_path = out / "key.bin"
    key = Key.generate(cfg.block_size)
    key.save(key_path, overwrite=True)
    console.print(f"[bold]key[/]: block {cfg.block_size}, fingerprint {key.fingerprint} -> {key_path} (0600)")
    manifests = _train_models(cfg, out, key_path, console, timings)
    parity = _timed(timings, "export_parity", lambda: export_and_check(cfg, out, key_path, console))
    results = _timed(timings, "evaluate", lambda: _evaluate(cfg, out, key, manifests, console))
    results["randomized"] = _timed(timings, "randomized", lambda: _randomized(cfg, out, key, console))
    results["parity"] = parity
    results["exposure"] = _timed(timings, "audit", lambda: exposure(cfg, out, key_path, console))
    results["bench"] = _timed(timings, "bench", lambda: bench_artifacts(cfg, out, key_path, console))
    results.update(key_fingerprint=key.fingerprint, seed=cfg.seed, versions=library_versions())
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = timings
    write_demo_report(results, out)
    console.print(f"[bold]done[/] in {timings['total']:.0f} s: {out / 'report.md'}, {out / 'results.json'}")
    return results


ARTIFACTS = {  # name: export options (dynamic batch, so bench can sweep batch sizes)
    "fused_fp32": dict(mode="fused", batch=None),
    "gather_fp32": dict(mode="gather", batch=None),
    "fused_int8": dict(mode="fused", precision="int8", batch=None),
}


SEALED = ("fused_fp32", "gather_fp32")  # the keyed full model's artifacts sealed to the demo device


def _seal_for_demo_device(out: Path, artifacts: list[Path], key_path: Path,
                          console: Console) -> tuple[DeviceAccess, list[Path]]:
    """A demo publisher and device key pair, and each artifact sealed to the device and signed by the
    publisher (with the key, for the gather one); the private keys stay in the demo's out/device/ and
    out/publisher/, as stand-ins for the device's secure storage and the publisher's offline key."""
    for sub in ("device", "publisher"):
        (out / sub).mkdir(mode=0o700, exist_ok=True)
    device_key, publisher_key = out / "device" / "device.key", out / "publisher" / "publisher.key"
    device = device_keygen(device_key, force=True, echo=quiet)
    publisher = publisher_keygen(publisher_key, force=True, echo=quiet)
    bundles = []
    for artifact in artifacts:
        bundle = artifact.parent / f"sealed_{artifact.name}" / "model.kes"
        bundle.parent.mkdir(mode=0o700, exist_ok=True)
        seal_to(artifact, device_key.with_suffix(".pub"), bundle, key_path, sign_with=publisher_key, force=True,
                echo=quiet)
        console.print(f"[bold]seal[/]: {artifact.name} sealed to demo device {device.fingerprint}, signed by "
                      f"publisher {publisher.fingerprint} -> {bundle}")
        bundles.append(bundle)
    return DeviceAccess(device_key, trust=(publisher_key.with_suffix(".pub"),)), bundles


def export_and_check(cfg: DemoConfig, out: Path, key_path: Path, console: Console) -> dict[str, Any]:
    """Export each keyed model (fused/gather, fp32/int8) and prove parity with its reference."""
    section: dict[str, Any] = {"n": cfg.parity_n, "models": {}}
    for model in ("keyed_full", "keyed_lora"):
        run = out / "runs" / model
        paths = []
        for name, opts in ARTIFACTS.items():
            dest = out / "artifacts" / model / name
            console.print(f"[bold]export[/]: {model} {name}")
            export_run(run, key_path, dest, ExportOptions(**opts), force=True, echo=quiet)
            paths.append(dest / "model.onnx")
        access = DeviceAccess()
        if model == "keyed_full":  # one device's bundles: sealed to a demo device key, run from memory
            access, bundles = _seal_for_demo_device(out, [out / "artifacts" / model / n for n in SEALED],
                                                        key_path, console)
            paths += bundles
        console.print(f"[bold]parity[/]: {model}, {len(paths)} artifacts on {cfg.parity_n} images")
        pcfg = ParityConfig(n=cfg.parity_n, attack=cfg.eval, seed=cfg.seed)
        report = run_parity(run, key_path, paths, out / "parity" / model, cfg=pcfg, force=True,
                            access=access, echo=quiet)
        section["models"][model] = {
            Path(p).parent.name: {"passed": r["passed"], "precision": r["precision"], "fold_mode": r["fold_mode"],
                                  "max_accuracy_difference": r["max_accuracy_difference"],
                                  "sets": r["sets"]}
            for p, r in report["artifacts"].items()}
    section["passed"] = all(a["passed"] for m in section["models"].values() for a in m.values())
    failed = [f"{model}/{name}" for model, arts in section["models"].items() for name, a in arts.items()
              if not a["passed"]]
    if failed:
        console.print(f"[bold red]parity[/]: {', '.join(failed)} FAILED on {cfg.parity_n} images "
                      f"(see {out / 'parity'}): the report says so too")
    export_run(out / "runs" / "plain", None, out / "artifacts" / "plain" / "fused_fp32", ExportOptions(batch=None),
               force=True, echo=quiet)
    return section


def exposure(cfg: DemoConfig, out: Path, key_path: Path, console: Console) -> dict[str, Any]:
    """``keyedge audit`` of what a copy of the device's files gives an attacker who has the public base:
    the keyed full model's plain artifacts, then its sealed bundles (copied without the device key)."""
    arts = out / "artifacts" / "keyed_full"
    paths = [arts / name for name in ARTIFACTS] + [arts / f"sealed_{name}" / "model.kes" for name in SEALED]
    console.print(f"[bold]audit[/]: what a copy of each of {len(paths)} device files yields")
    return audit_release(paths, out / "runs" / "base" / WEIGHTS, key_path, out / "audit",
                         AuditConfig(n=cfg.parity_n, seed=cfg.seed), force=True, echo=quiet)


def bench_artifacts(cfg: DemoConfig, out: Path, key_path: Path, console: Console) -> dict[str, Any]:
    """Keyed (fused, gather, int8) vs the plain model, ONNX Runtime on this CPU, interleaved."""
    plain = out / "artifacts" / "plain" / "fused_fp32"
    keyed = [out / "artifacts" / "keyed_full" / name for name in ARTIFACTS]
    console.print("[bold]bench[/]: keyed (fused, gather, int8) vs plain, ONNX Runtime, batch 1 and 8")
    results = run_bench([*keyed, plain], BenchConfig(batches=cfg.bench_batches, rounds=cfg.bench_rounds,
                                                     iters=cfg.bench_iters), key=Key.load(key_path))
    return {"batches": list(cfg.bench_batches), "machine": results["machine"],
            "measurements": [{k: v for k, v in m.items() if k != "artifact"} | {"model": Path(m["artifact"]).name}
                             for m in results["measurements"]]}


def write_demo_report(results: dict[str, Any], out: Path) -> None:
    write_json(out / "results.json", results)
    eval_results = {"settings": results["settings"],
                    "models": {k: v for k, v in results["models"].items() if k != "base"}}
    plots = [(eps_plot(eval_results, out / "robust_vs_eps.png"), "robust accuracy against eps"),
             (query_plot(eval_results, out / "robust_vs_queries.png"), "robust accuracy against queries")]
    if "blast_radius" in results:
        eval_results["blast_radius"] = results["blast_radius"]
    randomized = results.get("randomized")
    lines = [eval_markdown(eval_results, "keyedge demo: a keyed ViT on real handwritten digits",
                           extra_columns=threat_columns(randomized) if randomized else None),
             *([randomized_markdown(randomized), ""] if randomized else []),
             "## Training", "",
             f"Data: {results['data']}. Base (plain, stand-in for the public pre-trained model): "
             f"{100 * results['models']['base']['clean']:.1f}% test accuracy.", "",
             markdown_table(["model", "epochs", "test acc", "trainable params", "per-key storage", "full model"],
                            [[name, t["epochs"], f"{100 * t['test_acc']:.1f}%", f"{t['trainable_params']:,}",
                              f"{t['per_key_bytes'] / 1024:.0f} KiB", f"{t['full_model_bytes'] / 1024:.0f} KiB"]
                             for name, t in ((n, r["train"]) for n, r in eval_results["models"].items())])]
    parity = results.get("parity")
    if parity:
        sets = list(next(iter(next(iter(parity["models"].values())).values()))["sets"])
        lines += ["", f"## Export and parity ({parity['n']} images; accuracy of the ONNX artifact, "
                      "difference to the PyTorch reference in points)", "",
                  markdown_table(["model", "artifact", *sets, "verdict"],
                                 [[model, name, *(f"{100 * s['accuracy']:.1f}% ({100 * s['difference']:+.1f})"
                                                  for s in a["sets"].values()), "pass" if a["passed"] else "FAIL"]
                                  for model, arts in parity["models"].items() for name, a in arts.items()])]
    exposed = results.get("exposure")
    if exposed:
        lines += ["", "## What a copy of the device's files yields (`keyedge audit`, keyed full model)", "",
                  "Attacker: a copy of each file and the public base. Fused files: their patch-embedding columns "
                  "matched to the base's (linear assignment), then white-box PGD l_inf 8/255 (50 steps) with the "
                  f"key read off, on {exposed['n_images']} test images. Gather files hold no key, but take it from "
                  "key.bin beside them: a copy of the device's plain files holds it whole. Sealed bundles: copied "
                  "without the device's private key, their bytes scanned for the key and the model.", "",
                  markdown_table(["file", "kind", "holds the key", "key recovered", "clean", "white-box robust"],
                                 [[Path(f["artifact"]).parent.name, f["kind"], "yes" if f["holds_key"] else "no",
                                   pct(f["fraction"]), pct(f["clean"]), pct(f["whitebox_robust"])]
                                  for f in exposed["artifacts"]])]
    bench = results.get("bench")
    if bench:
        lines += ["", f"## Latency on this machine ({bench['machine']['cpu']}, ONNX Runtime, interleaved; "
                      "median ms, ratio to the plain model)", "",
                  markdown_table(["model", "batch", "p50 ms", "p90 ms", "images/s", "vs plain"],
                                 [[m["kind"], m["batch"], f"{m['p50_ms']:.2f}", f"{m['p90_ms']:.2f}",
                                   f"{m['throughput_ips']:.0f}",
                                   f"{m['ratio_vs_plain']:.3f}" if "ratio_vs_plain" in m else "—"]
                                  for m in bench["measurements"]])]
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items()), ""]
    lines += [f"![{caption}]({plot.name})\n" for plot, caption in plots if plot is not None]
    atomic_write_text(out / "report.md", "\n".join(lines))
