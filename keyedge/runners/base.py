"""The runner interface (after Polygraphy's runners: activate, infer, deactivate)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..errors import KeyedgeError
from ..keys import Key


class Runner(ABC):
    """``with Runner(artifact) as r: logits = r(images)``."""

    name: str = "runner"
    manifest: dict[str, Any]

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load the model / create sessions, buffers, streams."""

    def deactivate(self) -> None:
        """Release what ``activate`` acquired."""

    @abstractmethod
    def infer(self, images: np.ndarray) -> np.ndarray:
        """Logits (float32, (N, classes)) for images as ``manifest['input']`` describes."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        spec = self.manifest["input"]
        images = np.asarray(images)
        if images.dtype != np.dtype(spec["dtype"]):
            raise KeyedgeError(f"{self.name} takes {spec['dtype']} images, got {images.dtype}")
        batch = spec.get("batch")
        if isinstance(batch, int) and images.shape[0] != batch:
            return np.concatenate([self.infer(chunk) for chunk in _fixed_batches(images, batch)])[:len(images)]
        return self.infer(images)

    @staticmethod
    def needs_key(manifest: dict[str, Any]) -> bool:
        """Gather artifacts with a key input, and kernel-preprocessed ones, take the key at run time."""
        return bool(manifest.get("key_input") or manifest.get("preprocess"))

    @staticmethod
    def check_key(manifest: dict[str, Any], key: Key | None, where: str, *, needs_key: bool) -> None:
        """An artifact that takes the key at run time needs the right one; others ignore it
        (parity reports a fused artifact made with another key as a failure)."""
        if not needs_key:
            return
        if key is None:
            raise KeyedgeError(f"{where} takes the key at run time; pass --key")
        expected = manifest.get("key_fingerprint")
        if key.fingerprint != expected:
            raise KeyedgeError(f"key fingerprint {key.fingerprint} does not match {where} ({expected})")


def _fixed_batches(images: np.ndarray, batch: int):
    """Split into chunks of exactly ``batch`` (the last one padded by repetition)."""
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        yield chunk
