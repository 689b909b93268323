"""The CUDA preprocessing kernel, proven without a GPU.

* its per-pixel code (keyedge_preprocess_math.h, ``__host__ __device__``) compiled for the host and
  checked bit for bit against keyedge's ``normalize(block_shuffle(x / 255))``, fp32 and fp16;
* the compiler's own report: no stack frame, no spills, no 64-bit division in any instantiation.
"""

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from keyedge import Key, block_shuffle
from keyedge.kernels import reference_preprocess
from keyedge.core.resources import as_path

HAS_NVCC = shutil.which("nvcc") is not None
pytestmark = pytest.mark.skipif(not HAS_NVCC or shutil.which("g++") is None,
                                reason="nvcc (for the CUDA headers and the device compile) and g++ are needed")


def _cuda_include() -> str:
    out = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    return re.search(r'INCLUDES="-I([^"\s]+)', out).group(1)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The host twin as a shared library: same arithmetic, a loop instead of a grid."""
    lib = tmp_path_factory.mktemp("host") / "libkeyedge_preprocess_host.so"
    with as_path("kernels") as src:
        proc = subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
                               "-shared", "-fPIC", f"-I{src / 'include'}", "-isystem", _cuda_include(),
                               str(src / "preprocess_host.cpp"), "-o", str(lib)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dll = ctypes.CDLL(str(lib))
    dll.keyedge_preprocess_host.restype = ctypes.c_char_p
    dll.keyedge_preprocess_host.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
        ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float),
        ctypes.c_void_p, ctypes.c_int]
    dll.keyedge_fastdiv_selftest.restype = ctypes.c_long
    return dll


def _run(host, images, key, mean, std, *, half=False, pitch_pad=0, image_pad=0):
    """Lay ``images`` (N, H, W, C uint8) out with padded rows/images, as a pitched GPU buffer would be."""
    n, h, w, c = images.shape
    row_pitch = w * c + pitch_pad
    image_stride = h * row_pitch + image_pad
    buf = np.full(n * image_stride, 0xAB, dtype=np.uint8)  # poison: padding must never be read into the output
    for i in range(n):
        rows = buf[i * image_stride:i * image_stride + h * row_pitch].reshape(h, row_pitch)
        rows[:, :w * c] = images[i].reshape(h, w * c)
    out = np.full((n, c, h, w), np.nan, dtype=np.float16 if half else np.float32)  # poison: every value written
    perm = np.ascontiguousarray(key.perm, dtype=np.int32) if key is not None else None
    floats = ctypes.c_float * c
    err = host.keyedge_preprocess_host(buf.ctypes.data, n, h, w, c, row_pitch, image_stride,
                                       perm.ctypes.data if perm is not None else None,
                                       key.block_size if key is not None else 0, floats(*mean), floats(*std),
                                       out.ctypes.data, 1 if half else 0)
    assert err is None, err.decode()
    return out


def _reference(images, key, mean, std):
    c = images.shape[3]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if key is not None:
        x = block_shuffle(x, key)
    return ((x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)).numpy()


def test_fastdiv_is_exact_over_the_kernels_whole_range(host):
    assert host.keyedge_fastdiv_selftest() == 0


@pytest.mark.parametrize("m,channels,size,batch,pitch_pad,image_pad", [
    (1, 3, (8, 8), 1, 0, 0),
    (2, 3, (12, 10), 2, 1, 0),     # odd row stride
    (4, 3, (32, 48), 3, 5, 17),    # odd, pitched rows and padded images
    (8, 1, (32, 16), 2, 0, 0),
    (16, 3, (224, 224), 1, 64, 0),
    (16, 4, (32, 64), 2, 3, 0),
    (3, 3, (9, 21), 2, 7, 3),      # an odd block size (gather mode)
    (5, 2, (10, 15), 1, 0, 0),
])
def test_host_twin_is_bit_exact_with_keyedge_shuffle(host, m, channels, size, batch, pitch_pad, image_pad):
    rng = np.random.default_rng(m * 100 + channels)
    h, w = size
    images = rng.integers(0, 256, (batch, h, w, channels), dtype=np.uint8)
    key = Key.generate(m, channels=channels, seed=m)
    mean = rng.uniform(0.2, 0.6, channels).astype(np.float32).tolist()
    std = rng.uniform(0.1, 0.5, channels).astype(np.float32).tolist()
    want = _reference(images, key, mean, std)
    got = _run(host, images, key, mean, std, pitch_pad=pitch_pad, image_pad=image_pad)
    assert got.tobytes() == want.tobytes()  # bit for bit, NaN poison included
    assert got.tobytes() == reference_preprocess(images, key, mean, std).tobytes()
    half = _run(host, images, key, mean, std, half=True, pitch_pad=pitch_pad, image_pad=image_pad)
    assert half.view(np.uint16).tobytes() == want.astype(np.float16).view(np.uint16).tobytes()


def test_host_twin_without_a_key_is_plain_normalisation(host):
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    got = _run(host, images, None, mean, std, pitch_pad=3)
    assert got.tobytes() == _reference(images, None, mean, std).tobytes()


def test_a_wrong_index_map_would_be_caught(host):
    """Control: the inverse permutation (the classic off-by-direction bug) gives a different output."""
    images = np.random.default_rng(1).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    key = Key.generate(4, seed=3)
    mean, std = [0.5] * 3, [0.5] * 3
    assert _run(host, images, Key(key.inverse, 4), mean, std).tobytes() != _reference(images, key, mean, std).tobytes()


def test_bad_arguments_are_refused(host):
    floats = ctypes.c_float * 3
    buf = np.zeros(16 * 16 * 3, dtype=np.uint8)
    out = np.zeros(3 * 16 * 16, dtype=np.float32)
    perm = np.arange(3 * 6 * 6, dtype=np.int32)
    call = host.keyedge_preprocess_host
    assert b"divide" in call(buf.ctypes.data, 1, 16, 16, 3, 48, 768, perm.ctypes.data, 6, floats(0, 0, 0),
                             floats(1, 1, 1), out.ctypes.data, 0)
    assert b"pitch" in call(buf.ctypes.data, 1, 16, 16, 3, 40, 768, None, 0, floats(0, 0, 0), floats(1, 1, 1),
                            out.ctypes.data, 0)
    assert b"std" in call(buf.ctypes.data, 1, 16, 16, 3, 48, 768, None, 0, floats(0, 0, 0), floats(1, 0, 1),
                          out.ctypes.data, 0)


@pytest.mark.parametrize("arch", ["87", "90"])
def test_kernel_has_no_stack_no_spills_no_64bit_division(tmp_path, arch):
    """ptxas -v: every instantiation (1-4 channels, fp32 and fp16) with 0 bytes of stack and spills;
    the PTX: no 64-bit integer division or remainder, no local memory."""
    with as_path("kernels") as src:
        common = ["nvcc", "-std=c++17", f"-I{src / 'include'}", f"-arch=sm_{arch}", str(src / "preprocess.cu")]
        proc = subprocess.run([*common, "-Xptxas", "-v", "-c", "-o", str(tmp_path / "k.o")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        ptx = subprocess.run([*common, "-ptx", "-o", str(tmp_path / "k.ptx")], capture_output=True, text=True)
        assert ptx.returncode == 0, ptx.stderr
    reports = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert len(reports) == 8, proc.stderr  # {1,2,3,4} channels x {fp32, fp16}
    assert all(r == ("0", "0", "0") for r in reports), proc.stderr
    text = (tmp_path / "k.ptx").read_text()
    assert text.count(".entry") == 8
    assert not re.search(r"\b(div|rem)\.[us]64\b", text)
    assert "ld.local" not in text and "st.local" not in text


def test_the_kernel_build_refuses_another_sources_build_directory(tmp_path, capsys):
    """python -m keyedge.kernels into a directory CMake configured for other sources: one line, exit 2,
    before CMake runs."""
    from keyedge.kernels import main

    (tmp_path / "CMakeCache.txt").write_text("CMAKE_HOME_DIRECTORY:INTERNAL=/elsewhere/kernels\n")
    assert main([str(tmp_path), "--arch", "90"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a CMake build of other sources" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CMakeCache.txt"]
