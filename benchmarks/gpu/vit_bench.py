"""Keyed ViT on one GPU: fine-tuning steps with AMP (images/s, full and LoRA, keyed against plain) and
inference in fp16 with the key folded against the plain model (the fold's cost: 1.00 is free).

Random-init weights and random images (no download): timing only. Each figure is the median of timed
iterations after warm-up, CUDA-event timed (on the CPU, for the smoke run, wall clock).

    python benchmarks/gpu/vit_bench.py --out OUT/vit_bench.json                    # the GPU check
    python benchmarks/gpu/vit_bench.py --device cpu --model vit_tiny_patch16_224 --img-size 32 \\
        --train-batch 4 --batches 1,2 --steps 2 --out /tmp/v.json                # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from keyedge import Key, attach_lora, create_vit
from keyedge.core.fold import fold_key
from keyedge.core.models import KeyedClassifier


def timer(device: str):
    """``measure(fn, iters)``: the median milliseconds of ``fn`` (CUDA events on a GPU)."""
    def measure(fn, iters: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return sorted(times)[len(times) // 2]
    return measure


def _model(args, key: Key | None, lora: bool) -> KeyedClassifier:
    torch.manual_seed(0)
    vit = create_vit(args.model, num_classes=1000, img_size=args.img_size)
    if lora:
        vit = attach_lora(vit, rank=8)
    return KeyedClassifier(vit, key).to(args.device)


def train_steps(args, key: Key, measure) -> list[dict]:
    """Images/s of AMP fine-tuning steps (forward, backward, AdamW), keyed and plain, full and LoRA."""
    amp = torch.bfloat16 if args.device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    rows = []
    for mode in ("full", "lora"):
        for keyed in (True, False):
            model = _model(args, key if keyed else None, lora=mode == "lora").train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda")
            x = torch.rand(args.train_batch, 3, args.img_size, args.img_size, device=args.device)
            y = torch.randint(0, 1000, (args.train_batch,), device=args.device)

            def step():
                with torch.autocast(args.device, dtype=amp):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = measure(step, args.steps)
            rows.append({"mode": mode, "keyed": keyed, "batch": args.train_batch, "amp": str(amp).split(".")[-1],
                         "ms_per_step": ms, "images_per_s": 1e3 * args.train_batch / ms,
                         "trainable_params": sum(p.numel() for p in params)})
    for mode in ("full", "lora"):
        keyed, plain = (next(r for r in rows if r["mode"] == mode and r["keyed"] is k) for k in (True, False))
        keyed["keyed_over_plain_time"] = keyed["ms_per_step"] / plain["ms_per_step"]
    return rows


@torch.no_grad()
def inference(args, key: Key, measure) -> list[dict]:
    """fp16 forward, the key folded into the patch embedding against the plain model, interleaved."""
    dtype = torch.float16 if args.device == "cuda" else torch.bfloat16
    keyed = _model(args, key, lora=False).eval()
    folded = fold_key(keyed.cpu()).to(args.device, dtype).eval()
    plain = _model(args, None, lora=False).to(dtype).eval()
    rows = []
    for batch in args.batches:
        x = torch.rand(batch, 3, args.img_size, args.img_size, device=args.device, dtype=dtype)
        times: dict[str, list[float]] = {"folded": [], "plain": []}
        for _ in range(args.rounds):  # interleaved: the two meet the same clocks
            times["folded"].append(measure(lambda: folded(x), args.steps))
            times["plain"].append(measure(lambda: plain(x), args.steps))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append({"batch": batch, "dtype": str(dtype).split(".")[-1], "folded_ms": med["folded"],
                     "plain_ms": med["plain"], "folded_over_plain": med["folded"] / med["plain"],
                     "images_per_s_folded": 1e3 * batch / med["folded"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vit_bench: no CUDA GPU here (--device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    key = Key.generate(args.block_size, seed=0)  # timing only: a seeded key guards nothing
    measure = timer(args.device)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "model": args.model, "img_size": args.img_size,
              "block_size": args.block_size, "train": train_steps(args, key, measure),
              "inference": inference(args, key, measure)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in report["train"]:
        print(f"train {r['mode']:4} {'keyed' if r['keyed'] else 'plain'}: {r['images_per_s']:.0f} images/s "
              f"(batch {r['batch']}, {r['amp']})")
    for r in report["inference"]:
        print(f"infer batch {r['batch']}: folded {r['folded_ms']:.3f} ms, plain {r['plain_ms']:.3f} ms, "
              f"ratio {r['folded_over_plain']:.3f}")


if __name__ == "__main__":
    main()
