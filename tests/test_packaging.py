"""keyedge installed from its wheel (not editable), in a fresh virtual environment outside the
checkout: the packaged target profiles, C++ templates and kernel sources are found."""

import os
import site
import subprocess
import sys
import venv

import pytest

from .helpers import ROOT, keyedge


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, env): the wheel built from this checkout, installed alone into a new venv;
    keyedge's dependencies come from this environment's site-packages (no network)."""
    root = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(root / "dist"), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel = next((root / "dist").glob("keyedge-*.whl"))
    venv.create(root / "venv", with_pip=True)
    py = root / "venv" / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # dependencies only: a site-packages on PYTHONPATH is not scanned for .pth files, so this
    # checkout's editable install of keyedge stays invisible to the new environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    return py, env, root


def test_wheel_holds_the_package_data(installed):
    import zipfile

    _, _, root = installed
    names = zipfile.ZipFile(next((root / "dist").glob("keyedge-*.whl"))).namelist()
    for needed in ("keyedge/resources/targets/desktop.toml", "keyedge/resources/targets/jetson-orin.toml",
                   "keyedge/resources/cpp/CMakeLists.txt", "keyedge/resources/cpp/src/backend_tensorrt.cpp",
                   "keyedge/resources/cpp/cmake/PackageConfig.cmake.in",
                   "keyedge/resources/kernels/preprocess.cu", "keyedge/resources/kernels/include/keyedge_preprocess.h"):
        assert needed in names, needed


def test_build_and_bindings_from_the_installed_wheel(installed, tmp_path, trained_keyed):
    py, env, root = installed
    run, key_path, _, _ = trained_keyed
    assert keyedge("export", run, "--key", key_path, "-o", tmp_path / "art", "--precision", "fp16",
                   "--dynamic-batch").returncode == 0
    where = subprocess.run([str(py), "-c", "import keyedge; print(keyedge.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0 and str(root / "venv") in where.stdout, where.stdout + where.stderr
    cli = root / "venv" / "bin" / "keyedge"
    for args, made in ((["build", tmp_path / "art", "--target", "desktop", "-o", tmp_path / "plan"],
                        ["build_engine.sh", "bench_engine.sh", "manifest.json", "model.onnx"]),
                       (["bindings", tmp_path / "art", "-o", tmp_path / "cpp"],
                        ["CMakeLists.txt", "package.cmake", "src/backend_tensorrt.cpp", "kernels/preprocess.cu",
                         "kernels/include/keyedge_preprocess.h", "model/model.onnx"])):
        r = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        out = args[args.index("-o") + 1]
        for name in made:
            assert (out / name).is_file(), name
