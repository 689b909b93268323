"""Typed manifests for every keyedge artifact, one reader each, and one path resolver.

Four manifest shapes travel with keyedge's artifacts, each a frozen dataclass with
``from_json`` / ``to_json`` and a format name and version checked on every read:

=====================  ======================  =============================================
class                  ``format``              where
=====================  ======================  =============================================
:class:`RunManifest`   ``keyedge-run``         ``run/manifest.json`` (training output)
:class:`ArtifactManifest` ``keyedge-artifact`` ``model.onnx`` metadata + ``manifest.json``
:class:`BuildPlan`     ``keyedge-build-plan``  ``plan/manifest.json`` (``keyedge build``)
:class:`EngineManifest` ``keyedge-engine``     ``model.engine.json`` beside a TensorRT engine
=====================  ======================  =============================================

A manifest written by a newer keyedge (a higher version) is refused with one line.
:func:`needs_key` and :func:`check_key` are the only key rule. The named ``Literal`` types
below are the one list of each choice (the CLI takes its choices from them). Turning a path
into an artifact (sealed bundles included) is the runtime's job
(:func:`keyedge.runtime.artifacts.open_artifact`). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from .errors import KeyedgeError
from .io import atomic_write_text, reading
from .keys import Key

METADATA_KEY = "keyedge_manifest"  # the ONNX metadata_props entry holding the artifact manifest
METADATA_NAME = "manifest"  # an OpenVINO IR's: rt_info["keyedge"]["manifest"]
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
IR_FILE, IR_WEIGHTS = "model.xml", "model.bin"  # an OpenVINO IR artifact (the manifest also in its rt_info)

M = TypeVar("M", bound="Manifest")

# the choices, named once
TrainMode = Literal["full", "lora"]
FoldMode = Literal["fused", "gather", "kernel"]
InputKind = Literal["float", "uint8"]
Layout = Literal["nchw", "nhwc"]
Precision = Literal["fp32", "fp16", "int8"]
ExecPrecision = Literal["fp32", "fp16", "int8", "bf16"]  # what a runner executes in (bf16: OpenVINO's hint)
Backend = Literal["onnxruntime", "openvino"]  # what runs an exported ONNX artifact on the CPU
InferencePrecision = Literal["fp32", "bf16"]  # OpenVINO's inference precision hint
EnsembleForm = Literal["gathered", "separate"]
Int8Method = Literal["dynamic", "static"]
Runtime = Literal["onnxruntime", "openvino"]  # what an artifact's file is for: ONNX, or OpenVINO IR
PRECISIONS: tuple[Precision, ...] = typing.get_args(Precision)
DEFAULT_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # the linear layers LoRA adapts inside each block


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("keyedge", "torch", "timm", "peft", "onnx", "onnxruntime", "tensorrt"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ---- generic (de)serialisation of nested frozen dataclasses ---------------------------------

_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` as the field's type hint: nested dataclasses, tuples, dicts, literals and scalars, each
    checked (a bool is no integer; an integer is a number); a mismatch is one line naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except KeyedgeError:
                continue
        raise KeyedgeError(f"{where}: {json.dumps(value)[:40]} is not one of the values this field takes")
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise KeyedgeError(f"{where}: expected one of {', '.join(map(json.dumps, args))}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise KeyedgeError(f"{where}: expected an object")
        return _from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise KeyedgeError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise KeyedgeError(f"{where}: expected a list of {len(args)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise KeyedgeError(f"{where}: expected an object")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint in _SCALARS:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise KeyedgeError(f"{where}: expected {_SCALARS[hint]}")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KeyedgeError(f"{where}: unknown field '{unknown[0]}'")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyedgeError(f"{where}: missing field '{f.name}'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}: {f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise KeyedgeError(f"{where}: {exc}") from None


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def parse_json(text: str | bytes, where: str) -> dict[str, Any]:
    """The one parser of manifests, from files, ONNX metadata and sealed bundles alike: a JSON object of
    at most 64 MiB, or one line saying why not (not UTF-8, not JSON, nested too deep, not an object)."""
    if len(text) > 64 << 20:
        raise KeyedgeError(f"{where} is too large for a manifest ({len(text):,} bytes)")
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text)
    except UnicodeDecodeError:
        raise KeyedgeError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise KeyedgeError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise KeyedgeError(f"{where} is nested too deeply to be a manifest") from None
    if not isinstance(data, dict):
        raise KeyedgeError(f"{where} is not a JSON object")
    return data


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    with reading(path, what):
        raw = Path(path).read_bytes()
    return parse_json(raw, f"{what} {path}")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Any JSON report, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Base: a format name and version, checked by :meth:`from_json`."""

    FORMAT: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    format: str = ""
    version: int = 1

    def __post_init__(self) -> None:
        if not self.format:
            object.__setattr__(self, "format", self.FORMAT)

    @classmethod
    def from_dict(cls: type[M], data: dict[str, Any], where: str = "manifest") -> M:
        fmt, version = data.get("format"), data.get("version")
        if fmt != cls.FORMAT:
            raise KeyedgeError(f"{where} is not a {cls.FORMAT} manifest (format {fmt!r})")
        if not isinstance(version, int) or version < 1:
            raise KeyedgeError(f"{where} has no valid format version")
        if version > cls.VERSION:
            raise KeyedgeError(f"{where} is {cls.FORMAT} version {version}, newer than this keyedge reads "
                               f"({cls.VERSION}): upgrade keyedge")
        return _from_dict(cls, data, where)

    @classmethod
    def from_json(cls: type[M], text: str | bytes, where: str = "manifest") -> M:
        return cls.from_dict(parse_json(text, where), where)

    @classmethod
    def read(cls: type[M], path: Path) -> M:
        return cls.from_dict(read_json_file(path, "manifest"), str(path))

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: Path) -> Path:
        return atomic_write_text(path, self.to_json())

    def replace(self: M, **changes: Any) -> M:
        return dataclasses.replace(self, **changes)


# ---- the pieces ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A timm model name and the keyword arguments that rebuild it."""
    name: str
    kwargs: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.kwargs["num_classes"])


@dataclass(frozen=True)
class RunInput:
    """What a run's PyTorch model takes: float [0,1] NCHW images, normalised after the shuffle."""
    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    dtype: str = "float32"
    range: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class ArtifactInput:
    """The images an exported artifact takes (its graph's first input, unless kernel mode)."""
    name: str
    size: tuple[int, int]
    channels: int
    layout: Literal["NCHW", "NHWC"]
    dtype: Literal["float32", "uint8"]
    range: tuple[float, float]
    batch: int | Literal["dynamic"]

    def __post_init__(self) -> None:
        _require(all(1 <= v <= 65535 for v in self.size), f"input size {self.size} is out of range")
        _require(1 <= self.channels <= 16, f"input channels {self.channels} is out of range")
        _require(self.batch == "dynamic" or 1 <= self.batch <= 1 << 20, f"input batch {self.batch} is out of range")

    @property
    def fixed_batch(self) -> int | None:
        return self.batch if isinstance(self.batch, int) else None

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        h, w = self.size
        return (batch, h, w, self.channels) if self.layout == "NHWC" else (batch, self.channels, h, w)

    def from_canonical(self, images: Any) -> np.ndarray:
        """Canonical images (float [0,1], NCHW; a torch tensor or array) -> the array this input takes."""
        x = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if self.dtype == "uint8":
            return np.ascontiguousarray(np.clip(np.round(x * 255), 0, 255).astype(np.uint8))
        return np.ascontiguousarray(x)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """The canonical float [0,1] NCHW images that this input's array stands for."""
        x = np.asarray(array)
        x = x.astype(np.float32) / np.float32(255.0) if self.dtype == "uint8" else x.astype(np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "NHWC" else x)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        _require(1 <= self.num_classes <= 1 << 24, f"num_classes {self.num_classes} is out of range")


@dataclass(frozen=True)
class GraphInput:
    name: str
    layout: str
    dtype: str


@dataclass(frozen=True)
class Preprocess:
    """``--mode kernel``: the runtime does uint8 HWC -> key gather -> normalise -> NCHW first."""
    kind: str
    block_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    graph_input: GraphInput

    def __post_init__(self) -> None:
        _require(1 <= self.block_size <= 64 and len(self.mean) == len(self.std),
                 "preprocess block_size or mean / std is out of range")


@dataclass(frozen=True)
class BaseCheckpoint:
    path: str
    sha256: str


@dataclass(frozen=True)
class DataInfo:
    spec: str
    description: str
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    train_patch_embed: bool


@dataclass(frozen=True)
class TargetInfo:
    name: str
    description: str
    tensorrt_major: int
    strongly_typed: bool
    precision: str
    experimental: bool
    batch: tuple[int, int, int]
    dla: bool


# ---- the four manifests --------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RunManifest(Manifest):
    """A training run: the model recipe, input spec, key fingerprint, base pin and metrics."""
    FORMAT: ClassVar[str] = "keyedge-run"
    model: ModelSpec
    mode: TrainMode
    lora: LoraSpec | None
    input: RunInput
    block_size: int | None
    key_fingerprint: str | None
    base_checkpoint: BaseCheckpoint | None
    data: DataInfo
    train: dict[str, Any]
    trainable_params: int
    total_params: int
    full_model_bytes: int
    versions: dict[str, str]
    history: tuple[dict[str, Any], ...] = ()
    epochs_done: int = 0
    metrics: dict[str, Any] | None = None
    per_key_bytes: int | None = None


@dataclass(frozen=True)
class EnsembleMember:
    """One member of a random ensemble: its run directory (relative to the ensemble's) and key."""
    run: str
    key_fingerprint: str


@dataclass(frozen=True, kw_only=True)
class EnsembleManifest(Manifest):
    """A random ensemble's training run: N member runs from one base, one key each (one key set)."""
    FORMAT: ClassVar[str] = "keyedge-ensemble-run"
    key_set_fingerprint: str
    mode: TrainMode
    members: tuple[EnsembleMember, ...]


@dataclass(frozen=True)
class EnsembleSpec:
    """A random ensemble's artifact: its members' keys (folded, one per member) and how they are stored --
    ``gathered`` in one graph whose ``member_input`` picks each row's member, or ``separate`` files."""
    form: EnsembleForm
    member_fingerprints: tuple[str, ...]
    member_input: str | None = None
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(len(self.member_fingerprints) >= 2, "an ensemble has at least 2 members")
        _require((self.form == "gathered") == (self.member_input is not None),
                 "a gathered ensemble names its member input, a separate one does not")
        _require(self.form == "gathered" or len(self.files) == len(self.member_fingerprints),
                 "a separate ensemble names one file per member")


@dataclass(frozen=True, kw_only=True)
class ArtifactManifest(Manifest):
    """An exported ONNX artifact: everything a runtime needs to feed it the right images."""
    FORMAT: ClassVar[str] = "keyedge-artifact"
    model: ModelSpec
    classes: tuple[str, ...] | None
    input: ArtifactInput
    output: OutputSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    block_size: int | None
    key_fingerprint: str | None
    fold_mode: FoldMode | Literal["plain"]
    key_input: str | None
    preprocess: Preprocess | None
    contains_key: bool
    secret: str | None
    precision: Precision
    int8_method: str | None
    opset: int
    source_run: str
    versions: dict[str, str]
    ensemble: EnsembleSpec | None = None
    runtime: Runtime = "onnxruntime"
    inference_precision: InferencePrecision | None = None  # an OpenVINO IR's: the hint it was verified with

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.input.channels
        _require((self.runtime == "openvino") == (self.inference_precision is not None),
                 "an OpenVINO IR artifact (and only one) names its inference precision")
        _require(self.runtime == "onnxruntime" or self.ensemble is None, "a random ensemble is an ONNX artifact")
        _require(self.ensemble is None or (self.fold_mode == "fused" and self.key_input is None),
                 "an ensemble's keys are folded into its members")
        _require(len(self.mean) == c and len(self.std) == c, f"mean and std need {c} values (one per channel)")
        _require(self.block_size is None or 1 <= self.block_size <= 64, f"block_size {self.block_size} is out of range")
        _require((self.key_fingerprint is None) == (self.block_size is None),
                 "a keyed artifact names both its key's fingerprint and block size")
        _require(self.preprocess is None or (self.preprocess.block_size == self.block_size
                                             and len(self.preprocess.mean) == c),
                 "preprocess does not match the artifact's block size and channels")

    @property
    def graph_input(self) -> ArtifactInput:
        """The spec of the graph's first input: the images, or kernel mode's keyed NCHW pixels."""
        if self.preprocess is None:
            return self.input
        g = self.preprocess.graph_input
        return dataclasses.replace(self.input, name=g.name, layout=g.layout, dtype=g.dtype)  # type: ignore[arg-type]

    def fields_of(self, cls: type[Manifest]) -> dict[str, Any]:
        """This manifest's values for the fields of ``cls`` (a base class), to extend it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name not in ("format", "version")}


@dataclass(frozen=True, kw_only=True)
class BuildPlan(ArtifactManifest):
    """An on-device build plan: the artifact, its target and the exact trtexec commands."""
    FORMAT: ClassVar[str] = "keyedge-build-plan"
    target: TargetInfo
    trtexec_build: tuple[str, ...]
    trtexec_bench: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class EngineManifest(BuildPlan):
    """A TensorRT engine's sidecar: the build plan plus what the engine was built with and for."""
    FORMAT: ClassVar[str] = "keyedge-engine"
    tensorrt_version: str
    compute_capability: str | None = None
    l4t_release: str | None = None  # Jetson Linux (JetPack) release, e.g. "R36.3.0"; None off Jetson


DEPLOYED = (ArtifactManifest, BuildPlan, EngineManifest)  # plans and engines extend the artifact


def read_deployed(data: dict[str, Any], where: str) -> ArtifactManifest:
    """An artifact, build-plan or engine manifest, by its format name."""
    for cls in DEPLOYED:
        if data.get("format") == cls.FORMAT:
            return cls.from_dict(data, where)
    raise KeyedgeError(f"{where} is not a keyedge artifact manifest (format {data.get('format')!r})")


def read_onnx_manifest(path: Path) -> ArtifactManifest:
    """The manifest inside an ONNX file's ``metadata_props``."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise KeyedgeError(f"artifact {path} does not exist") from None
    except Exception as exc:
        raise KeyedgeError(f"{path} is not a readable ONNX file: {exc}") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return read_deployed(parse_json(prop.value, f"{path}: its keyedge manifest"), str(path))
    raise KeyedgeError(f"{path} carries no keyedge manifest")


def read_ir_manifest(path: Path) -> ArtifactManifest:
    """The manifest inside an OpenVINO IR's ``rt_info`` (``<rt_info><keyedge><manifest value=...>``), read off
    the XML without loading the weights."""
    import xml.etree.ElementTree as ET

    stack: list[str] = []
    try:
        for event, element in ET.iterparse(str(path), events=("start", "end")):
            if event == "start":
                stack.append(element.tag)
                if stack[-3:] == ["rt_info", "keyedge", METADATA_NAME] and len(stack) == 4:
                    text = element.get("value", "")
                    return read_deployed(parse_json(text, f"{path}: its keyedge manifest"), str(path))
            else:
                stack.pop()
                if element.tag == "layers":
                    element.clear()  # the graph itself is not needed
    except FileNotFoundError:
        raise KeyedgeError(f"artifact {path} does not exist") from None
    except ET.ParseError as exc:
        raise KeyedgeError(f"{path} is not a readable OpenVINO IR (XML): {exc}") from None
    raise KeyedgeError(f"{path} carries no keyedge manifest")


def engine_manifest_path(engine: Path) -> Path:
    """A TensorRT engine's manifest lies beside it as ``<engine>.json`` (``trtexec --loadEngine`` still reads
    the engine)."""
    return engine.with_name(engine.name + ".json")


# ---- the key rule --------------------------------------------------------------------------

def needs_key(manifest: RunManifest | ArtifactManifest) -> bool:
    """Does running this take the key? Keyed runs, gather artifacts with a key input and
    kernel-mode artifacts do; fused, embedded-key and plain artifacts do not."""
    if isinstance(manifest, RunManifest):
        return manifest.key_fingerprint is not None
    return manifest.key_input is not None or manifest.preprocess is not None


def check_key(manifest: RunManifest | ArtifactManifest, key: Key | None, where: str, *,
              strict: bool = False) -> None:
    """The one key rule. An artifact that takes the key needs the right one. With ``strict``
    (a command pointed at one artifact) a key that does not belong to it is refused too;
    otherwise a key it does not take is ignored (bench and parity pass one key to many)."""
    expected = manifest.key_fingerprint
    if needs_key(manifest):
        if key is None:
            raise KeyedgeError(f"{where} is keyed (fingerprint {expected}) and takes its key at run time; "
                               "pass it with --key")
    elif not strict or key is None:
        return
    elif expected is None:
        raise KeyedgeError(f"{where} is a plain (un-keyed) model; do not pass --key")
    if key.fingerprint != expected:
        raise KeyedgeError(f"key fingerprint {key.fingerprint} does not match {where} ({expected})")


def read_run(run_dir: str | Path) -> RunManifest:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KeyedgeError(f"run directory {run_dir} does not exist")
    return RunManifest.read(run_dir / MANIFEST)

