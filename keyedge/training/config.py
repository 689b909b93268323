"""The training recipe: one dataclass, the one source of its defaults (the CLI reads them). No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.manifests import DEFAULT_LORA_TARGETS, TrainMode


@dataclass
class TrainConfig:
    model: str = "vit_base_patch16_224"
    out: str = "run"
    data: str = "digits"
    key: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    mode: TrainMode = "full"
    num_classes: int | None = None
    img_size: int | None = None
    patch_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    accum_steps: int = 1
    max_shift: int = 2
    label_smoothing: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_patch_embed: bool = False
    amp: bool = True
    seed: int = 0
    workers: int = 4
    resume: bool = False
    force: bool = False
    max_steps: int | None = None  # stop early (tests, smoke runs)
    progress: bool = True
