"""``python -m keyedge.kernels [--arch 87 ...] BUILD_DIR``: build the CUDA preprocessing library from the packaged
sources (CMake + nvcc, warnings are errors).

The loader itself is :mod:`keyedge.runtime.kernel`; this module keeps its long-standing import path
(``from keyedge.kernels import PreprocessKernel``) and command.
"""

from __future__ import annotations

import argparse
import sys

from .core.errors import KeyedgeError
from .runtime.kernel import (DEFAULT_ARCHS, LIB_NAME, MAX_CHANNELS, OUT_FP16, OUT_FP32, PreprocessKernel,
                             build_library, find_library, reference_preprocess)

__all__ = ["DEFAULT_ARCHS", "LIB_NAME", "MAX_CHANNELS", "OUT_FP16", "OUT_FP32", "PreprocessKernel", "build_library",
           "find_library", "reference_preprocess"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyedge.kernels", description=(
        f"Build {LIB_NAME} (the CUDA preprocessing kernel) in BUILD_DIR; point KEYEDGE_KERNEL_LIB at it."))
    parser.add_argument("build_dir", nargs="?", default="keyedge-kernels-build", help="CMake build directory")
    parser.add_argument("--arch", action="append", help=f"CUDA architecture, repeatable (default: "
                                                         f"{' '.join(DEFAULT_ARCHS)}; 87 is Jetson Orin)")
    args = parser.parse_args(argv)
    try:
        print(build_library(args.build_dir, archs=tuple(args.arch or DEFAULT_ARCHS)))
    except KeyedgeError as exc:
        print(f"keyedge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
