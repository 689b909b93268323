"""keyedge installed from its wheel (not editable), in a fresh virtual environment outside the
checkout: the packaged target profiles, C++ templates and kernel sources are found."""

import os
import shutil
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


def test_wheel_holds_the_top_level_data_folders(installed):
    """Every file of kernels/ and export/ ships, as the data packages keyedge.share.kernels / .export."""
    import zipfile

    _, _, root = installed
    names = set(zipfile.ZipFile(next((root / "dist").glob("keyedge-*.whl"))).namelist())
    for area in ("kernels", "export"):
        files = [f for f in (ROOT / area).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        assert len(files) >= 5
        for f in files:
            assert f"keyedge/share/{area}/{f.relative_to(ROOT / area).as_posix()}" in names, f


def test_build_bindings_and_the_kernel_build_from_the_installed_wheel(installed, tmp_path, trained_keyed):
    """keyedge build and keyedge bindings, and the kernel's CMake build directory (python -m keyedge.kernels),
    from the wheel installed outside the checkout."""
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
                        ["CMakeLists.txt", "package.cmake", "src/model.cpp", "src/backend_tensorrt.cpp",
                         "kernels/preprocess.cu", "kernels/include/keyedge_preprocess.h",
                         "kernels/include/keyedge_preprocess_math.h", "model/model.onnx"])):
        r = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        out = args[args.index("-o") + 1]
        for name in made:
            assert (out / name).is_file(), name
    assert not (tmp_path / "cpp" / "kernels" / "__init__.py").exists()  # what makes the folder a package stays behind
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("the kernel's CMake build needs nvcc and cmake")
    r = subprocess.run([str(py), "-m", "keyedge.kernels", str(tmp_path / "kernel-build")], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "kernel-build" / "CMakeCache.txt").is_file()
    assert (tmp_path / "kernel-build" / "libkeyedge_preprocess.so").is_file()
    assert str(root / "venv") in (tmp_path / "kernel-build" / "CMakeCache.txt").read_text()  # the wheel's sources


def test_the_kernel_folder_never_shadows_an_installed_package_named_kernels(tmp_path):
    """``python -m`` in the checkout puts it first on sys.path: ``kernels/`` is a namespace package (no
    ``__init__.py``), so any installed ``kernels`` (transformers, under peft, imports one) still wins."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'installed'\n")
    r = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.WHO)"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0 and r.stdout.strip() == "installed", r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import peft"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
