"""Bandwidth of keyedge's fused preprocessing kernel on a CUDA GPU.

Effective bandwidth = (uint8 input bytes + output bytes) / kernel time, compared with
the device's measured copy bandwidth (a large device-to-device copy: read + write
bytes / time). Target: >= 70% of the copy bandwidth at batch >= 8. Beside it, the time
of the ViT-B/16 forward pass the kernel feeds (torch, fp16, same batch), so the
kernel's share of an inference is visible. Needs a GPU, nvcc and cmake.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernel_bench.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from keyedge import Key
from keyedge.kernels import PreprocessKernel, build_library


def timed(fn, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` CUDA-event-timed calls."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--blocks", default="4,8,16")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    with tempfile.TemporaryDirectory() as tmp:
        kernel = PreprocessKernel(build_library(Path(tmp), archs=(f"{major}{minor}",)))
        s = args.size
        big = torch.randint(0, 256, (256 << 20,), dtype=torch.uint8, device="cuda")  # random, not zeros
        dst = torch.empty_like(big)
        copy_ms = timed(lambda: dst.copy_(big), args.iters)
        copy_gbs = 2 * big.numel() / (copy_ms * 1e6)
        results = {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "size": s, "runs": []}
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        from keyedge import create_vit

        vit = create_vit("vit_base_patch16_224", num_classes=1000).cuda().half().eval()
        for n in (int(b) for b in args.batches.split(",")):
            images = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, device="cuda")
            with torch.no_grad():
                x = torch.rand(n, 3, s, s, device="cuda", dtype=torch.half)
                vit_ms = timed(lambda: vit(x), max(10, args.iters // 5))
            for half in (False, True):
                for m in [None, *(int(b) for b in args.blocks.split(","))]:
                    key = Key.generate(m) if m else None
                    ms = timed(lambda: kernel.torch(images, key, mean, std, half=half), args.iters)
                    moved = images.numel() * (1 + (2 if half else 4))
                    gbs = moved / (ms * 1e6)
                    results["runs"].append({"batch": n, "block_size": m, "dtype": "fp16" if half else "fp32",
                                            "ms": ms, "gbs": gbs, "fraction_of_copy": gbs / copy_gbs,
                                            "vit_b16_fp16_forward_ms": vit_ms, "fraction_of_forward": ms / vit_ms})
                    print(f"batch {n:>3} block {m or '-':>3} {'fp16' if half else 'fp32'}: {ms:.3f} ms, {gbs:.0f} GB/s "
                          f"({100 * gbs / copy_gbs:.0f}% of copy {copy_gbs:.0f} GB/s); ViT-B/16 forward "
                          f"{vit_ms:.2f} ms", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
