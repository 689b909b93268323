"""The one place that turns a path into an artifact: a run directory, an export or build directory,
an ``.onnx``, an OpenVINO IR ``.xml``, an ``.engine``, or a sealed ``.kes`` bundle of one of the last three."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.errors import KeyedgeError
from ..core.manifests import (ENGINE_FILE, IR_FILE, MANIFEST, ONNX_FILE, ArtifactManifest,
                              EngineManifest, RunManifest, engine_manifest_path, parse_json, read_deployed,
                              read_ir_manifest, read_json_file, read_onnx_manifest)
from .bundle import SUFFIX, Opener, SealedLoader


@dataclass(frozen=True)
class Artifact:
    """What a path points at. ``sealed``: for a ``.kes`` bundle, the loader that opens it in memory at
    each activation of a runner (nothing of it stays in plaintext in between)."""
    kind: Literal["run", "onnx", "ir", "engine", "ensemble"]  # ensemble: members side by side (gathered: onnx)
    path: Path  # the run directory, the .onnx, .xml or .engine file, the .kes bundle, or an ensemble's directory
    manifest: RunManifest | ArtifactManifest
    sealed: SealedLoader | None = None

    @property
    def is_ensemble(self) -> bool:
        """A random ensemble: one gathered graph (kind ``onnx``) or its members side by side (``ensemble``)."""
        return isinstance(self.manifest, ArtifactManifest) and self.manifest.ensemble is not None

    @property
    def name(self) -> str:
        return self.path.name if self.kind == "run" else self.path.parent.name or self.path.name

    @property
    def manifest_path(self) -> Path:
        if self.kind == "run":
            return self.path / MANIFEST
        if self.kind == "engine":
            return engine_manifest_path(self.path)
        return self.path.parent / MANIFEST


def _open_sealed(path: Path, opener: Opener | None) -> Artifact:
    if opener is None:
        raise KeyedgeError(f"{path} is a sealed bundle: it opens only on its device (commands that run bundles "
                           "take --device-key and --trust; seal and bindings take an export or build directory)")
    bundle = SealedLoader(path, opener)()  # authenticated here, so that a bad bundle is refused before any work
    try:
        text = bundle.manifest_text
        manifest = read_deployed(parse_json(text, f"{path} (sealed manifest)"), f"{path} (sealed manifest)")
        kind: Literal["onnx", "ir", "engine"] = {ENGINE_FILE: "engine", IR_FILE: "ir"}.get(  # type: ignore[assignment]
            bundle.model_name, "onnx")
    finally:
        bundle.wipe()  # a runner decrypts it again at each activation: no plaintext is kept in between
    return Artifact(kind, path, manifest, SealedLoader(path, opener, text))


def open_artifact(path: str | Path, *, prefer_engine: bool = True, opener: Opener | None = None) -> Artifact:
    """Resolve a path (see the module docstring); a sealed bundle needs its device's opener (private key
    and trusted publishers).

    A build directory holding both an engine and its ONNX resolves to the engine
    (``prefer_engine=False``: to the ONNX).
    """
    path = Path(path)
    if path.suffix == SUFFIX and not path.is_dir():
        return _open_sealed(path, opener)
    if path.is_dir():
        engine, onnx_file, ir_file = path / ENGINE_FILE, path / ONNX_FILE, path / IR_FILE
        if prefer_engine and engine.is_file() and engine_manifest_path(engine).is_file():
            return open_artifact(engine)
        if onnx_file.is_file():
            return open_artifact(onnx_file)
        if ir_file.is_file():
            return open_artifact(ir_file)
        if (path / MANIFEST).is_file():
            data = read_json_file(path / MANIFEST, "manifest")
            if data.get("format") == RunManifest.FORMAT:
                return Artifact("run", path, RunManifest.from_dict(data, str(path / MANIFEST)))
            if data.get("format") == ArtifactManifest.FORMAT:  # a random ensemble's members side by side
                manifest = ArtifactManifest.from_dict(data, str(path / MANIFEST))
                if manifest.ensemble is not None:
                    return Artifact("ensemble", path, manifest)
        raise KeyedgeError(f"{path} holds no keyedge artifact (a run directory, model.onnx, model.xml, "
                           "or model.engine with model.engine.json)")
    if not path.exists():
        raise KeyedgeError(f"artifact {path} does not exist")
    if path.suffix == ".onnx":
        return Artifact("onnx", path, read_onnx_manifest(path))
    if path.suffix == ".xml":
        return Artifact("ir", path, _ir_manifest(path))
    if path.suffix in (".engine", ".plan"):
        sidecar = engine_manifest_path(path)
        if not sidecar.is_file():
            raise KeyedgeError(f"engine {path} has no manifest {sidecar.name} beside it")
        return Artifact("engine", path, EngineManifest.read(sidecar))
    raise KeyedgeError(f"{path}: unknown artifact type (expected a run directory, .onnx, .xml or .engine)")


def _ir_manifest(path: Path) -> ArtifactManifest:
    """An OpenVINO IR's manifest (its rt_info), which must be the one beside it, for its weights' file."""
    manifest = read_ir_manifest(path)
    if manifest.runtime != "openvino":
        raise KeyedgeError(f"{path}: its manifest is not an OpenVINO IR's (runtime {manifest.runtime})")
    if not path.with_suffix(".bin").is_file():
        raise KeyedgeError(f"OpenVINO IR {path} has no weights file {path.with_suffix('.bin').name} beside it")
    beside = path.parent / MANIFEST
    if beside.is_file() and read_json_file(beside, "manifest") != manifest.to_dict():
        raise KeyedgeError(f"{path} does not match {beside} (another key or model): export it again")
    return manifest


def open_export(path: str | Path) -> Artifact:
    """An exported ONNX artifact (an export or build directory, or its model.onnx), never an engine or a run."""
    art = open_artifact(path, prefer_engine=False)
    if art.kind != "onnx" or art.sealed is not None:
        raise KeyedgeError(f"{path} is not an exported artifact (no model.onnx); run keyedge export")
    return art
