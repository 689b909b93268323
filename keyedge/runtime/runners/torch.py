"""The keyed PyTorch reference as a runner (a training run directory + its key)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.keys import Key
from ...core.manifests import ArtifactInput, read_run
from ...core.runs import load_run
from .base import Runner


class TorchRunner(Runner):
    def __init__(self, run_dir: str | Path, key: Key | None, *, device: str = "cpu") -> None:
        super().__init__()
        self.run_dir, self.device = Path(run_dir), device
        self.manifest = read_run(self.run_dir)
        self._check_key(key, f"run {self.run_dir}")
        spec = self.manifest.input
        self.input_spec = ArtifactInput(name="images", size=spec.size, channels=spec.channels, layout="NCHW",
                                        dtype="float32", range=spec.range, batch="dynamic")
        self.name = f"torch-{device}"
        self.model: torch.nn.Module | None = None

    def _activate(self) -> None:
        self.model = load_run(self.run_dir, self.key, device=self.device)

    def _deactivate(self) -> None:
        self.model = None

    @torch.no_grad()
    def infer(self, images: np.ndarray) -> np.ndarray:
        assert self.model is not None
        x = torch.as_tensor(np.ascontiguousarray(images), device=self.device)
        return self.model(x).float().cpu().numpy()
