"""One interface, several backends: ``runner(images) -> logits``.

``images`` are plain images exactly as the runner's ``manifest["input"]`` describes
(dtype, layout, range); logits come back as a float32 numpy array. Parity and
bench only use this interface and never special-case a backend.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KeyedgeError
from ..keys import Key
from .base import Runner
from .onnxruntime import OnnxRunner
from .torch import TorchRunner

__all__ = ["Runner", "TorchRunner", "OnnxRunner", "open_runner"]


def open_runner(artifact: str | Path, key: Key | None = None, *, device: str = "cpu") -> Runner:
    """A runner for a run directory (torch), an ``.onnx`` file or a TensorRT ``.engine``."""
    path = Path(artifact)
    if path.is_dir():
        return TorchRunner(path, key, device=device)
    if path.suffix == ".onnx":
        return OnnxRunner(path, key, device=device)
    if path.suffix in (".engine", ".plan"):
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(path, key)
    if not path.exists():
        raise KeyedgeError(f"artifact {path} does not exist")
    raise KeyedgeError(f"{path}: unknown artifact type (expected a run directory, .onnx or .engine)")
