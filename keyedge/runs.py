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

import torch

from .artifacts import MANIFEST, RunManifest, check_key, read_run
from .errors import KeyedgeError
from .keys import Key
from .models import KeyedClassifier, create_vit, file_sha256

WEIGHTS = "model.safetensors"
ADAPTER = "adapter"
CHECKPOINT = "checkpoint.pt"
__all__ = ["MANIFEST", "WEIGHTS", "ADAPTER", "CHECKPOINT", "read_run", "load_run", "base_checkpoint_path"]


def base_checkpoint_path(manifest: RunManifest, *, verify: bool = True) -> Path | None:
    base = manifest.base_checkpoint
    if base is None:
        return None
    path = Path(base.path)
    if not path.is_file():
        raise KeyedgeError(f"base checkpoint {path} of this run is missing (a LoRA adapter needs its base)")
    if verify and file_sha256(path) != base.sha256:
        raise KeyedgeError(f"base checkpoint {path} changed since training (sha256 mismatch)")
    return path


def build_model(manifest: RunManifest, run_dir: Path) -> torch.nn.Module:
    """The run's timm model (LoRA merged away only by the caller)."""
    spec = manifest.model
    if manifest.mode == "lora":
        from .lora import load_adapter

        base = create_vit(spec.name, checkpoint=base_checkpoint_path(manifest), **spec.kwargs)
        return load_adapter(base, run_dir / ADAPTER)
    from safetensors.torch import load_file

    model = create_vit(spec.name, **spec.kwargs)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise KeyedgeError(f"{weights} is missing")
    model.load_state_dict(load_file(str(weights)))
    return model


def load_run(run_dir: str | Path, key: Key | None, *, merge: bool = True,
             device: str | torch.device = "cpu") -> KeyedClassifier:
    """Load a run as the keyed PyTorch reference (eval mode). Refuses a mismatched key."""
    run_dir = Path(run_dir)
    manifest = read_run(run_dir)
    check_key(manifest, key, f"run {run_dir}", strict=True)
    model = build_model(manifest, run_dir)
    keyed = KeyedClassifier(model, key, manifest.input.mean, manifest.input.std)
    if merge:
        from .lora import merge_lora

        keyed = merge_lora(keyed)
    return keyed.to(device).eval()
