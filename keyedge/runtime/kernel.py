"""Python side of the CUDA preprocessing kernel (``kernels/preprocess.cu``, shipped in the wheel).

* :func:`reference_preprocess` -- the numpy reference: uint8 NHWC -> NCHW float32,
  equal (bit for bit) to keyedge's ``normalize(block_shuffle(x / 255))``.
* :func:`build_library` -- compiles the packaged kernel sources with CMake + nvcc.
* :class:`PreprocessKernel` -- ctypes binding of ``keyedge_preprocess``; it takes raw
  device pointers (ints), so torch CUDA tensors, pycuda allocations and
  cuda-python buffers all work. Nothing here imports CUDA until it is used.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..core.errors import KeyedgeError
from ..core.keys import Key
from ..core.resources import as_path

LIB_NAME = "libkeyedge_preprocess.so"
OUT_FP32, OUT_FP16 = 0, 1
MAX_CHANNELS = 4  # KEYEDGE_MAX_CHANNELS of include/keyedge_preprocess.h: the kernel and its CPU twins
DEFAULT_ARCHS = ("86", "87", "89", "90")


def reference_preprocess(images: np.ndarray, key: Key | None, mean, std) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W): key gather, then (v/255 - mean)/std."""
    x = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2))
    n, c, h, w = x.shape
    if key is not None:
        m = key.block_size
        if h % m or w % m or c != key.channels:
            raise KeyedgeError(f"a {m}x{m}x{key.channels} key does not fit {c}x{h}x{w} images")
        blocks = x.reshape(n, c, h // m, m, w // m, m).transpose(0, 2, 4, 1, 3, 5).reshape(n, h // m, w // m, -1)
        x = blocks[..., key.perm].reshape(n, h // m, w // m, c, m, m).transpose(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, c, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(1, c, 1, 1)
    return ((x.astype(np.float32) / np.float32(255.0)) - mean32) / std32


def build_library(build_dir: str | Path, *, archs: tuple[str, ...] = DEFAULT_ARCHS) -> Path:
    """Configure and build the packaged kernel sources with CMake (warnings are errors). Returns the .so path."""
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        raise KeyedgeError("building the CUDA kernels needs nvcc and cmake on PATH")
    build_dir = Path(build_dir)
    if build_dir.exists() and not build_dir.is_dir():
        raise KeyedgeError(f"{build_dir} exists and is not a directory")
    env = {**os.environ, "CUDACXX": os.environ.get("CUDACXX", shutil.which("nvcc") or "nvcc")}
    with as_path("kernels") as source_dir:
        cache = build_dir / "CMakeCache.txt"
        home = next((line.split("=", 1)[1] for line in (cache.read_text(errors="replace").splitlines()
                                                         if cache.is_file() else ())
                     if line.startswith("CMAKE_HOME_DIRECTORY:")), None)
        if home is not None and Path(home).resolve() != source_dir.resolve():
            raise KeyedgeError(f"{build_dir} holds a CMake build of other sources ({home}): use a new directory")
        for cmd in (["cmake", "-S", str(source_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"],
                    ["cmake", "--build", str(build_dir), "-j", "2"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise KeyedgeError(f"{' '.join(cmd[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lib = build_dir / LIB_NAME
    if not lib.is_file():
        raise KeyedgeError(f"the build did not produce {lib}")
    return lib


def find_library() -> Path:
    lib = os.environ.get("KEYEDGE_KERNEL_LIB")
    if lib and Path(lib).is_file():
        return Path(lib)
    raise KeyedgeError("the CUDA preprocessing library is not built: build it with "
                       "`python -m keyedge.kernels BUILD_DIR` (or keyedge.runtime.kernel.build_library) "
                       "and set KEYEDGE_KERNEL_LIB to BUILD_DIR/" + LIB_NAME)


class PreprocessKernel:
    """``kernel(src_ptr, dst_ptr, ...)`` on raw device pointers; ``kernel.torch(...)`` on tensors."""

    def __init__(self, library: str | Path | None = None) -> None:
        path = Path(library) if library else find_library()
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KeyedgeError(f"cannot load {path}: {exc}") from None
        f = self.lib.keyedge_preprocess
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int,
                      ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                      ctypes.c_int, ctypes.c_void_p]
        self.lib.keyedge_last_error.restype = ctypes.c_char_p

    def __call__(self, src: int, dst: int, *, batch: int, height: int, width: int, channels: int,
                 row_pitch: int, image_stride: int, perm: int | None, block_size: int, mean, std,
                 out_dtype: int = OUT_FP32, stream: int = 0) -> None:
        floats = ctypes.c_float * channels
        rc = self.lib.keyedge_preprocess(src, batch, height, width, channels, row_pitch, image_stride,
                                         perm, block_size, floats(*mean), floats(*std), dst, out_dtype, stream)
        if rc != 0:
            raise KeyedgeError(f"keyedge_preprocess failed ({rc}): {self.lib.keyedge_last_error().decode()}")

    def torch(self, images, key: Key | None, mean, std, *, half: bool = False):
        """uint8 CUDA tensor (N, H, W, C), rows may be padded (stride) -> NCHW fp32/fp16 tensor."""
        import torch

        n, h, w, c = images.shape
        if images.dtype != torch.uint8 or not images.is_cuda or images.stride(2) != c or images.stride(3) != 1:
            raise KeyedgeError("expected a uint8 CUDA tensor (N, H, W, C) with packed pixels")
        out = torch.empty((n, c, h, w), dtype=torch.float16 if half else torch.float32, device=images.device)
        perm = (torch.tensor(key.perm, dtype=torch.int32, device=images.device) if key is not None else None)
        self(images.data_ptr(), out.data_ptr(), batch=n, height=h, width=w, channels=c,
             row_pitch=images.stride(1), image_stride=images.stride(0),
             perm=perm.data_ptr() if perm is not None else None,
             block_size=key.block_size if key is not None else 0, mean=mean, std=std,
             out_dtype=OUT_FP16 if half else OUT_FP32, stream=torch.cuda.current_stream().cuda_stream)
        return out

