"""keyedge's prepared GPU check (run through ``benchmarks/gpu/run.sh``): the GPU tests, the preprocessing
kernel's bandwidth and the keyed ViT-B/16 training and inference timings, in one time budget, into one JSON.

    benchmarks/gpu/run.sh OUT [--wheels DIR] [--budget-s 480]

Writes ``OUT/gpu_check.json`` (the device, every step's status, rc and seconds, the tests' counts and the
two benchmarks' figures), ``OUT/check.log`` (every step's output) and the steps' own files. Exit code 0:
every step passed; 1: a step failed or ran out of time; 2: bad arguments; 3: no CUDA GPU here (the JSON says
so, and nothing was measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# what the GPU machine is expected to hold already (PyTorch with CUDA and the usual scientific stack);
# run.sh brings the rest as wheels (wheels.txt)
PREINSTALLED = {"torch", "torchvision", "timm", "peft", "numpy", "safetensors", "typer", "rich", "scikit-learn",
                "scipy", "matplotlib", "onnx", "onnxruntime", "onnxscript", "pytest", "protobuf", "packaging",
                "six", "setuptools", "tqdm", "typing-extensions", "markupsafe", "scikit-image"}
NOT_NEEDED = {"pyautoattack": "AutoAttack and Square only (redteam): the check runs no attack, and its wheel "
                              "alone is 42 MB"}
STEPS = ("pytest_gpu", "kernel_bench", "vit_bench")
RESERVE_S = 20  # left for writing the JSON


def gpu_info() -> dict | None:
    """The device, or None where PyTorch sees no CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip() or None
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "multiprocessors":
            props.multi_processor_count, "memory_gib": round(props.total_memory / 2 ** 30, 1), "driver": driver,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests (marked ``gpu``): only they are collected (the others need the
    services and packages of CI)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


def commands(out: Path) -> dict[str, tuple[list[str], int]]:
    """Each step's command and its own time limit (seconds)."""
    py = sys.executable
    return {
        "pytest_gpu": ([py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        f"--junitxml={out / 'pytest_gpu.xml'}", *gpu_test_files()], 160),
        "kernel_bench": ([py, str(REPO / "benchmarks" / "kernel_bench.py"), "--batches", "1,8,64", "--size", "224",
                          "--out", str(out / "kernel_bench.json")], 110),
        "vit_bench": ([py, str(REPO / "benchmarks" / "gpu" / "vit_bench.py"), "--out", str(out / "vit_bench.json")],
                      190),
    }


def _junit(path: Path) -> dict | None:
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    return None if suite is None else {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_steps(out: Path, budget_s: int, log) -> dict[str, dict]:
    deadline = time.monotonic() + budget_s - RESERVE_S
    steps = {}
    for name, (cmd, limit) in commands(out).items():
        left = int(deadline - time.monotonic())
        if left < 10:
            steps[name] = {"status": "not run (out of time)", "rc": None, "seconds": 0.0, "timeout_s": 0}
            continue
        timeout = min(limit, left)
        log.write(f"\n==== {name}: {' '.join(cmd)} (limit {timeout} s)\n")
        log.flush()
        t0 = time.monotonic()
        try:
            rc: int | None = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timed out"
        steps[name] = {"status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "timeout_s": timeout}
        print(f"{name}: {status} ({steps[name]['seconds']:.0f} s)", flush=True)
    return steps


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        """Bad arguments: one line, exit code 2."""
        self.exit(2, f"check.py: error: {message}\n")


def main() -> int:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output directory (created; its files are replaced)")
    ap.add_argument("--budget-s", type=int, default=480, help="the whole check's time (default 8 minutes)")
    args = ap.parse_args()
    if args.budget_s < 60:
        ap.error("--budget-s must be at least 60")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"{args.out} is not a directory")
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    gpu = gpu_info()
    with open(args.out / "check.log", "w") as log:
        if gpu is None:
            log.write("no CUDA GPU here: nothing was run\n")
            steps = {n: {"status": "skipped (no CUDA GPU)", "rc": None, "seconds": 0.0, "timeout_s": 0} for n in STEPS}
        else:
            steps = run_steps(args.out, args.budget_s, log)
    report = {"format": "keyedge-gpu-check", "version": 1, "started": started, "budget_s": args.budget_s, "gpu": gpu,
              "steps": steps, "pytest": _junit(args.out / "pytest_gpu.xml"),
              "kernel_bench": _json(args.out / "kernel_bench.json"), "vit_bench": _json(args.out / "vit_bench.json"),
              "passed": gpu is not None and all(s["status"] == "passed" for s in steps.values())}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    if gpu is None:
        print("no CUDA GPU here: nothing was measured (gpu_check.json says so)", file=sys.stderr)
        return 3
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
