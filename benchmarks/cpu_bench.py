"""CPU latency of keyed ViTs through `keyedge bench`: ViT-Tiny and ViT-B/16, batch 1 and 8,
fp32 and int8, keyed-folded / keyed-gather / plain, measured interleaved per model size.

    python benchmarks/cpu_bench.py --out benchmarks/results/cpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _runs import make_run
from keyedge import Key
from keyedge.checks.bench import bench_markdown, run_bench
from keyedge.checks.config import BenchConfig
from keyedge.workflows.export import export_run
from keyedge.core.progress import quiet
from keyedge.deploy.config import ExportOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_tiny_patch16_224,vit_base_patch16_224")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    batches = tuple(int(b) for b in args.batch.split(","))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = Key.generate(16)
        key.save(root / "key.bin")
        for model in args.models.split(","):
            keyed_run, plain_run = make_run(root, model, key), make_run(root, model, None)
            arts = []
            for name, run, k, opts in (
                    ("fused_fp32", keyed_run, root / "key.bin", ExportOptions(mode="fused", batch=None)),
                    ("gather_fp32", keyed_run, root / "key.bin", ExportOptions(mode="gather", batch=None)),
                    ("plain_fp32", plain_run, None, ExportOptions(batch=None)),
                    ("fused_int8", keyed_run, root / "key.bin", ExportOptions(mode="fused", batch=None, precision="int8")),
                    ("gather_int8", keyed_run, root / "key.bin", ExportOptions(mode="gather", batch=None, precision="int8")),
                    ("plain_int8", plain_run, None, ExportOptions(batch=None, precision="int8"))):
                export_run(run, k, root / model / name, opts, echo=quiet)
                arts.append(root / model / name)
            results = run_bench(arts, BenchConfig(batches=batches, rounds=args.rounds, iters=args.iters), key=key,
                                status=lambda s: print(model, s, flush=True))
            for m in results["measurements"]:
                m["artifact"] = Path(m["artifact"]).name
            report[model] = results
            print(bench_markdown(results), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
