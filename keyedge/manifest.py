"""Manifests: the JSON that travels with every artifact (never the key, only its fingerprint)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from .errors import KeyedgeError
from .io import atomic_write_text
from .keys import Key


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("keyedge", "torch", "timm", "peft", "onnx", "onnxruntime", "tensorrt"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def write_json(path: Path, data: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str = "manifest") -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KeyedgeError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KeyedgeError(f"{what} {path} is not valid JSON: {exc}") from None


def check_key(manifest: dict[str, Any], key: Key | None, where: str) -> None:
    """Refuse a key whose fingerprint differs from the one recorded in ``manifest``."""
    expected = manifest.get("key_fingerprint")
    if expected is None:
        if key is not None:
            raise KeyedgeError(f"{where} is a plain (un-keyed) model; do not pass --key")
        return
    if key is None:
        raise KeyedgeError(f"{where} is keyed (fingerprint {expected}); pass its key with --key")
    if key.fingerprint != expected:
        raise KeyedgeError(f"key fingerprint {key.fingerprint} does not match {where} ({expected})")
