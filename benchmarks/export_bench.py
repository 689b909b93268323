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
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keyedge import Key, KeyedClassifier, attach_lora, create_vit
from keyedge.bench import interleaved, ratio
from keyedge.cli import export_run
from keyedge.lora import save_adapter
from keyedge.manifest import library_versions, write_json
from keyedge.onnx_export import ExportOptions
from keyedge.runners import OnnxRunner
from keyedge.runs import ADAPTER, MANIFEST
from keyedge.models import file_sha256, model_input_spec


def make_lora_run(root: Path, model_name: str, key: Key) -> tuple[Path, Path]:
    """A base checkpoint and a LoRA run over it (random adapter weights), as `keyedge train` writes them."""
    from safetensors.torch import save_file

    base = create_vit(model_name, num_classes=1000)
    base_path = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    peft_model = attach_lora(base, rank=8)
    with torch.no_grad():  # a trained adapter: non-zero B so the merge changes weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    run = root / "run"
    run.mkdir()
    save_adapter(peft_model, run / ADAPTER)
    spec = model_input_spec(base)
    manifest = {"format": "keyedge-run", "version": 1,
                "model": {"name": model_name, "kwargs": {"num_classes": 1000, "img_size": spec["img_size"][0],
                                                         "patch_size": spec["patch_size"][0]}},
                "mode": "lora", "input": {"size": spec["img_size"], "channels": 3, "layout": "NCHW",
                                          "dtype": "float32", "range": [0.0, 1.0], "mean": spec["mean"],
                                          "std": spec["std"]},
                "block_size": key.block_size, "key_fingerprint": key.fingerprint,
                "base_checkpoint": {"path": str(base_path), "sha256": file_sha256(base_path)},
                "data": {"spec": "benchmark-random-inputs", "classes": None}}
    write_json(run / MANIFEST, manifest)
    return base_path, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    quiet = lambda *a, **k: None  # noqa: E731
    results: dict = {"model": args.model, "block_size": args.block_size, "batch": 1,
                     "machine": {"cpu": platform.processor() or platform.machine(),
                                 "cores": torch.get_num_threads()}, "versions": library_versions()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = Key.generate(args.block_size)
        key.save(root / "key.bin")
        base_path, run = make_lora_run(root, args.model, key)

        t0 = time.perf_counter()
        export_run(run, root / "key.bin", root / "fused", ExportOptions(mode="fused"), echo=quiet)
        results["new_keyed_artifact_s"] = time.perf_counter() - t0  # merge + fold + export + verify
        print(f"new keyed artifact from an adapter: {results['new_keyed_artifact_s']:.1f} s", flush=True)
        export_run(run, root / "key.bin", root / "gather", ExportOptions(mode="gather"), echo=quiet)
        export_run(run, root / "key.bin", root / "int8", ExportOptions(mode="fused", precision="int8"), echo=quiet)

        # the plain (un-keyed) model: same weights, no key, normalisation folded alike
        from keyedge.onnx_export import export_onnx
        from keyedge.runs import load_run, read_run_manifest

        keyed = load_run(run, key)
        plain = KeyedClassifier(keyed.model, None, keyed.mean.flatten().tolist(), keyed.std.flatten().tolist())
        (root / "plain").mkdir()
        plain_manifest = {**read_run_manifest(run), "block_size": None, "key_fingerprint": None}
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
