"""Probes of the machine keyedge runs on: TensorRT (imported lazily), the local GPU, Jetson Linux, and
the machine description every benchmark records. Nothing here needs a GPU to import."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.manifests import library_versions

INSTALL_HINT = ("TensorRT is not installed: pip install 'keyedge[gpu]' with NVIDIA's package index, "
                "or use the JetPack TensorRT on a Jetson")
TEGRA_RELEASE = "/etc/nv_tegra_release"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise KeyedgeError(INSTALL_HINT) from None
    if not hasattr(trt, "Builder"):  # a stubs-only or namespace package is not TensorRT
        raise KeyedgeError(INSTALL_HINT)
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except KeyedgeError:
        return False
    return True


def local_gpu_capability() -> str | None:
    """The compute capability of the first CUDA GPU (``"8.7"``), or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:
        pass
    return None


def local_l4t_release(path: str | Path = TEGRA_RELEASE) -> str | None:
    """The Jetson Linux release (``R36.3.0``) from ``/etc/nv_tegra_release``; None off Jetson."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.match(r"# R(\d+) \(release\), REVISION: ([0-9.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def is_jetson_orin() -> bool:
    model = _read("/proc/device-tree/model") or ""
    return Path(TEGRA_RELEASE).exists() and "orin" in model.lower()


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu() -> tuple[str, list[str]]:
    """The CPU's name, and the x86 ISA extensions among :data:`ISA_FLAGS` it has (those that decide the int8
    and bf16 kernels), from one read of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    have = set(fields.get("flags", "").split())
    return fields.get("model name") or platform.processor() or platform.machine(), [f for f in ISA_FLAGS if f in have]


def machine_info() -> dict[str, Any]:
    name, flags = cpu()
    info: dict[str, Any] = {"cpu": name, "cpu_flags": flags, "cores": os.cpu_count(), "platform": platform.platform(),
                            "versions": library_versions()}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem",
                "--format=csv,noheader"])
    if smi:
        name, driver, sm, sm_max, mem = (s.strip() for s in smi.splitlines()[0].split(","))
        info["gpu"] = {"name": name, "driver": driver, "sm_clock": sm, "sm_clock_max": sm_max, "mem_clock": mem}
    if Path(TEGRA_RELEASE).exists():
        info["jetson"] = {"model": _read("/proc/device-tree/model"), "l4t": _read(TEGRA_RELEASE),
                          "nvpmodel": _run(["nvpmodel", "-q"]), "jetson_clocks": _run(["jetson_clocks", "--show"])}
    return info
