"""The generated package's TensorRT code, compiled against TensorRT's real public headers.

TensorRT's libraries cannot be installed here, so nothing is linked or run: CMake configures the
generated package with ``-DKEYEDGE_WITH_TENSORRT=ON`` against the shared TensorRT 10.3 (JetPack 6)
and 11.1 (desktop) headers, and builds its object files with ``-Wall -Wextra -Werror`` (third-party
headers as system includes), the CUDA kernel with nvcc.
"""

import shutil
import subprocess

import pytest

from ..helpers import THIRD_PARTY, keyedge

TENSORRT = {v: THIRD_PARTY / "tensorrt-headers" / v / "include" for v in ("10.3.0", "11.1")}
pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None,
                       reason="cmake and nvcc are needed to compile the TensorRT backend"),
    pytest.mark.skipif(not all((p / "NvInfer.h").is_file() for p in TENSORRT.values()),
                       reason=f"TensorRT's headers are not under {THIRD_PARTY} (set KEYEDGE_THIRD_PARTY)"),
]


@pytest.fixture(scope="module")
def package(tmp_path_factory, trained_keyed):
    """A kernel-mode package: the TensorRT backend's keyed path (the CUDA kernel gathers)."""
    run, key_path, _, _ = trained_keyed
    root = tmp_path_factory.mktemp("trtpkg")
    assert keyedge("export", run, "--key", key_path, "-o", root / "art", "--mode", "kernel", "--input", "uint8",
                   "--layout", "nhwc", "--dynamic-batch").returncode == 0
    r = keyedge("bindings", root / "art", "-o", root / "cpp")
    assert r.returncode == 0, r.stderr
    return root / "cpp"


def _run(cmd, cwd=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, " ".join(map(str, cmd)) + "\n" + proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("version", sorted(TENSORRT))
def test_tensorrt_backend_configures_and_compiles(tmp_path, package, version):
    build = tmp_path / "build"
    out = _run(["cmake", "-S", package, "-B", build, "-G", "Unix Makefiles", "-DKEYEDGE_WITH_TENSORRT=ON",
                "-DKEYEDGE_WITH_ONNXRUNTIME=OFF", f"-DTENSORRT_INCLUDE_DIR={TENSORRT[version]}",
                "-DCMAKE_CUDA_ARCHITECTURES=87;90", "-DCMAKE_CXX_FLAGS=-Wall -Wextra -Werror",
                "-DCMAKE_CUDA_FLAGS=--Werror all-warnings"])
    assert "TensorRT library (nvinfer) not found" in out  # headers only here: configured, not linkable
    sources = sorted(p.name for p in (package / "src").glob("*.cpp") if p.name != "backend_onnxruntime.cpp")
    assert {"model.cpp", "manifest.cpp", "key_file.cpp", "bundle.cpp", "backend_tensorrt.cpp"} <= set(sources)
    objects = [f"src/{s}.o" for s in sources] + ["examples/classify.cpp.o"]
    if version == "10.3.0":  # the kernel does not include TensorRT: compile it once
        objects.append("kernels/preprocess.cu.o")
    for obj in objects:
        _run(["make", "-s", obj], cwd=build)
    made = {p.name for p in build.rglob("*.o")}
    assert {o.rsplit("/", 1)[1] for o in objects} <= made


def test_a_warning_fails_the_tensorrt_compile(tmp_path, package):
    """The -Werror flags are live for the backend's translation unit: a planted unused variable fails."""
    src = package / "src" / "backend_tensorrt.cpp"
    bad = tmp_path / "cpp"
    shutil.copytree(package, bad)
    (bad / "src" / "backend_tensorrt.cpp").write_text(
        src.read_text().replace("namespace keyedge {", "namespace keyedge {\nstatic int unused_here = 0;", 1))
    build = tmp_path / "build"
    _run(["cmake", "-S", bad, "-B", build, "-G", "Unix Makefiles", "-DKEYEDGE_WITH_TENSORRT=ON",
          "-DKEYEDGE_WITH_ONNXRUNTIME=OFF", f"-DTENSORRT_INCLUDE_DIR={TENSORRT['11.1']}",
          "-DCMAKE_CUDA_ARCHITECTURES=90", "-DCMAKE_CXX_FLAGS=-Wall -Wextra -Werror"])
    proc = subprocess.run(["make", "-s", "src/backend_tensorrt.cpp.o"], capture_output=True, text=True, cwd=build)
    assert proc.returncode != 0 and "unused" in proc.stderr
