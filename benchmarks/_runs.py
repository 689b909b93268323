"""Random-init run directories, laid out exactly as `keyedge train` writes them (for benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from keyedge import Key, attach_lora, create_vit
from keyedge.core.manifests import MANIFEST, DEFAULT_LORA_TARGETS, BaseCheckpoint, DataInfo, LoraSpec, ModelSpec, RunInput, RunManifest, library_versions
from keyedge.core.lora import count_parameters, save_adapter
from keyedge.core.models import file_sha256, model_input_spec
from keyedge.core.runs import ADAPTER, WEIGHTS


def make_run(root: Path, model_name: str, key: Key | None, mode: str = "full", num_classes: int = 1000) -> Path:
    """A run over a random-init base: full weights, or a LoRA adapter with non-zero B (a trained one)."""
    torch.manual_seed(0)
    base = create_vit(model_name, num_classes=num_classes)
    base_path = root / f"{model_name}-base.safetensors"
    if not base_path.exists():
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    run = root / f"{model_name}-{mode}-{'keyed' if key else 'plain'}"
    run.mkdir(parents=True)
    model = base
    if mode == "lora":
        model = attach_lora(base, rank=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        save_adapter(model, run / ADAPTER)
    else:
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(run / WEIGHTS))
    spec = model_input_spec(base)
    trainable, total = count_parameters(model)
    RunManifest(
        model=ModelSpec(model_name, {"num_classes": num_classes, "img_size": spec["img_size"][0],
                                     "patch_size": spec["patch_size"][0]}),
        mode=mode, lora=LoraSpec(8, 16.0, 0.0, DEFAULT_LORA_TARGETS, False) if mode == "lora" else None,
        input=RunInput(size=tuple(spec["img_size"]), channels=3, mean=tuple(spec["mean"]), std=tuple(spec["std"])),
        block_size=key.block_size if key else None, key_fingerprint=key.fingerprint if key else None,
        base_checkpoint=BaseCheckpoint(str(base_path), file_sha256(base_path)) if mode == "lora" else None,
        data=DataInfo("benchmark-random-inputs", "random inputs (benchmark run, untrained)"),
        train={}, trainable_params=trainable, total_params=total,
        full_model_bytes=sum(t.numel() * t.element_size() for t in base.state_dict().values()),
        versions=library_versions()).write(run / MANIFEST)
    return run
