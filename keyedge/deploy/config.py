"""Export options: one dataclass, the one source of their defaults (the CLI reads them). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import KeyedgeError
from ..core.keys import can_fold
from ..core.manifests import FoldMode, InputKind, Int8Method, Layout, Precision


@dataclass
class ExportOptions:
    mode: FoldMode | None = None  # None: fused when the block size divides the patch size
    input: InputKind = "float"
    layout: Layout = "nchw"
    batch: int | None = 1  # None: dynamic batch
    embed_key: bool = False
    precision: Precision = "fp32"
    int8_method: Int8Method = "dynamic"
    calibration_n: int = 64  # static int8: calibration images from the run's training data
    opset: int = 18

    def resolved_mode(self, block_size: int | None, patch_size: int) -> FoldMode:
        if self.mode is None:
            return "fused" if can_fold(block_size, patch_size) else "gather"
        if self.mode == "fused" and not can_fold(block_size, patch_size):
            raise KeyedgeError(f"block size {block_size} does not divide patch size {patch_size}: "
                               "the key cannot be folded; use --mode gather")
        return self.mode
