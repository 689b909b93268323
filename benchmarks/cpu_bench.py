"""keyedge's CPU artifacts side by side in one run: ONNX Runtime fp32 / int8 against OpenVINO fp32 / bf16 /
int8, keyed folded and gather against plain, and OpenVINO bf16 run by hand on the plain ONNX (no keyedge:
``convert_model`` and ``compile_model`` with the bf16 hint) as the bar keyedge's best artifact must meet.

* **Latency** (``--models``, default ViT-Tiny and ViT-B/16 at 224, random-init weights, batch 1 and 8):
  every artifact exported by keyedge (verified on export) and timed interleaved per model and batch, each
  with its relative logit error against the PyTorch keyed model on the timed images. int8 IR is calibrated on
  random images here (the runs have no data; timing only).
* **Parity on the demo's sets** (``--parity-n`` images): the demo's small keyed ViT on digits, trained here as
  the demo trains it, exported in every one of those forms and held to ``keyedge parity``'s rules on the clean, white-box and
  transfer sets (int8 IR calibrated on its keyed training images, as ``keyedge export`` does).

bf16 runs where OpenVINO offers BF16 on this CPU (AMX or AVX512-BF16); elsewhere its rows are absent and
the JSON says why. The CPU's ISA flags are recorded.

    python benchmarks/cpu_bench.py --out benchmarks/results/cpu_bench_<cpu>.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from _runs import make_run
from keyedge import Key
from keyedge.checks.bench import interleaved
from keyedge.checks.config import ParityConfig
from keyedge.core.progress import quiet
from keyedge.core.runs import WEIGHTS, load_run
from keyedge.deploy.config import ExportOptions
from keyedge.runtime.platform import machine_info
from keyedge.runtime.runners import open_runner
from keyedge.runtime.runners.openvino import has_bf16, openvino_core
from keyedge.workflows.export import VerificationFailed, export_run
from keyedge.workflows.openvino_export import export_ir
from keyedge.workflows.parity import run_parity

def forms(bf16: bool) -> list[tuple[str, str, str, str]]:
    """(name, runtime, precision, inference precision) of every artifact measured."""
    rows = [("ort-fp32", "onnxruntime", "fp32", "fp32"), ("ort-int8", "onnxruntime", "int8", "fp32"),
            ("ov-fp32", "openvino", "fp32", "fp32")]
    if bf16:
        rows += [("ov-bf16", "openvino", "fp32", "bf16"), ("ov-int8-bf16", "openvino", "int8", "bf16")]
    else:
        rows += [("ov-int8", "openvino", "int8", "fp32")]
    return rows


def export_all(run_for: dict[str, Path], key: Key, root: Path, bf16: bool, calibration: torch.Tensor | None,
               parity_n: int) -> tuple[dict[str, Path], dict[str, str]]:
    """Every fold x form of a model, exported (and verified) by keyedge; an IR that keyedge refuses (its parity
    gate) is reported with the reason, not measured."""
    arts, refused = {}, {}
    for fold, run in run_for.items():
        k, mode = None if fold == "plain" else key, None if fold == "plain" else fold
        for name, runtime, precision, hint in forms(bf16):
            out = root / f"{fold}-{name}"
            opts = ExportOptions(mode=mode, batch=None, precision=precision, calibration_n=64)  # type: ignore[arg-type]
            try:
                if runtime == "onnxruntime":
                    export_run(run, k, out, opts, echo=quiet)
                else:
                    export_ir(run, k, out, opts, inference_precision=hint, parity_n=parity_n,
                              calibration=calibration, echo=quiet)
            except VerificationFailed as e:
                refused[f"{fold}-{name}"] = str(e)
                print(f"{fold}-{name}: not written: {e}", flush=True)
                continue
            arts[f"{fold}-{name}"] = out
    return arts, refused


def by_hand_bf16(onnx: Path, core):
    """OpenVINO run by hand on the plain ONNX: converted, compiled with the bf16 hint, latency mode."""
    import openvino

    compiled = core.compile_model(openvino.convert_model(str(onnx)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({compiled.inputs[0]: x})


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Relative logit error, as keyedge's verification measures it."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def latency(model: str, root: Path, key: Key, args, bf16: bool, core, status) -> dict:
    keyed, plain = make_run(root, model, key), make_run(root, model, None)
    size = 224
    calibration = torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(1))
    arts, refused = export_all({"fused": keyed, "gather": keyed, "plain": plain}, key, root / model, bf16,
                               calibration, 0)  # random-init runs have no test images: timing only
    reference = {"keyed": load_run(keyed, key).eval(), "plain": load_run(plain, None).eval()}
    rows = []
    for batch in args.batches:
        x = np.random.default_rng(batch).random((batch, 3, size, size), dtype=np.float32)
        with torch.no_grad():
            want = {k: m(torch.from_numpy(x)).numpy() for k, m in reference.items()}
        fns, errors, runners = {}, {}, []
        for name, art in arts.items():
            r = open_runner(art, None if name.startswith("plain") else key)
            r.activate()
            runners.append(r)
            ref = want["plain" if name.startswith("plain") else "keyed"]
            errors[name] = rel_err(r(x), ref)
            fns[name] = (lambda r=r, x=x: r(x))
        if bf16:
            hand = by_hand_bf16(arts["plain-ort-fp32"] / "model.onnx", core)
            fns["plain-by-hand-ov-bf16"] = lambda hand=hand, x=x: hand(x)
            errors["plain-by-hand-ov-bf16"] = rel_err(np.asarray(next(iter(hand(x).values()))), want["plain"])
        status(f"{model} batch {batch}: {len(fns)} interleaved")
        timings = interleaved(fns, warmup=3, rounds=args.rounds, iters=args.iters)
        for r in runners:
            r.deactivate()
        for name, t in timings.items():
            fold, form = name.split("-", 1)
            row = {"model": model, "batch": batch, "artifact": name, "fold": fold, "form": form,
                   "rel_logit_error": errors[name], **t.summary(batch)}
            plain_name = f"plain-{form}"
            if fold != "plain" and plain_name in timings:
                row["ratio_vs_plain"] = t.median / timings[plain_name].median
            if "plain-by-hand-ov-bf16" in timings:
                row["ratio_vs_by_hand_bf16"] = t.median / timings["plain-by-hand-ov-bf16"].median
            rows.append(row)
    return {"rows": rows, "refused": refused}


def parity(root: Path, key: Key, args, bf16: bool) -> dict:
    """The demo's small keyed ViT on digits, trained here as the demo trains it (the plain base, then the keyed
    fine-tune of it: the base is the transfer attacker's surrogate), every form, under keyedge parity's rules."""
    from keyedge.training.config import TrainConfig
    from keyedge.training.train import train
    from keyedge.workflows.config import DemoConfig
    from keyedge.workflows.demo import train_kwargs

    demo = DemoConfig()
    common = {**train_kwargs(demo), "progress": False}
    run, base = root / "digits-keyed", root / "digits-base"
    key.save(root / "digits.key")
    train(TrainConfig(out=str(base), epochs=demo.base_epochs, lr=demo.base_lr, **common))
    train(TrainConfig(out=str(run), checkpoint=str(base / WEIGHTS), key=str(root / "digits.key"),
                      epochs=demo.keyed_epochs, lr=demo.keyed_lr, **common))
    arts, refused = export_all({"fused": run, "gather": run}, key, root / "digits", bf16, None, args.parity_n)
    report = run_parity(run, key, list(arts.values()), None, cfg=ParityConfig(n=args.parity_n), echo=print)
    return {"n": report["n"], "cpu": report["cpu"], "refused": refused, "artifacts": {
        Path(path).name: {"passed": r["passed"], "precision": r["precision"], "runner": r["runner"],
                          **{s: {"accuracy": v["accuracy"], "difference": v["difference"]}
                             for s, v in r["sets"].items()}}
        for path, r in report["artifacts"].items()}}


def markdown(report: dict) -> str:
    lines = ["| model | batch | artifact | p50 ms | vs plain | vs OV bf16 by hand | rel. logit error |",
             "|---|---|---|---|---|---|---|"]
    for model in report["latency"].values():
        for r in model["rows"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['artifact']} | {r['p50_ms']:.2f} | "
                         f"{r.get('ratio_vs_plain', float('nan')):.2f} | {r.get('ratio_vs_by_hand_bf16', float('nan')):.2f} "
                         f"| {r['rel_logit_error']:.1e} |")
    p = report.get("parity")
    if p:
        sets = list(next(iter(p["artifacts"].values())))[3:]
        lines += ["", "| artifact (digits) | runner | " + " | ".join(sets) + " | parity |",
                  "|---|---|" + "---|" * len(sets) + "---|"]
        for name, a in p["artifacts"].items():
            lines.append(f"| {name} | {a['runner']} | " + " | ".join(
                f"{100 * a[s]['accuracy']:.1f}% ({100 * a[s]['difference']:+.1f})" for s in sets)
                + f" | {'pass' if a['passed'] else 'FAIL'} |")
    refused = [f"- {name}: {why}" for part in (*report["latency"].values(), p or {})
               for name, why in part.get("refused", {}).items()]
    if refused:
        lines += ["", "Not written by keyedge (its parity gate), so not measured:", *refused]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_tiny_patch16_224,vit_base_patch16_224")
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--parity-n", type=int, default=200)
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the markdown of an earlier --out and stop")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    core = openvino_core()
    bf16 = has_bf16(core)
    machine = machine_info()
    machine["versions"].update({n: importlib.metadata.version(n) for n in ("openvino", "nncf")})
    report = {"machine": machine, "openvino_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
              "bf16": bf16 or "absent: OpenVINO offers no BF16 on this CPU (neither AMX nor AVX512-BF16)",
              "latency": {}, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "table")}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = Key.generate(16)
        for model in args.models.split(","):
            report["latency"][model] = latency(model, root, key, args, bf16, core, lambda s: print(s, flush=True))
        if not args.no_parity:
            report["parity"] = parity(root, Key.generate(4, seed=7), args, bf16)
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
