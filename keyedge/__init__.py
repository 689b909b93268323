"""keyedge: deploy key-based adversarially defended Vision Transformers to edge GPUs.

Public API::

    from keyedge import Key, block_shuffle, block_unshuffle, KeyedClassifier, fold_key, merge_lora

Names load lazily so ``keyedge --help`` does not pay for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Key": "keys",
    "KeyedgeError": "errors",
    "block_shuffle": "shuffle",
    "block_unshuffle": "shuffle",
    "KeyedClassifier": "models",
    "create_vit": "models",
    "fold_key": "fold",
    "attach_lora": "lora",
    "merge_lora": "lora",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .errors import KeyedgeError
    from .fold import fold_key
    from .keys import Key
    from .lora import attach_lora, merge_lora
    from .models import KeyedClassifier, create_vit
    from .shuffle import block_shuffle, block_unshuffle


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keyedge' has no attribute {name!r}")
