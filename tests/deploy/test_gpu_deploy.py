"""Kernels, target profiles, build plans and the TensorRT module (CPU checks; GPU ones skip)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from keyedge import Key, block_shuffle
from keyedge.core.errors import KeyedgeError
from keyedge.kernels import reference_preprocess
from keyedge.core.resources import resource
from keyedge.deploy.targets import available_targets, load_target
from keyedge.runtime.platform import tensorrt_available

from ..helpers import ROOT, fake_engine, keyedge

HAS_GPU = torch.cuda.is_available()
HAS_NVCC = shutil.which("nvcc") is not None and shutil.which("cmake") is not None


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_numpy_reference_equals_keyedge_shuffle_normalise(m):
    rng = np.random.default_rng(m)
    images = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    key = Key.generate(m, seed=m)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    want = (block_shuffle(x, key) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    got = reference_preprocess(images, key, mean, std)
    assert np.array_equal(got, want.numpy())  # bit-exact
    plain = reference_preprocess(images, None, mean, std)
    assert np.array_equal(plain, ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).numpy())


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc and cmake are not installed")
def test_kernels_compile_with_nvcc_warnings_as_errors(tmp_path):
    from keyedge.kernels import build_library

    lib = build_library(tmp_path / "build", archs=("86", "87", "89", "90"))
    assert lib.is_file()
    symbols = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
    assert "keyedge_preprocess" in symbols and "keyedge_last_error" in symbols
    commands = (tmp_path / "build" / "compile_commands.json").read_text()
    for arch in ("sm_86", "sm_87", "sm_89", "sm_90"):
        assert arch in commands  # device code for Orin (8.7) and desktop GPUs
    assert "all-warnings" in commands and "-Werror" in commands


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
def test_kernel_warning_would_fail_the_build(tmp_path):
    """The -Werror flags are live: a source with an unused variable does not compile."""
    src = tmp_path / "bad.cu"
    src.write_text("__global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }\n")
    flags = ["--Werror", "all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror", "-arch=sm_87"]
    proc = subprocess.run(["nvcc", *flags, "-c", str(src), "-o", str(tmp_path / "bad.o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0


def test_target_profiles_parse_and_validate():
    names = available_targets()
    assert {"desktop", "jetson-orin", "jetson-orin-nano"} <= set(names)
    desktop, orin = load_target("desktop"), load_target("jetson-orin")
    assert desktop.tensorrt == 11 and desktop.strongly_typed
    assert orin.tensorrt == 10 and not orin.strongly_typed and orin.is_jetson
    assert load_target("jetson-orin-dla").experimental


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("strongly_typed = true", "strongly_typed = false"), "TensorRT 11"),
    (lambda t: t.replace("min = 1", "min = 64"), "min <= opt <= max"),
    (lambda t: t.replace('precision = "fp16"', 'precision = "fp8"'), "precision"),
    (lambda t: t.replace("workspace_mib = 4096\n", ""), "workspace_mib"),
    (lambda t: t.replace("enabled = false", "enabled = true"), "DLA"),
    (lambda t: t.replace("fp32_tflops = 82.6", 'fp32_tflops = "fast"'), "fp32_tflops"),
    (lambda t: t + "\n[[[broken", "not valid TOML"),
])
def test_broken_profile_refused(tmp_path, edit, message):
    path = tmp_path / "broken.toml"
    path.write_text(edit(resource("export", "targets", "desktop.toml").read_text()))
    with pytest.raises(KeyedgeError, match=message):
        load_target(path)


def test_unknown_target():
    with pytest.raises(KeyedgeError, match="available"):
        load_target("nope")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_keyed):
    run, key_path, _, _ = trained_keyed
    root = tmp_path_factory.mktemp("exports")
    for name, args in {"fp32": [], "fp16": ["--precision", "fp16", "--dynamic-batch"],
                       "gather": ["--mode", "gather", "--dynamic-batch"],
                       "kernel": ["--mode", "kernel", "--input", "uint8", "--layout", "nhwc", "--dynamic-batch"]}.items():
        r = keyedge("export", run, "--key", key_path, "-o", root / name, *args)
        assert r.returncode == 0, r.stderr
    return root


@pytest.mark.parametrize("target,artifact,flags", [
    ("desktop", "fp16", ["--stronglyTyped", "--minShapes=images:1x3x16x16", "--optShapes=images:8x3x16x16",
                         "--maxShapes=images:32x3x16x16"]),
    ("jetson-orin", "fp32", ["--fp16"]),
    ("jetson-orin-nano", "gather", ["--fp16", "--maxShapes=images:8x3x16x16"]),
    ("jetson-orin-dla", "fp32", ["--fp16", "--useDLACore=0", "--allowGPUFallback"]),
    ("jetson-orin", "kernel", ["--fp16", "--minShapes=pixels:1x3x16x16", "--maxShapes=pixels:16x3x16x16"]),
])
def test_build_plan(tmp_path, exported, target, artifact, flags):
    out = tmp_path / "plan"
    r = keyedge("build", exported / artifact, "--target", target, "-o", out)
    assert r.returncode == 0, r.stderr
    built = (out / "model.engine").is_file()
    assert built == ("did not build an engine here" not in r.stdout)
    if not tensorrt_available() or target.startswith("jetson"):  # Jetson engines are built on the Jetson
        assert not built
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "manifest.json", "build_engine.sh", "bench_engine.sh"} <= files
    build_sh, bench_sh = (out / "build_engine.sh").read_text(), (out / "bench_engine.sh").read_text()
    for flag in ["--onnx=model.onnx", "--saveEngine=model.engine", "--timingCacheFile=timing.cache",
                 "--memPoolSize=workspace:", "--builderOptimizationLevel=3", *flags]:
        assert flag in build_sh, flag
    if target == "desktop":
        assert "--fp16" not in build_sh  # TensorRT 11: precision from the ONNX types
    for flag in ["--loadEngine=model.engine", "--useCudaGraph", "--useSpinWait", "--noDataTransfers",
                 "--separateProfileRun"]:
        assert flag in bench_sh
    # every file the scripts refer to exists (or is what build_engine.sh produces)
    for ref in ("model.onnx", "manifest.json"):
        assert ref in build_sh and (out / ref).is_file()
    assert "model.engine" in bench_sh and "model.engine" in build_sh
    plan = json.loads((out / "manifest.json").read_text())
    assert plan["format"] == "keyedge-build-plan" and plan["version"] == 1 and plan["target"]["name"] == target
    assert plan["key_fingerprint"] == json.loads((exported / artifact / "manifest.json").read_text())["key_fingerprint"]
    assert subprocess.run(["bash", "-n", str(out / "build_engine.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(out / "bench_engine.sh")]).returncode == 0


def test_build_refuses_wrong_precision_for_strongly_typed(tmp_path, exported):
    r = keyedge("build", exported / "fp32", "--target", "desktop", "-o", tmp_path / "plan")
    assert r.returncode == 2 and "--precision fp16" in r.stderr and not (tmp_path / "plan").exists()


def test_build_engine_script_writes_the_engine_manifest(tmp_path, exported):
    """build_engine.sh, run with a stand-in trtexec, leaves a model.engine.json that reads as an engine manifest."""
    from keyedge.core.manifests import EngineManifest
    from keyedge.runtime.artifacts import open_artifact

    out = tmp_path / "plan"
    assert keyedge("build", exported / "fp32", "--target", "jetson-orin", "-o", out).returncode == 0
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\necho "&&&& RUNNING TensorRT v100300 # trtexec"\n'
                    'for a in "$@"; do case $a in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(out / "build_engine.sh")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "TRTEXEC": str(fake)})
    assert r.returncode == 0, r.stdout + r.stderr
    engine = EngineManifest.read(out / "model.engine.json")
    assert engine.tensorrt_version == "100300" and engine.target.name == "jetson-orin"
    assert engine.key_fingerprint == json.loads((out / "manifest.json").read_text())["key_fingerprint"]
    assert open_artifact(out).kind == "engine"


def test_tensorrt_runner_refuses_what_it_cannot_load(tmp_path, exported):
    """Without TensorRT: the install hint. With it: TensorRT's refusal of a file that is no engine."""
    from keyedge.runtime.runners import open_runner

    engine = fake_engine(exported / "fp32", tmp_path)
    expected = "could not load" if tensorrt_available() else "TensorRT is not installed"
    with pytest.raises(KeyedgeError, match=expected):
        with open_runner(engine):
            pass


def test_mypy_over_the_tensorrt_module_runners_and_manifests():
    import importlib.metadata as md

    pytest.importorskip("mypy")
    try:
        md.version("tensorrt-stubs")
    except md.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                           "keyedge/runtime/", "keyedge/deploy/tensorrt.py", "keyedge/deploy/bindings.py",
                           "keyedge/deploy/targets.py", "keyedge/deploy/seal.py", "keyedge/deploy/config.py",
                           "keyedge/deploy/openvino_ir.py",
                           "keyedge/core/manifests.py", "keyedge/core/io.py", "keyedge/core/resources.py",
                           "keyedge/checks/config.py", "keyedge/training/config.py", "keyedge/workflows/build.py",
                           "keyedge/workflows/sealing.py", "keyedge/workflows/parity.py"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not HAS_NVCC, reason="needs a CUDA GPU and nvcc")
@pytest.mark.parametrize("m,size", [(1, (32, 32)), (4, (64, 48)), (8, (224, 224)), (16, (224, 224)), (32, (256, 128))])
def test_kernel_bit_exact_on_gpu(tmp_path_factory, m, size):
    from keyedge.kernels import PreprocessKernel, build_library

    lib = build_library(tmp_path_factory.mktemp("kbuild"), archs=("80", "90"))
    kernel = PreprocessKernel(lib)
    h, w = size
    key = Key.generate(m, seed=m)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    # padded rows: a pitched buffer, as from cudaMallocPitch
    padded = torch.zeros((3, h, w * 3 + 64), dtype=torch.uint8, device="cuda")
    padded[:, :, : w * 3] = torch.from_numpy(images.reshape(3, h, w * 3)).cuda()
    view = padded[:, :, : w * 3].view(3, h, w, 3)
    got = kernel.torch(view, key, mean, std)
    want = reference_preprocess(images, key, mean, std)
    assert np.array_equal(got.cpu().numpy(), want)
    half = kernel.torch(view, key, mean, std, half=True)
    assert np.array_equal(half.cpu().numpy(), want.astype(np.float16))
