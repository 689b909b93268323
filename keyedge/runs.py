"""A training run directory: manifest + weights (full) or a peft adapter (LoRA).

Layout::

    run/
      manifest.json          model, input spec, block size, key fingerprint, base hash, metrics
      model.safetensors      full fine-tuning: the whole state dict
      adapter/               LoRA: adapter_config.json + adapter_model.safetensors (peft)
      checkpoint.pt          training state for --resume (trainable tensors, optimiser, step)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import KeyedgeError
from .keys import Key
from .manifest import check_key, read_json
from .models import KeyedClassifier, create_vit, file_sha256

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter"
CHECKPOINT = "checkpoint.pt"


def read_run_manifest(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KeyedgeError(f"run directory {run_dir} does not exist")
    manifest = read_json(run_dir / MANIFEST, "run manifest")
    if manifest.get("format") != "keyedge-run":
        raise KeyedgeError(f"{run_dir / MANIFEST} is not a keyedge run manifest")
    return manifest


def base_checkpoint_path(manifest: dict[str, Any], *, verify: bool = True) -> Path | None:
    base = manifest.get("base_checkpoint")
    if not base:
        return None
    path = Path(base["path"])
    if not path.is_file():
        raise KeyedgeError(f"base checkpoint {path} of this run is missing (a LoRA adapter needs its base)")
    if verify and file_sha256(path) != base["sha256"]:
        raise KeyedgeError(f"base checkpoint {path} changed since training (sha256 mismatch)")
    return path


def build_model(manifest: dict[str, Any], run_dir: Path) -> torch.nn.Module:
    """The run's timm model (LoRA merged away only by the caller)."""
    spec = manifest["model"]
    if manifest["mode"] == "lora":
        from .lora import load_adapter

        base = create_vit(spec["name"], checkpoint=base_checkpoint_path(manifest), **spec["kwargs"])
        return load_adapter(base, run_dir / ADAPTER)
    from safetensors.torch import load_file

    model = create_vit(spec["name"], **spec["kwargs"])
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise KeyedgeError(f"{weights} is missing")
    model.load_state_dict(load_file(str(weights)))
    return model


def load_run(run_dir: str | Path, key: Key | None, *, merge: bool = True,
             device: str | torch.device = "cpu") -> KeyedClassifier:
    """Load a run as the keyed PyTorch reference (eval mode). Refuses a mismatched key."""
    run_dir = Path(run_dir)
    manifest = read_run_manifest(run_dir)
    check_key(manifest, key, f"run {run_dir}")
    model = build_model(manifest, run_dir)
    spec = manifest["input"]
    keyed = KeyedClassifier(model, key, spec["mean"], spec["std"])
    if merge:
        from .lora import merge_lora

        keyed = merge_lora(keyed)
    return keyed.to(device).eval()
