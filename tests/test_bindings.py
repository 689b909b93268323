"""The generated C++ package: ONNX Runtime backend built with CMake, installed as a CMake
package, and its example run on a real photo with logits checked against Python."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from keyedge import Key
from keyedge.runners import OnnxRunner

from .test_cli_keys import keyedge

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                                reason="cmake and g++ are needed to build the C++ package")


@pytest.fixture(scope="module")
def onnxruntime_dev(tmp_path_factory):
    """(include dir, lib dir with libonnxruntime.so.1) for the pip wheel's ONNX Runtime."""
    import onnxruntime

    include = os.environ.get("KEYEDGE_ORT_INCLUDE")
    if not include:
        dest = tmp_path_factory.mktemp("ortdev")
        proc = subprocess.run(["bash", str(ROOT / "export" / "fetch_onnxruntime_dev.sh"), str(dest)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"ONNX Runtime headers unavailable (Debian's libonnxruntime-dev): {proc.stderr[-300:]}")
        include = proc.stdout.strip().splitlines()[-1]
    capi = Path(onnxruntime.__file__).parent / "capi"
    lib = next(capi.glob("libonnxruntime.so.1.*"))
    libdir = tmp_path_factory.mktemp("ortlib")
    (libdir / "libonnxruntime.so.1").symlink_to(lib)  # the wheel ships only the versioned file
    return include, libdir


def _build_package(root, run, key_path, onnxruntime_dev, *export_args):
    include, libdir = onnxruntime_dev
    assert keyedge("export", run, "--key", key_path, "-o", root / "art", *export_args).returncode == 0
    r = keyedge("bindings", root / "art", "-o", root / "cpp")
    assert r.returncode == 0, r.stderr
    cmake = ["cmake", "-S", str(root / "cpp"), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
             f"-DONNXRUNTIME_INCLUDE_DIR={include}", f"-DONNXRUNTIME_LIBRARY={libdir / 'libonnxruntime.so.1'}",
             "-DCMAKE_CXX_FLAGS=-Werror"]
    for cmd in (cmake, ["cmake", "--build", str(root / "build"), "-j", "2"],
                ["cmake", "--install", str(root / "build"), "--prefix", str(root / "prefix")]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = {**os.environ, "LD_LIBRARY_PATH": str(libdir)}
    return root, key_path, env


@pytest.fixture(scope="module")
def package(tmp_path_factory, trained_keyed, onnxruntime_dev):
    """A gather-mode artifact: the key is a graph input, bound from key.bin by the C++ runtime."""
    run, key_path, _, _ = trained_keyed
    return _build_package(tmp_path_factory.mktemp("bindings"), run, key_path, onnxruntime_dev, "--mode", "gather")


def _photo(size: int) -> np.ndarray:
    from skimage import data, transform

    return transform.resize(data.astronaut(), (size, size), anti_aliasing=True,
                            preserve_range=True).round().astype(np.uint8)


def _classify(root, env, *args):
    return subprocess.run([str(root / "prefix" / "bin" / "classify"), *map(str, args)],
                          capture_output=True, text=True, env=env)


def _check_logits(root, key_path, env):
    img = _photo(16)
    (root / "photo.ppm").write_bytes(b"P6\n16 16\n255\n" + img.tobytes())
    model = root / "prefix" / "share" / "keyedge_model" / "model.onnx"
    r = _classify(root, env, model, root / "photo.ppm", "--key", key_path, "--dump-logits", root / "logits.txt")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "backend: onnxruntime-cpu" and len(lines) == 6  # backend + top-5
    cpp = np.loadtxt(root / "logits.txt")
    with OnnxRunner(model, Key.load(key_path)) as runner:
        from keyedge.onnx_export import to_input_spec

        py = runner(to_input_spec(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255,
                                  runner.manifest["input"]))[0]
    assert np.abs(cpp - py).max() <= 1e-4
    assert int(lines[1].split("\t")[0]) == int(py.argmax())


def test_classify_matches_python_runner(package):
    _check_logits(*package)


def test_kernel_mode_package_matches_python_runner(tmp_path, trained_keyed, onnxruntime_dev):
    """--mode kernel: the C++ runtime does the key gather + normalisation (the CPU twin of the
    CUDA kernel) before the graph; logits must match the Python runner."""
    run, key_path, _, _ = trained_keyed
    root, key_path, env = _build_package(tmp_path, run, key_path, onnxruntime_dev, "--mode", "kernel",
                                         "--input", "uint8", "--layout", "nhwc", "--dynamic-batch")
    _check_logits(root, key_path, env)


def test_classify_reads_png(package, tmp_path):
    import matplotlib.image

    root, key_path, env = package
    matplotlib.image.imsave(tmp_path / "photo.png", _photo(16))
    model = root / "prefix" / "share" / "keyedge_model" / "model.onnx"
    r = _classify(root, env, model, tmp_path / "photo.png", "--key", key_path)
    assert r.returncode == 0, r.stderr


def test_classify_bad_input(package, tmp_path):
    root, key_path, env = package
    model = root / "prefix" / "share" / "keyedge_model" / "model.onnx"
    (tmp_path / "big.ppm").write_bytes(b"P6\n32 32\n255\n" + _photo(32).tobytes())
    (tmp_path / "photo.ppm").write_bytes(b"P6\n16 16\n255\n" + _photo(16).tobytes())
    Key.generate(4, seed=99).save(tmp_path / "other.bin")
    cases = {
        "wrong key": ([model, tmp_path / "photo.ppm", "--key", tmp_path / "other.bin"], "does not match"),
        "no key": ([model, tmp_path / "photo.ppm"], "pass the key file"),
        "wrong size": ([model, tmp_path / "big.ppm", "--key", key_path], "but the model takes 16x16"),
        "missing image": ([model, tmp_path / "nope.ppm", "--key", key_path], "does not exist"),
        "missing model": ([tmp_path / "nope.onnx", tmp_path / "photo.ppm"], "does not exist"),
    }
    for name, (args, message) in cases.items():
        r = _classify(root, env, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], (name, r.stderr)


def test_installed_cmake_package_is_findable(package, tmp_path, onnxruntime_dev):
    root, _, _ = package
    app = tmp_path / "app"
    app.mkdir()
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.20)\nproject(app CXX)\nset(CMAKE_CXX_STANDARD 17)\n"
        "find_package(keyedge_model REQUIRED)\nadd_executable(app main.cpp)\n"
        "target_link_libraries(app PRIVATE keyedge::keyedge_model)\n")
    (app / "main.cpp").write_text('#include "keyedge_model.hpp"\nint main() { return 0; }\n')
    for cmd in (["cmake", "-S", str(app), "-B", str(app / "build"), f"-DCMAKE_PREFIX_PATH={root / 'prefix'}"],
                ["cmake", "--build", str(app / "build")]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_bindings_refuses_a_non_artifact(tmp_path):
    r = keyedge("bindings", tmp_path, "-o", tmp_path / "cpp")
    assert r.returncode == 2 and "no exported artifact" in r.stderr and not (tmp_path / "cpp").exists()
