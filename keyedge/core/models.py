"""timm ViT creation (hub or local checkpoint) and the keyed classifier.

``KeyedClassifier(model, key, mean, std)`` is the reference semantics of a keyed
model: ``model(normalize(block_shuffle(x, key)))`` on images x in [0, 1].
"""

from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from .errors import KeyedgeError
from .keys import Key
from .shuffle import permute_blocks

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _head_keys(model: nn.Module) -> set[str]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def read_weights(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors / .pth / .pt / .bin file (timm's reader: weights only, no pickled code);
    a missing, foreign or corrupted file is one line."""
    path = Path(path)
    if not path.is_file():
        raise KeyedgeError(f"{what} {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as exc:  # corrupted or foreign file
        raise KeyedgeError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KeyedgeError(f"{what} {path} holds no tensors by name")
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local checkpoint (.safetensors / .pth / .pt / .bin / .npz) into a timm ViT.

    Position and patch embeddings are resampled when the model's image or patch size
    differs (timm's ``checkpoint_filter_fn``); a classifier head of another size is
    left at its fresh initialisation (the usual fine-tuning start). Returns the names
    of the tensors that were not loaded (only head tensors are allowed to be missing).
    """
    path = Path(path)
    if not path.is_file():
        raise KeyedgeError(f"checkpoint {path} does not exist")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise KeyedgeError(f"checkpoint {path} has unknown type; expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise KeyedgeError(f"{type(model).__name__} cannot read .npz checkpoints")
        try:
            model.load_pretrained(str(path))
        except Exception as exc:  # corrupted or foreign file
            raise KeyedgeError(f"cannot read checkpoint {path}: {exc}") from None
        return []
    state = read_weights(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    dropped = [k for k in _head_keys(model) if k in state and state[k].shape != own[k].shape]
    for k in dropped:
        del state[k]
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if k not in _head_keys(model)]
    if bad or result.unexpected_keys:
        raise KeyedgeError(
            f"checkpoint {path} does not fit {type(model).__name__}: "
            f"{len(bad)} missing tensors (e.g. {bad[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")
    return sorted(set(result.missing_keys) | set(dropped))


def create_vit(name: str, *, num_classes: int | None = None, img_size: int | None = None,
               patch_size: int | None = None, checkpoint: str | Path | None = None,
               pretrained: bool = False, **model_kwargs: Any) -> nn.Module:
    """Create any timm ViT by name, with class count and image/patch size overrides.

    Weights come from ``checkpoint`` (a local file, works offline), from the Hugging
    Face hub when ``pretrained=True`` and the hub is reachable, or a random init.
    Extra keyword arguments go to the timm model (``depth``, ``embed_dim``, ...).
    """
    kwargs = dict(model_kwargs)
    for arg, value in (("num_classes", num_classes), ("img_size", img_size), ("patch_size", patch_size)):
        if value is not None:
            kwargs[arg] = value
    if not timm.is_model(name):
        raise KeyedgeError(f"unknown timm model {name!r} (see timm.list_models('vit*'))")
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except TypeError as exc:
        raise KeyedgeError(f"cannot create {name}: {exc}") from None
    if not hasattr(model, "patch_embed"):
        raise KeyedgeError(f"{name} is not a ViT with a patch embedding")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model



def patch_size_of(name: str, **kwargs: Any) -> int:
    """The patch size of the ViT ``create_vit(name, **kwargs)`` builds, from the model made on the meta
    device (no weights, no time); an unknown model is refused as :func:`create_vit` refuses it."""
    with torch.device("meta"):
        return int(create_vit(name, **kwargs).patch_embed.patch_size[0])

def model_input_spec(model: nn.Module) -> dict[str, Any]:
    """Image size, patch size, channels, and the mean/std the model was trained with."""
    pe = model.patch_embed
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "img_size": list(pe.img_size),
        "patch_size": list(pe.patch_size),
        "channels": int(pe.proj.in_channels),
        "mean": [float(v) for v in cfg.get("mean", (0.5, 0.5, 0.5))],
        "std": [float(v) for v in cfg.get("std", (0.5, 0.5, 0.5))],
    }


class KeyedClassifier(nn.Module):
    """``model(normalize(block_shuffle(x, key)))`` on images ``x`` in [0, 1], (N, C, H, W).

    ``key=None`` gives the plain (un-keyed) classifier with the same normalisation.
    The permutation is a non-persistent buffer, so ``state_dict()`` never holds it.
    """

    def __init__(self, model: nn.Module, key: Key | None, mean: Any = None, std: Any = None) -> None:
        super().__init__()
        spec = model_input_spec(_timm_model(model))
        mean = spec["mean"] if mean is None else mean
        std = spec["std"] if std is None else std
        channels = spec["channels"]
        if len(mean) != channels or len(std) != channels:
            raise KeyedgeError(f"mean/std need {channels} values each")
        if key is not None:
            if key.channels != channels:
                raise KeyedgeError(f"the key has {key.channels} channels but the model takes {channels}")
            h, w = spec["img_size"]
            if h % key.block_size or w % key.block_size:
                raise KeyedgeError(f"block size {key.block_size} does not divide the model's input {h}x{w}")
        self.model = model
        self.key = key
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        perm = key.perm if key is not None else np.zeros(0, dtype=np.int64)
        self.register_buffer("perm", torch.tensor(perm, dtype=torch.long), persistent=False)

    @property
    def block_size(self) -> int | None:
        return None if self.key is None else self.key.block_size

    def classify_shuffled(self, z: torch.Tensor) -> torch.Tensor:
        """Logits for images that are already block-shuffled (normalisation still to do)."""
        return self.model((z - self.mean) / self.std)

    def forward_with_perm(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """These weights behind any permutation tensor (a guessed or random key), no new module."""
        return self.classify_shuffled(permute_blocks(x, perm, self.key.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_shuffled(x) if self.key is None else self.forward_with_perm(x, self.perm)

    def _rewrap(self, model: nn.Module, key: Key | None) -> "KeyedClassifier":
        return KeyedClassifier(model, key, self.mean.flatten().tolist(),
                               self.std.flatten().tolist()).to(self.mean.device)

    def with_key(self, key: Key | None) -> "KeyedClassifier":
        """The same weights behind another key (a guessed key, or none)."""
        return self._rewrap(self.model, key)

    def with_model(self, model: nn.Module) -> "KeyedClassifier":
        return self._rewrap(model, self.key)

    def copy(self) -> "KeyedClassifier":
        return self.with_model(copy.deepcopy(self.model))


def _timm_model(model: nn.Module) -> nn.Module:
    """The timm model under a peft wrapper, if any."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model
