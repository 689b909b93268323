"""Export benchmark (CPU): keyed ViT-B/16 through ONNX Runtime, measured interleaved.

Measures, in one run on this machine:
  * folded keyed vs plain model latency (ONNX Runtime, fp32, batch 1),
  * gather (key as a graph input) vs plain,
  * ONNX Runtime vs PyTorch eager (the keyed reference),
  * int8 (dynamic) vs fp32,
  * the time to produce a new keyed ViT-B/16 artifact from a LoRA adapter:
    merge + fold + export + ONNX Runtime verification.

Random-init weights are fine for latency. Usage:
    python benchmarks/export_bench.py --model vit_base_patch16_224 --out benchmarks/results/export_vitb.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _runs import make_run
from keyedge import Key, KeyedClassifier
from keyedge.checks.bench import interleaved, ratio
from keyedge.workflows.export import export_run
from keyedge.core.progress import quiet
from keyedge.deploy.config import ExportOptions
from keyedge.runtime.platform import machine_info
from keyedge.runtime.runners import OnnxRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {"model": args.model, "block_size": args.block_size, "batch": 1,
                     "machine": machine_info(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = Key.generate(args.block_size)
        key.save(root / "key.bin")
        run = make_run(root, args.model, key, mode="lora")

        t0 = time.perf_counter()
        export_run(run, root / "key.bin", root / "fused", ExportOptions(mode="fused"), echo=quiet)
        results["new_keyed_artifact_s"] = time.perf_counter() - t0  # merge + fold + export + verify
        print(f"new keyed artifact from an adapter: {results['new_keyed_artifact_s']:.1f} s", flush=True)
        export_run(run, root / "key.bin", root / "gather", ExportOptions(mode="gather"), echo=quiet)
        export_run(run, root / "key.bin", root / "int8", ExportOptions(mode="fused", precision="int8"), echo=quiet)

        # the plain (un-keyed) model: same weights, no key, normalisation folded alike
        from keyedge.deploy.onnx_export import export_onnx
        from keyedge.core.manifests import read_run
        from keyedge.core.runs import load_run

        keyed = load_run(run, key)
        plain = KeyedClassifier(keyed.model, None, keyed.mean.flatten().tolist(), keyed.std.flatten().tolist())
        (root / "plain").mkdir()
        plain_manifest = read_run(run).replace(block_size=None, key_fingerprint=None)
        export_onnx(plain.eval(), root / "plain", ExportOptions(), plain_manifest)

        runners = {name: OnnxRunner(root / name / "model.onnx", key).__enter__()
                   for name in ("plain", "fused", "gather", "int8")}
        x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
        xt = torch.from_numpy(x)
        keyed.eval()

        def torch_eager():
            with torch.no_grad():
                keyed(xt)

        fns = {f"ort_{n}": (lambda r=r: r(x)) for n, r in runners.items()}
        fns["torch_eager_keyed"] = torch_eager
        timings = interleaved(fns, rounds=args.rounds, iters=args.iters,
                              status=lambda s: print(s, flush=True))
        results["latency"] = {n: t.summary() for n, t in timings.items()}
        results["ratios"] = {
            "folded_vs_plain": ratio(timings, "ort_fused", "ort_plain"),
            "gather_vs_plain": ratio(timings, "ort_gather", "ort_plain"),
            "ort_vs_torch_eager": ratio(timings, "ort_fused", "torch_eager_keyed"),
            "int8_speedup_vs_fp32": ratio(timings, "ort_fused", "ort_int8"),
        }
        results["note"] = "latency medians in ms; ratios are median(a)/median(b) measured interleaved"
    print(json.dumps({"latency_p50_ms": {k: round(v["p50_ms"], 2) for k, v in results["latency"].items()},
                      "ratios": {k: round(v, 3) for k, v in results["ratios"].items()},
                      "new_keyed_artifact_s": round(results["new_keyed_artifact_s"], 1)}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
