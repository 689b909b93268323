"""A training run directory, read back: manifest + weights (full) or a peft adapter (LoRA).

Layout (written by :mod:`keyedge.training`)::

    run/
      manifest.json          model, input spec, block size, key fingerprint, base hash, metrics
      model.safetensors      full fine-tuning: the whole state dict
      adapter/               LoRA: adapter_config.json + adapter_model.safetensors (peft)
      checkpoint.pt          training state for --resume (trainable tensors, optimiser, step)

Reading lives in the core, so that everything above (the PyTorch runner, the red team,
parity) loads a run without importing the trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import KeyedgeError
from .keys import Key
from .lora import load_adapter, merge_lora
from .manifests import RunManifest, check_key, read_run
from .models import KeyedClassifier, create_vit, file_sha256, load_checkpoint, read_weights

WEIGHTS = "model.safetensors"
ADAPTER = "adapter"
CHECKPOINT = "checkpoint.pt"


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
        base = create_vit(spec.name, checkpoint=base_checkpoint_path(manifest), **spec.kwargs)
        return load_adapter(base, run_dir / ADAPTER)
    model = create_vit(spec.name, **spec.kwargs)
    try:
        model.load_state_dict(read_weights(run_dir / WEIGHTS, "run weights"))
    except RuntimeError as exc:  # tensors of other names or shapes
        raise KeyedgeError(f"{run_dir / WEIGHTS} does not fit the run's model {spec.name}: "
                           f"{str(exc).splitlines()[0]}") from None
    return model


def load_run(run_dir: str | Path, key: Key | None, *, merge: bool = True,
             device: str | torch.device = "cpu") -> KeyedClassifier:
    """Load a run as the keyed PyTorch reference (eval mode). Refuses a mismatched key."""
    run_dir = Path(run_dir)
    manifest = read_run(run_dir)
    check_key(manifest, key, f"run {run_dir}", strict=True)
    keyed = KeyedClassifier(build_model(manifest, run_dir), key, manifest.input.mean, manifest.input.std)
    if merge:
        keyed = merge_lora(keyed)
    return keyed.to(device).eval()


def load_surrogate(path: Path, target: RunManifest) -> KeyedClassifier:
    """A plain classifier the attacker could have: a run directory or a checkpoint file."""
    if path.is_dir():
        return load_run(path, None)
    spec = target.model
    model = create_vit(spec.name, **spec.kwargs)
    if any(k.startswith("head") for k in load_checkpoint(model, path)):
        raise KeyedgeError(f"{path} has no classifier head for {spec.num_classes} classes; "
                           "pass --base a model that classifies the same labels")
    return KeyedClassifier(model.eval(), None, target.input.mean, target.input.std)
