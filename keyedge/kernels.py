"""``python -m keyedge.kernels BUILD_DIR``: build the CUDA preprocessing library from the packaged sources.

The loader itself is :mod:`keyedge.runtime.kernel`; this module keeps its long-standing import path
(``from keyedge.kernels import PreprocessKernel``) and command.
"""

from __future__ import annotations

import sys

from .core.errors import KeyedgeError
from .runtime.kernel import (DEFAULT_ARCHS, LIB_NAME, OUT_FP16, OUT_FP32, PreprocessKernel, build_library,
                             find_library, reference_preprocess)

__all__ = ["DEFAULT_ARCHS", "LIB_NAME", "OUT_FP16", "OUT_FP32", "PreprocessKernel", "build_library", "find_library",
           "reference_preprocess"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        print(build_library(args[0] if args else "keyedge-kernels-build"))
    except KeyedgeError as exc:
        print(f"keyedge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
