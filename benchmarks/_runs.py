"""Random-init run directories, laid out exactly as `keyedge train` writes them (for benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from keyedge import Key, attach_lora, create_vit
from keyedge.lora import save_adapter
from keyedge.manifest import write_json
from keyedge.models import file_sha256, model_input_spec
from keyedge.runs import ADAPTER, MANIFEST, WEIGHTS


def make_run(root: Path, model_name: str, key: Key | None, mode: str = "full", num_classes: int = 1000) -> Path:
    """A run over a random-init base: full weights, or a LoRA adapter with non-zero B (a trained one)."""
    torch.manual_seed(0)
    base = create_vit(model_name, num_classes=num_classes)
    base_path = root / f"{model_name}-base.safetensors"
    if not base_path.exists():
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    run = root / f"{model_name}-{mode}-{'keyed' if key else 'plain'}"
    run.mkdir(parents=True)
    if mode == "lora":
        peft_model = attach_lora(base, rank=8)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        save_adapter(peft_model, run / ADAPTER)
    else:
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(run / WEIGHTS))
    spec = model_input_spec(base)
    write_json(run / MANIFEST, {
        "format": "keyedge-run", "version": 1,
        "model": {"name": model_name, "kwargs": {"num_classes": num_classes, "img_size": spec["img_size"][0],
                                                 "patch_size": spec["patch_size"][0]}},
        "mode": mode,
        "input": {"size": spec["img_size"], "channels": 3, "layout": "NCHW", "dtype": "float32",
                  "range": [0.0, 1.0], "mean": spec["mean"], "std": spec["std"]},
        "block_size": key.block_size if key else None, "key_fingerprint": key.fingerprint if key else None,
        "base_checkpoint": {"path": str(base_path), "sha256": file_sha256(base_path)} if mode == "lora" else None,
        "data": {"spec": "benchmark-random-inputs", "classes": None}})
    return run
