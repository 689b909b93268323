"""LoRA on timm ViTs with peft: attach, save/load adapters, merge exactly.

The classification head (and optionally the patch embedding) are trained fully as
peft ``modules_to_save``; LoRA goes into the transformer blocks only, so the
patch embedding's ``proj`` is never mistaken for an attention ``proj``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import KeyedgeError
from .io import make_secret
from .manifests import DEFAULT_LORA_TARGETS
from .models import KeyedClassifier


def lora_target_regex(targets: Sequence[str]) -> str:
    """A regex (peft full-matches it) for the named linear layers inside ``blocks``."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:.*\.)?blocks\.\d+\.(?:.*\.)?(?:{names})"


def attach_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets: Sequence[str] = DEFAULT_LORA_TARGETS, train_patch_embed: bool = False,
                head: str = "head") -> nn.Module:
    """Wrap a timm ViT in a peft ``PeftModel`` with LoRA adapters.

    Only the LoRA matrices, the head and (with ``train_patch_embed``) the patch
    embedding projection are trainable.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise KeyedgeError("LoRA rank must be >= 1")
    modules_to_save = [head] + (["patch_embed.proj"] if train_patch_embed else [])
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=lora_target_regex(targets), modules_to_save=modules_to_save,
                        bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise KeyedgeError(f"cannot attach LoRA: {exc}") from None


def save_adapter(peft_model: nn.Module, directory: str | Path) -> Path:
    """``save_pretrained``: adapter_config.json + adapter_model.safetensors (0600: keyed weights)."""
    peft_model.save_pretrained(str(directory))
    make_secret(*(p for p in Path(directory).iterdir() if p.is_file()))
    return Path(directory)


def load_adapter(base: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
    """``PeftModel.from_pretrained`` over a freshly built base model."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise KeyedgeError(f"{directory} holds no LoRA adapter (adapter_config.json missing)")
    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)


def _saved_module_states(peft_model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """State of the active trained copy of every ``modules_to_save`` module, by plain name."""
    from peft.utils import ModulesToSaveWrapper

    states = {}
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            active = module.modules_to_save[module.active_adapter if isinstance(module.active_adapter, str)
                                            else module.active_adapter[0]]
            states[name] = {k: v.detach().clone() for k, v in active.state_dict().items()}
    return states


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge LoRA into plain timm weights (``merge_and_unload``) and check the result.

    Accepts a ``PeftModel`` or a :class:`KeyedClassifier` around one; returns the
    same kind without peft. Every fully trained module (head, patch embedding) must
    come out of the merge with its trained values, or this raises.
    """
    if isinstance(model, KeyedClassifier):
        return model.with_model(merge_lora(model.model))
    if not hasattr(model, "merge_and_unload"):
        return model  # nothing to merge: already plain weights
    expected = _saved_module_states(model)
    merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, state in expected.items():
        if name not in modules:
            raise RuntimeError(f"trained module {name} is missing after the LoRA merge")
        got = modules[name].state_dict()
        for k, v in state.items():
            if k not in got or not torch.equal(got[k], v):
                raise RuntimeError(f"trained tensor {name}.{k} was lost in the LoRA merge")
    return merged


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
