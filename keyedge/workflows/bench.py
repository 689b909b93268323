"""``keyedge bench``: latency per backend with the models interleaved (sealed bundles from memory), written as
``bench.json``, ``bench.md`` and ``latency.png``; or, with a target, the roofline floor instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from ..checks.bench import bench_markdown, bench_plot, roofline, run_bench
from ..checks.config import BenchConfig
from ..core.io import atomic_write_text, check_output_dir, staged_dir
from ..core.keys import Key
from ..core.manifests import ArtifactManifest, write_json
from ..core.progress import Echo, echo, status_printer
from ..deploy.targets import load_target
from ..runtime.artifacts import open_export
from ..runtime.bundle import DeviceAccess


def bench(artifacts: list[Path], out: Path, cfg: BenchConfig | None = None, *, key_path: Path | Key | None = None,
          access: DeviceAccess = DeviceAccess(), force: bool = False,
          console: Console | None = None, echo: Echo = echo) -> dict[str, Any]:
    """Measure every artifact on every backend here, interleaved; the reports into ``out``."""
    check_output_dir(out, force)
    key = Key.given(key_path)
    results = run_bench(artifacts, cfg, key=key, opener=access.opener_for(artifacts, echo),
                        status=status_printer(console or Console(stderr=True), "bench"))
    with staged_dir(out, force=force) as stage:
        write_json(stage / "bench.json", results)
        atomic_write_text(stage / "bench.md", bench_markdown(results))
        bench_plot(results, stage / "latency.png")
    echo(bench_markdown(results))
    return results


def estimate(artifacts: list[Path], target: str | Path, batches: tuple[int, ...], *,
             echo: Echo = echo) -> list[dict[str, Any]]:
    """The roofline floor of each exported artifact on ``target`` (nominal peaks), without measuring."""
    tgt = load_target(target)
    estimates = []
    for a in artifacts:
        manifest = open_export(a).manifest
        assert isinstance(manifest, ArtifactManifest)
        est = roofline(manifest, tgt, batches)
        echo(f"{a} on {tgt.name} ({est['device']}, {est['precision']}): "
             f"{est['flops_per_image'] / 1e9:.2f} GFLOP/image, {est['params'] / 1e6:.1f} M params")
        for row in est["batches"]:
            echo(f"  batch {row['batch']}: floor {row['floor_ms']:.3f} ms ({row['bound']}-bound), "
                 f"at most {row['ceiling_images_per_s']:.0f} images/s")
        estimates.append(est)
    return estimates
