"""Target profiles (``export/targets/*.toml``, shipped in the wheel), validated on load: TensorRT GPU targets
(:class:`Target`, built by ``keyedge build``) and OpenVINO CPU targets (:class:`CpuTarget`, ``runtime =
"openvino"``: exported by ``keyedge export --target``, run by ``bench`` and ``parity --target``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.manifests import PRECISIONS
from ..core.resources import resource


@dataclass(frozen=True)
class Peak:
    device: str
    fp32_tflops: float
    fp16_tflops: float
    int8_tops: float
    memory_gbs: float

    def compute_tflops(self, precision: str) -> float:
        return {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "int8": self.int8_tops}[precision]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    tensorrt: int
    strongly_typed: bool
    precision: str
    compute_capabilities: tuple[str, ...]
    experimental: bool
    workspace_mib: int
    builder_optimization_level: int
    timing_cache: str
    batch_min: int
    batch_opt: int
    batch_max: int
    dla_enabled: bool
    dla_core: int
    dla_gpu_fallback: bool
    peak: Peak
    path: Path

    @property
    def is_jetson(self) -> bool:
        return "8.7" in self.compute_capabilities


def available_targets() -> list[str]:
    profiles = resource("export", "targets").iterdir()
    return sorted(p.name.removesuffix(".toml") for p in profiles if p.name.endswith(".toml"))


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise KeyedgeError(f"{where}: missing field '{key}'")
    value = table[key]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise KeyedgeError(f"{where}: field '{key}' must be {getattr(kind, '__name__', kind)}, not a boolean")
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise KeyedgeError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def parse_target(data: dict[str, Any], path: Path) -> Target:
    where = str(path)
    num = (int, float)
    name = _get(data, "name", str, where)
    trt_major = _get(data, "tensorrt", int, where)
    if trt_major not in (10, 11):
        raise KeyedgeError(f"{where}: tensorrt must be 10 or 11, got {trt_major}")
    strongly = _get(data, "strongly_typed", bool, where)
    if trt_major >= 11 and not strongly:
        raise KeyedgeError(f"{where}: TensorRT 11 has no precision builder flags; set strongly_typed = true")
    precision = _get(data, "precision", str, where)
    if precision not in PRECISIONS:
        raise KeyedgeError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    batch = _get(data, "batch", dict, where)
    bmin, bopt, bmax = (_get(batch, k, int, f"{where} [batch]") for k in ("min", "opt", "max"))
    if not 1 <= bmin <= bopt <= bmax:
        raise KeyedgeError(f"{where}: [batch] needs 1 <= min <= opt <= max, got {bmin}/{bopt}/{bmax}")
    ccs = _get(data, "compute_capabilities", list, where)
    if not ccs or not all(isinstance(c, str) and c.replace(".", "").isdigit() for c in ccs):
        raise KeyedgeError(f"{where}: compute_capabilities must be a list like [\"8.7\"]")
    dla = data.get("dla", {})
    if not isinstance(dla, dict) or not all(isinstance(dla.get(k, d), t) and not (t is int and isinstance(
            dla.get(k, d), bool)) for k, t, d in (("enabled", bool, False), ("core", int, 0),
                                                 ("gpu_fallback", bool, True))):
        raise KeyedgeError(f"{where}: [dla] takes enabled = true|false, core = 0|1, gpu_fallback = true|false")
    dla_enabled = bool(dla.get("enabled", False))
    experimental = _get(data, "experimental", bool, where)
    if dla_enabled:
        if "8.7" not in ccs:
            raise KeyedgeError(f"{where}: the DLA exists only on Jetson (compute capability 8.7)")
        if not experimental:
            raise KeyedgeError(f"{where}: DLA targets must be marked experimental (GELU is not a DLA layer)")
    level = _get(data, "builder_optimization_level", int, where)
    if not 0 <= level <= 5:
        raise KeyedgeError(f"{where}: builder_optimization_level must be 0..5")
    workspace = _get(data, "workspace_mib", int, where)
    if workspace < 1:
        raise KeyedgeError(f"{where}: workspace_mib must be >= 1")
    peak = _get(data, "peak", dict, where)
    pw = f"{where} [peak]"
    peak_obj = Peak(_get(peak, "device", str, pw), *(float(_get(peak, k, num, pw)) for k in
                                                     ("fp32_tflops", "fp16_tflops", "int8_tops", "memory_gbs")))
    if min(peak_obj.fp32_tflops, peak_obj.fp16_tflops, peak_obj.int8_tops, peak_obj.memory_gbs) <= 0:
        raise KeyedgeError(f"{pw}: peak numbers must be > 0")
    cache = _get(data, "timing_cache", str, where)
    if not cache or Path(cache).name != cache or cache in (".", ".."):
        raise KeyedgeError(f"{where}: timing_cache must be a plain file name (it is written into the build directory)")
    return Target(name=name, description=_get(data, "description", str, where), tensorrt=trt_major,
                  strongly_typed=strongly, precision=precision, compute_capabilities=tuple(ccs),
                  experimental=experimental, workspace_mib=workspace, builder_optimization_level=level,
                  timing_cache=cache, batch_min=bmin, batch_opt=bopt,
                  batch_max=bmax, dla_enabled=dla_enabled, dla_core=int(dla.get("core", 0)),
                  dla_gpu_fallback=bool(dla.get("gpu_fallback", True)), peak=peak_obj, path=path)


@dataclass(frozen=True)
class CpuTarget:
    """An x86 CPU target run by OpenVINO: the IR's weights (fp32, or NNCF int8) and the inference precision
    (``auto``: bf16 where the CPU has it)."""
    name: str
    description: str
    precision: str
    inference_precision: str
    path: Path

    def resolved_inference_precision(self, cpu_has_bf16: bool) -> str:
        if self.inference_precision == "auto":
            return "bf16" if cpu_has_bf16 else "fp32"
        return self.inference_precision


def parse_cpu_target(data: dict[str, Any], path: Path) -> CpuTarget:
    where = str(path)
    precision = _get(data, "precision", str, where)
    if precision not in ("fp32", "int8"):
        raise KeyedgeError(f"{where}: an OpenVINO target's precision is fp32 or int8, got {precision!r}")
    hint = _get(data, "inference_precision", str, where)
    if hint not in ("auto", "fp32", "bf16"):
        raise KeyedgeError(f"{where}: inference_precision must be auto, fp32 or bf16, got {hint!r}")
    return CpuTarget(_get(data, "name", str, where), _get(data, "description", str, where), precision, hint, path)


def load_target(name_or_path: str | Path) -> Target:
    """A packaged TensorRT target by name (``desktop``, ``jetson-orin``, ...) or a path to a TOML profile."""
    data, path = _read_profile(name_or_path)
    if data.get("runtime", "tensorrt") == "openvino":
        raise KeyedgeError(f"{data.get('name', path)} is an OpenVINO CPU target, not a TensorRT one: keyedge export "
                           "--target writes its IR, and bench / parity --target run it")
    return parse_target(data, path)


def load_any_target(name_or_path: str | Path) -> Target | CpuTarget:
    """A TensorRT or an OpenVINO target profile, by what its ``runtime`` says (TensorRT when it says nothing)."""
    data, path = _read_profile(name_or_path)
    runtime = data.get("runtime", "tensorrt")
    if runtime not in ("tensorrt", "openvino"):
        raise KeyedgeError(f"{path}: runtime must be tensorrt or openvino, got {runtime!r}")
    return parse_cpu_target(data, path) if runtime == "openvino" else parse_target(data, path)


def load_cpu_target(name_or_path: str | Path) -> CpuTarget:
    """An OpenVINO CPU target profile (``cpu-x86`` or a .toml), refused in one line if it is a TensorRT one."""
    target = load_any_target(name_or_path)
    if not isinstance(target, CpuTarget):
        raise KeyedgeError(f"{target.name} is a TensorRT target, not an OpenVINO CPU one (a TensorRT target is "
                           "for keyedge build --target and bench --estimate --target)")
    return target


def _read_profile(name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise KeyedgeError(f"target profile {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KeyedgeError(f"target profile {path} is not UTF-8 text (not a TOML profile)") from None
        except OSError as exc:
            raise KeyedgeError(f"cannot read target profile {path}: {exc.strerror}") from None
    else:
        packaged = resource("export", "targets", f"{name_or_path}.toml")
        if not packaged.is_file():
            raise KeyedgeError(f"unknown target {name_or_path!r} (available: {', '.join(available_targets())})")
        text, path = packaged.read_text(), Path(f"{name_or_path}.toml")
    try:
        return tomllib.loads(text), path
    except tomllib.TOMLDecodeError as exc:
        raise KeyedgeError(f"{path}: not valid TOML: {exc}") from None
