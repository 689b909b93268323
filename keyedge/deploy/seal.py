"""Sealing an artifact for one device: the files a device gets (model, manifest and, for gather /
kernel artifacts, the key), as one bundle encrypted to the device's public key
(:mod:`keyedge.runtime.bundle` holds the format and the cryptography)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.io import wipe
from ..core.keys import Key
from ..core.manifests import IR_FILE, IR_WEIGHTS, ArtifactManifest, check_key, needs_key
from ..runtime.artifacts import open_artifact
from ..runtime.bundle import EXTERNAL_DATA, DevicePublicKey, PublisherKey, external_layout, seal


def seal_artifact(artifact_dir: Path, recipient: DevicePublicKey, key: Key | None = None,
                  signer: PublisherKey | None = None) -> tuple[bytes, dict[str, Any]]:
    """The bundle for an export or build directory, signed by ``signer``, and a summary of what it holds."""
    art = open_artifact(artifact_dir)
    if art.kind == "run":
        raise KeyedgeError(f"{artifact_dir} is a training run: export it first; a device gets an artifact")
    if art.kind == "ensemble":
        raise KeyedgeError(f"{artifact_dir} holds a random ensemble's members side by side: a bundle carries one "
                           "graph, so seal the gathered form (LoRA members: keyedge export --ensemble-form gathered)")
    manifest = art.manifest
    assert isinstance(manifest, ArtifactManifest)
    check_key(manifest, key, f"artifact {artifact_dir}", strict=True)
    if art.kind == "onnx":  # graph + tensors, so that runners load the tensors where they are decrypted
        graph, data = external_layout(art.path.read_bytes())
        files: dict[str, bytes | bytearray] = {"model.onnx": graph, **({EXTERNAL_DATA: data} if data else {}),
                 "manifest.json": manifest.to_json().encode()}
    elif art.kind == "ir":  # the XML and its weights, read by OpenVINO from the decrypted buffer as they lie
        files = {IR_FILE: art.path.read_bytes(), IR_WEIGHTS: art.path.with_suffix(".bin").read_bytes(),
                 "manifest.json": manifest.to_json().encode()}
    else:
        files = {"model.engine": art.path.read_bytes(), "model.engine.json": manifest.to_json().encode()}
    if needs_key(manifest):
        assert key is not None  # check_key
        files["key.bin"] = key.to_bytes()
    summary = {"model": art.path.name, "fold_mode": manifest.fold_mode, "precision": manifest.precision,
               "holds_key": needs_key(manifest) or manifest.contains_key, "recipient": recipient.fingerprint}
    try:
        return seal(files, recipient, signer), summary
    finally:
        if "key.bin" in files:
            wipe(files["key.bin"])
