"""keyedge: deploy key-based adversarially defended Vision Transformers to edge GPUs.

Public API::

    from keyedge import Key, block_shuffle, block_unshuffle, KeyedClassifier, fold_key, merge_lora

Names load lazily so ``keyedge --help`` does not pay for torch and timm. The package's layers
(core, training, runtime, deploy, redteam, checks, workflows, and the CLI on top) are described
in ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Key": "core.keys",
    "KeyedgeError": "core.errors",
    "block_shuffle": "core.shuffle",
    "block_unshuffle": "core.shuffle",
    "KeyedClassifier": "core.models",
    "create_vit": "core.models",
    "fold_key": "core.fold",
    "attach_lora": "core.lora",
    "merge_lora": "core.lora",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .core.errors import KeyedgeError
    from .core.fold import fold_key
    from .core.keys import Key
    from .core.lora import attach_lora, merge_lora
    from .core.models import KeyedClassifier, create_vit
    from .core.shuffle import block_shuffle, block_unshuffle


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keyedge' has no attribute {name!r}")
