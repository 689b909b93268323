"""The keyed PyTorch reference as a runner (a training run directory + its key)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..keys import Key
from ..runs import load_run, read_run_manifest
from .base import Runner


class TorchRunner(Runner):
    def __init__(self, run_dir: str | Path, key: Key | None, *, device: str = "cpu") -> None:
        self.run_dir, self.key, self.device = Path(run_dir), key, device
        run = read_run_manifest(self.run_dir)
        self.manifest = {**run, "input": {**run["input"], "batch": "dynamic"}, "precision": "fp32",
                         "fold_mode": "reference"}
        self.name = f"torch-{device}"
        self.model: torch.nn.Module | None = None

    def activate(self) -> None:
        if self.model is None:
            self.model = load_run(self.run_dir, self.key, device=self.device)

    def deactivate(self) -> None:
        self.model = None

    @torch.no_grad()
    def infer(self, images: np.ndarray) -> np.ndarray:
        if self.model is None:
            self.activate()
        x = torch.as_tensor(np.ascontiguousarray(images), device=self.device)
        return self.model(x).float().cpu().numpy()
