"""Latency measurement: warm-up, many timed calls, percentiles, and interleaving.

Models compared with each other (keyed-folded, keyed-gather, plain; ONNX Runtime
vs PyTorch) are measured *interleaved* in the same run -- round-robin in short
bursts -- so that clock changes and background load hit all of them alike, and
reported as ratios of medians.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import KeyedgeError
from ..core.keys import Key
from ..core.models import create_vit
from ..core.tables import markdown_table
from ..runtime.artifacts import open_artifact
from ..runtime.bundle import Opener
from ..runtime.kernel import PreprocessKernel, find_library
from ..runtime.platform import is_jetson_orin, machine_info
from ..runtime.runners import Runner, runner_for
from ..runtime.runners.onnxruntime import gpu_backends
from .config import BENCH_DEVICES, BenchConfig


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def median(self) -> float:
        return self.pct(50)

    def summary(self, batch: int = 1) -> dict[str, float]:
        return {"p50_ms": self.median, "p90_ms": self.pct(90), "p99_ms": self.pct(99),
                "mean_ms": float(np.mean(self.samples_ms)), "iterations": len(self.samples_ms),
                "throughput_ips": 1000.0 * batch / self.median}


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 3, rounds: int = 5,
                iters: int = 10, status: Callable[[str], None] = lambda s: None) -> dict[str, Timing]:
    """Time each zero-argument callable ``rounds * iters`` times, round-robin by bursts."""
    for name, fn in fns.items():
        status(f"warm-up {name}")
        for _ in range(warmup):
            fn()
    timings = {name: Timing() for name in fns}
    names = list(fns)
    for r in range(rounds):
        status(f"round {r + 1}/{rounds}")
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            fn = fns[name]
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                timings[name].samples_ms.append(1000 * (time.perf_counter() - t0))
    return timings


def ratio(timings: dict[str, Timing], a: str, b: str) -> float:
    """median(a) / median(b)."""
    return timings[a].median / timings[b].median


# ---- keyedge bench: artifacts x backends x batch sizes ------------------------------------


def check_device(device: str) -> str:
    """The runner device for ``--device``; refuses targets this host is not."""
    if device not in BENCH_DEVICES:
        raise KeyedgeError(f"--device must be one of {', '.join(BENCH_DEVICES)}")
    if device.startswith("jetson") and not is_jetson_orin():
        raise KeyedgeError(f"this host is not a Jetson Orin: build the plan with `keyedge build ARTIFACT --target "
                           f"{device} -o plan/` and run plan/bench_engine.sh on the device")
    if device != "cpu":
        if not torch.cuda.is_available():
            raise KeyedgeError(f"--device {device} needs a CUDA GPU and none is visible here")
        return "cuda"
    return "cpu"


def _images(spec, batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = spec.shape(batch)
    if spec.dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def label(runner) -> str:
    return f"{runner.fold_mode}-{runner.precision}"


def _measure_batch(runners: list, batch: int, *, warmup: int, rounds: int, iters: int,
                   status) -> list[dict[str, Any]]:
    """The runners that take ``batch``, measured interleaved; ratios to the plain model of the same backend."""
    fns, meta = {}, {}
    for artifact, r in runners:
        fixed = r.input_spec.fixed_batch
        if fixed is not None and fixed != batch:
            continue
        x = _images(r.input_spec, batch)
        name = f"{r.name}:{label(r)}:{Path(artifact).name if Path(artifact).suffix else artifact}"
        fns[name] = (lambda r=r, x=x: r(x))
        meta[name] = {"artifact": artifact, "backend": r.name, "kind": label(r), "fold_mode": r.fold_mode,
                      "precision": r.precision}
    if not fns:
        return []
    status(f"batch {batch}: {len(fns)} models interleaved")
    timings = interleaved(fns, warmup=warmup, rounds=rounds, iters=iters, status=status)
    plain = {m["backend"] + m["precision"]: n for n, m in meta.items() if m["fold_mode"] == "plain"}
    rows = []
    for name, t in timings.items():
        entry = {**meta[name], "batch": batch, **t.summary(batch)}
        ref = plain.get(meta[name]["backend"] + meta[name]["precision"])
        if ref is not None:
            entry["ratio_vs_plain"] = ratio(timings, name, ref)
        rows.append(entry)
    return rows


def _runners(artifacts: list[Path], key: Key | None, runner_device: str, opener: Opener | None,
             cfg: BenchConfig) -> list[tuple[str, Runner]]:
    """Every backend that runs each artifact here: on a GPU, ONNX artifacts on the CPU *and* on every
    GPU execution provider ONNX Runtime has (CUDA, TensorRT-RTX), so they are compared side by side
    (a sealed bundle is opened in memory once per backend); ``cfg.backend`` runs them on the CPU."""
    draw, query_noise = cfg.ensemble_draw, cfg.query_noise
    runners = []
    for a in artifacts:
        art = open_artifact(a, prefer_engine=runner_device != "cpu", opener=opener)
        devices = [runner_device]
        if art.kind == "onnx" and not art.is_ensemble and runner_device == "cuda":
            import onnxruntime

            devices = ["cpu", *gpu_backends(onnxruntime.get_available_providers())]
        ensemble = art.is_ensemble  # the key and the draw are each for their kind of artifact
        runners += [(str(a), runner_for(art, None if ensemble else key, device=d, draw=draw if ensemble else None,
                                        query_noise=query_noise, backend=cfg.backend,
                                        inference_precision=cfg.inference_precision)) for d in devices]
    return runners


def kernel_timings(runners: list[tuple[str, Any]], batches: tuple[int, ...], iters: int) -> list[dict[str, Any]]:
    """The CUDA preprocessing kernel's own time for each kernel-mode artifact (uint8 HWC -> key gather ->
    normalise -> NCHW), CUDA-event timed; reported apart from the graph it feeds."""
    rows = []
    kernel = PreprocessKernel(find_library())
    seen = set()
    for artifact, r in runners:
        pre = getattr(r.manifest, "preprocess", None)
        if pre is None or artifact in seen or r.key is None:
            continue
        seen.add(artifact)
        h, w = r.input_spec.size
        for batch in batches:
            images = torch.randint(0, 256, (batch, h, w, r.input_spec.channels), dtype=torch.uint8, device="cuda")
            times = []
            for i in range(iters + 3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                kernel.torch(images, r.key, pre.mean, pre.std)
                end.record()
                end.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            t = Timing(times)
            rows.append({"artifact": artifact, "backend": "cuda-kernel", "kind": "kernel-preprocess",
                         "fold_mode": "kernel", "precision": "fp32", "batch": batch, **t.summary(batch)})
    return rows


def run_bench(artifacts: list[Path], cfg: BenchConfig | None = None, *, key: Key | None = None,
              status: Callable[[str], None] = lambda s: None, opener: Opener | None = None) -> dict[str, Any]:
    cfg = cfg or BenchConfig()
    runner_device = check_device(cfg.device)
    runners = _runners(artifacts, key, runner_device, opener, cfg)
    batches, rounds, iters, warmup = cfg.batches, cfg.rounds, cfg.iters, cfg.warmup
    results: dict[str, Any] = {"device": cfg.device, "machine": machine_info(), "batches": list(batches),
                               "rounds": rounds, "iters": iters, "measurements": []}
    with ExitStack() as stack:  # every runner is deactivated, whatever happens
        for artifact, r in runners:
            try:
                stack.enter_context(r)
            except KeyedgeError as exc:
                raise KeyedgeError(f"{artifact}: {exc}") from None
        for batch in batches:
            results["measurements"] += _measure_batch(runners, batch, warmup=warmup, rounds=rounds, iters=iters,
                                                      status=status)
        if runner_device == "cuda":
            try:
                results["measurements"] += kernel_timings(runners, batches, rounds * iters)
            except KeyedgeError as exc:  # the kernel library is not built: say so, measure the rest
                results["kernel_not_measured"] = str(exc)
    if not results["measurements"]:
        raise KeyedgeError("none of the artifacts can run at the requested batch sizes here")
    return results


def bench_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    rows = [[e["backend"], f"{e['kind']} ({Path(e['artifact']).parent.name or e['artifact']})", e["batch"],
             f"{e['p50_ms']:.2f}", f"{e['p90_ms']:.2f}", f"{e['p99_ms']:.2f}", f"{e['throughput_ips']:.1f}",
             f"{e['ratio_vs_plain']:.3f}" if "ratio_vs_plain" in e else "—"] for e in results["measurements"]]
    lines = ["# keyedge bench", "",
             f"Device `{results['device']}` — CPU {m['cpu']} ({m['cores']} cores)"
             + (f"; GPU {m['gpu']['name']} (driver {m['gpu']['driver']}, SM clock {m['gpu']['sm_clock']})"
                if "gpu" in m else "") + ".",
             f"Interleaved: {results['rounds']} rounds x {results['iters']} iterations per model; "
             "the median is the figure quoted.", "",
             markdown_table(["backend", "model", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "vs plain"], rows)]
    return "\n".join(lines) + "\n"


def bench_plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[tuple[int, float]]] = {}
    for e in results["measurements"]:
        series.setdefault(f"{e['backend']} {e['kind']}", []).append((e["batch"], e["p50_ms"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency (ms)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"keyedge bench ({results['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def model_cost(manifest) -> dict[str, float]:
    """FLOPs (per image) and weight bytes (fp32) of the artifact's model, from its recipe."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_vit(manifest.model.name, **manifest.model.kwargs).eval()
    h, w = manifest.input.size
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, manifest.input.channels, h, w))
    params = sum(p.numel() for p in model.parameters())
    return {"flops_per_image": float(counter.get_total_flops()), "params": float(params)}


def roofline(manifest, target, batches: tuple[int, ...]) -> dict[str, Any]:
    """The latency floor on a target: max(compute time, weight + I/O traffic time) per batch."""
    cost = model_cost(manifest)
    precision = target.precision if manifest.precision == "fp32" and not target.strongly_typed \
        else manifest.precision
    bytes_per_weight = {"fp32": 4, "fp16": 2, "int8": 1}[precision]
    h, w = manifest.input.size
    io_bytes = h * w * manifest.input.channels * (1 if manifest.input.dtype == "uint8" else 4)
    peak = target.peak.compute_tflops(precision) * 1e12
    rows = []
    for b in batches:
        flops = cost["flops_per_image"] * b
        traffic = cost["params"] * bytes_per_weight + io_bytes * b
        t_compute, t_memory = flops / peak * 1e3, traffic / (target.peak.memory_gbs * 1e9) * 1e3
        rows.append({"batch": b, "gflops": flops / 1e9, "mbytes": traffic / 1e6, "compute_ms": t_compute,
                     "memory_ms": t_memory, "floor_ms": max(t_compute, t_memory),
                     "bound": "compute" if t_compute >= t_memory else "memory",
                     "ceiling_images_per_s": b / max(t_compute, t_memory) * 1e3})
    return {"target": target.name, "device": target.peak.device, "precision": precision,
            "peak_tflops": peak / 1e12, "peak_memory_gbs": target.peak.memory_gbs,
            "flops_per_image": cost["flops_per_image"], "params": cost["params"], "batches": rows,
            "note": "a floor from nominal peaks: real latency is higher (kernel efficiency, attention, launch)"}
