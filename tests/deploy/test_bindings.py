"""The generated C++ package: ONNX Runtime backend built with CMake against the shared headers,
installed as a CMake package (two devices' packages side by side in one prefix), and its example
run on a real photo with logits checked against Python; sealed bundles opened in memory only when
a trusted publisher (compiled into the package, or given at run time) signed them."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from keyedge import Key
from keyedge.runtime.artifacts import open_artifact
from keyedge.runtime.runners import OnnxRunner

from ..helpers import THIRD_PARTY, keyedge

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                                reason="cmake and g++ are needed to build the C++ package")
ORT_HEADERS = THIRD_PARTY / "onnxruntime-headers" / "1.21.0" / "include"


@pytest.fixture(scope="module")
def onnxruntime_dev(tmp_path_factory):
    """(include dir, lib dir with libonnxruntime.so.1): the shared headers and the pip wheel's library."""
    import onnxruntime

    if not (ORT_HEADERS / "onnxruntime_cxx_api.h").is_file():
        pytest.skip(f"ONNX Runtime's C++ headers are not at {ORT_HEADERS} (set KEYEDGE_THIRD_PARTY)")
    capi = Path(onnxruntime.__file__).parent / "capi"
    lib = next(capi.glob("libonnxruntime.so.1.*"))
    libdir = tmp_path_factory.mktemp("ortlib")
    (libdir / "libonnxruntime.so.1").symlink_to(lib)  # the wheel ships only the versioned file
    return ORT_HEADERS, libdir


def _build_package(root: Path, prefix: Path, run, key_path, onnxruntime_dev, *export_args, bindings=(), cmake_args=()):
    """Export, generate (``keyedge bindings ... *bindings``), build and install into ``prefix``; returns
    (package name, env)."""
    include, libdir = onnxruntime_dev
    assert keyedge("export", run, "--key", key_path, "-o", root / "art", *export_args).returncode == 0
    r = keyedge("bindings", root / "art", "-o", root / "cpp", *bindings)
    assert r.returncode == 0, r.stderr
    package = r.stdout.split("C++ package ", 1)[1].split()[0]
    cmake = ["cmake", "-S", str(root / "cpp"), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
             f"-DONNXRUNTIME_INCLUDE_DIR={include}", f"-DONNXRUNTIME_LIBRARY={libdir / 'libonnxruntime.so.1'}",
             "-DCMAKE_CXX_FLAGS=-Werror", *cmake_args]
    for cmd in (cmake, ["cmake", "--build", str(root / "build"), "-j", "2"],
                ["cmake", "--install", str(root / "build"), "--prefix", str(prefix)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return package, {**os.environ, "LD_LIBRARY_PATH": str(libdir)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory, trained_keyed, onnxruntime_dev):
    """Two packages in one prefix: a gather artifact (the key bound from key.bin to the graph's key
    input; the package trusts the publisher root/publisher.pub) and a kernel-mode one (the runtime's CPU
    twin of the CUDA kernel gathers)."""
    run, key_path, _, _ = trained_keyed
    root = tmp_path_factory.mktemp("bindings")
    prefix = root / "prefix"
    assert keyedge("publisher", "keygen", "-o", root / "publisher.key").returncode == 0
    gather, env = _build_package(root / "gather", prefix, run, key_path, onnxruntime_dev, "--mode", "gather",
                                 bindings=("--trust", root / "publisher.pub"))
    kernel, _ = _build_package(root / "kernel", prefix, run, key_path, onnxruntime_dev, "--mode", "kernel",
                               "--input", "uint8", "--layout", "nhwc", "--dynamic-batch")
    return prefix, key_path, env, {"gather": gather, "kernel": kernel}, root  # exports: root/<mode>/art


def _photo(size: int) -> np.ndarray:
    from skimage import data, transform

    return transform.resize(data.astronaut(), (size, size), anti_aliasing=True,
                            preserve_range=True).round().astype(np.uint8)


def _classify(prefix, package, env, *args):
    return subprocess.run([str(prefix / "bin" / f"{package}_classify"), *map(str, args)],
                          capture_output=True, text=True, env=env)


def _model(prefix, package):
    return prefix / "share" / package / "model.onnx"


@pytest.mark.parametrize("mode", ["gather", "kernel"])
def test_classify_matches_python_runner(installed, tmp_path, mode):
    prefix, key_path, env, packages, root = installed
    img = _photo(16)
    (tmp_path / "photo.ppm").write_bytes(b"P6\n16 16\n255\n" + img.tobytes())
    model = _model(prefix, packages[mode])
    r = _classify(prefix, packages[mode], env, model, tmp_path / "photo.ppm", "--key", key_path,
                  "--dump-logits", tmp_path / "logits.txt")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "backend: onnxruntime-cpu" and len(lines) == 6  # backend + top-5
    cpp = np.loadtxt(tmp_path / "logits.txt")
    with OnnxRunner(model, Key.load(key_path)) as runner:
        py = runner(runner.input_spec.from_canonical(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255))[0]
    assert np.abs(cpp - py).max() <= 1e-4
    assert int(lines[1].split("\t")[0]) == int(py.argmax())


def _seal(art, key_path, device_pub, out, *signing):
    r = keyedge("seal", art, "--to", device_pub, "--key", key_path, "-o", out, *signing)
    assert r.returncode == 0, r.stderr
    return out


def _one_line_refusal(r, needle):
    lines = r.stderr.strip().splitlines()
    return r.returncode != 0 and len(lines) == 1 and needle in lines[0]


def test_classify_opens_a_signed_sealed_bundle_in_memory(installed, tmp_path):
    """load_sealed (libsodium): the gather artifact and its key, sealed to a device and signed by the publisher
    compiled into the package, classified from memory with the same logits as the Python runner; a tampered
    bundle, another device's key or a file that is not a device key: one line."""
    prefix, key_path, env, packages, root = installed
    art = root / "gather" / "art"
    assert keyedge("device", "keygen", "-o", tmp_path / "device.key").returncode == 0
    bundle = _seal(art, key_path, tmp_path / "device.pub", tmp_path / "model.kes",
                   "--sign-with", root / "publisher.key")
    data = bundle.read_bytes()
    assert data[8:12] == bytes([3, 0, 1, 0])  # bundle version 3, signed
    img = _photo(16)
    (tmp_path / "photo.ppm").write_bytes(b"P6\n16 16\n255\n" + img.tobytes())
    before = set(os.listdir(tmp_path))
    r = _classify(prefix, packages["gather"], env, bundle, tmp_path / "photo.ppm", "--device-key",
                  tmp_path / "device.key", "--dump-logits", tmp_path / "logits.txt")
    assert r.returncode == 0, r.stderr
    assert set(os.listdir(tmp_path)) - before == {"logits.txt"}  # nothing else written
    with OnnxRunner(art / "model.onnx", Key.load(key_path)) as runner:
        py = runner(runner.input_spec.from_canonical(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255))[0]
    assert np.abs(np.loadtxt(tmp_path / "logits.txt") - py).max() <= 1e-4
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    (tmp_path / "bad.kes").write_bytes(bytes(bad))
    assert keyedge("device", "keygen", "-o", tmp_path / "other.key").returncode == 0
    for bundle_path, key_file, needle in ((tmp_path / "bad.kes", tmp_path / "device.key", "tampered"),
                                          (bundle, tmp_path / "other.key", "sealed to device"),
                                          (bundle, key_path, "not a keyedge device private key")):
        r = _classify(prefix, packages["gather"], env, bundle_path, tmp_path / "photo.ppm", "--device-key", key_file)
        assert _one_line_refusal(r, needle), r.stderr


def test_load_sealed_opens_only_what_a_trusted_publisher_signed(installed, tmp_path):
    """A bundle sealed with the device's public key only (unsigned) and one signed by another publisher are
    refused in one line; trusting that publisher at run time (--trust), or --allow-unsigned (development)
    for the unsigned one, opens them as the compiled-in publisher's bundle opens."""
    prefix, key_path, env, packages, root = installed
    art = root / "gather" / "art"
    (tmp_path / "photo.ppm").write_bytes(b"P6\n16 16\n255\n" + _photo(16).tobytes())
    for name in ("device", "other-publisher"):
        assert keyedge(name.split("-")[-1], "keygen", "-o", tmp_path / f"{name}.key").returncode == 0
    unsigned = _seal(art, key_path, tmp_path / "device.pub", tmp_path / "unsigned.kes", "--allow-unsigned")
    other = _seal(art, key_path, tmp_path / "device.pub", tmp_path / "other.kes",
                  "--sign-with", tmp_path / "other-publisher.key")

    def classify(bundle, *args):
        return _classify(prefix, packages["gather"], env, bundle, tmp_path / "photo.ppm", "--device-key",
                         tmp_path / "device.key", *args)

    for bundle, args, needle in ((unsigned, (), "is not signed by a publisher"),
                                 (other, (), "which is not trusted"),
                                 (other, ("--trust", root / "publisher.pub"), "which is not trusted"),
                                 (other, ("--trust", tmp_path / "other-publisher.key"), "publisher private key"),
                                 (other, ("--allow-unsigned",), "which is not trusted")):
        r = classify(bundle, *args)
        assert _one_line_refusal(r, needle), (bundle.name, args, r.stderr)
    for bundle, args in ((other, ("--trust", tmp_path / "other-publisher.pub")),
                         (other, ("--trust", root / "publisher.pub", "--trust", tmp_path / "other-publisher.pub")),
                         (unsigned, ("--allow-unsigned",))):
        r = classify(bundle, *args)
        assert r.returncode == 0 and r.stdout.startswith("backend: onnxruntime-cpu"), (bundle.name, args, r.stderr)


def test_bindings_ships_only_a_bundle_its_trusted_publisher_signed(installed, tmp_path):
    """keyedge bindings --bundle: refused without --trust, for an unsigned bundle, for another publisher's and
    for an old version's; a trusted publisher's bundle ships, and its key is compiled into the package."""
    from keyedge.runtime.bundle import PublisherPublicKey

    _, key_path, _, _, root = installed
    art = root / "gather" / "art"
    for name in ("device", "other-publisher"):
        assert keyedge(name.split("-")[-1], "keygen", "-o", tmp_path / f"{name}.key").returncode == 0
    genuine = _seal(art, key_path, tmp_path / "device.pub", tmp_path / "model.kes",
                    "--sign-with", root / "publisher.key")
    unsigned = _seal(art, key_path, tmp_path / "device.pub", tmp_path / "unsigned.kes", "--allow-unsigned")
    other = _seal(art, key_path, tmp_path / "device.pub", tmp_path / "other.kes",
                  "--sign-with", tmp_path / "other-publisher.key")
    old = bytearray(genuine.read_bytes())
    old[8] = 2
    (tmp_path / "old.kes").write_bytes(bytes(old))
    trust = ("--trust", root / "publisher.pub")
    for i, (bundle, args, needle) in enumerate(((genuine, (), "--bundle needs --trust PUBLISHER.pub"),
                                                (unsigned, trust, "is not signed by a publisher"),
                                                (other, trust, "which is not trusted"),
                                                (tmp_path / "old.kes", trust, "seal the artifact again"))):
        r = keyedge("bindings", art, "-o", tmp_path / f"refused{i}", "--bundle", bundle, *args)
        assert r.returncode == 2 and needle in r.stderr and not (tmp_path / f"refused{i}").exists(), r.stderr
    r = keyedge("bindings", art, "-o", tmp_path / "cpp", "--bundle", genuine, *trust)
    assert r.returncode == 0, r.stderr
    config = (tmp_path / "cpp" / "src" / "keyedge_model_config.hpp").read_text()
    publisher = PublisherPublicKey.load(root / "publisher.pub").raw.hex()
    assert f'#define KEYEDGE_TRUSTED_PUBLISHERS {{"{publisher}"}}' in config
    assert sorted(os.listdir(tmp_path / "cpp" / "model")) == ["model.kes"]


def test_two_devices_packages_coexist_in_one_prefix(installed):
    prefix, _, _, packages, _ = installed
    assert packages["gather"] != packages["kernel"]
    for package in packages.values():
        assert (prefix / "lib" / "cmake" / package / f"{package}Config.cmake").is_file()
        assert (prefix / "include" / package / "keyedge_model.hpp").is_file()
        assert not (prefix / "include" / package / "keyedge_model_config.hpp").exists()  # private
        assert open_artifact(prefix / "share" / package).manifest.fold_mode in packages
        targets = "".join(p.read_text() for p in (prefix / "lib" / "cmake" / package).glob("*Targets*.cmake"))
        assert "onnxruntime" not in targets and "/tmp" not in targets  # relocatable: no absolute paths


def test_classify_reads_png(installed, tmp_path):
    import matplotlib.image

    prefix, key_path, env, packages, root = installed
    matplotlib.image.imsave(tmp_path / "photo.png", _photo(16))
    r = _classify(prefix, packages["gather"], env, _model(prefix, packages["gather"]), tmp_path / "photo.png",
                  "--key", key_path)
    assert r.returncode == 0, r.stderr


def test_classify_bad_input(installed, tmp_path):
    prefix, key_path, env, packages, root = installed
    package = packages["gather"]
    model = _model(prefix, package)
    (tmp_path / "big.ppm").write_bytes(b"P6\n32 32\n255\n" + _photo(32).tobytes())
    (tmp_path / "photo.ppm").write_bytes(b"P6\n16 16\n255\n" + _photo(16).tobytes())
    Key.generate(4, seed=99).save(tmp_path / "other.bin")
    manifest = (model.parent / "manifest.json").read_text()
    broken = {"newer": manifest.replace('"version": 1', '"version": 2', 1),  # manifests the runtime refuses
              "huge-version": manifest.replace('"version": 1', '"version": 1e300', 1),
              "fraction": manifest.replace('"channels": 3', '"channels": 2.5', 1),
              "truncated": manifest[:len(manifest) // 2],
              "nested": '{"format": "keyedge-artifact", "version": 1, "input": ' + "[" * 100000 + "]" * 100000 + "}"}
    for name, text in broken.items():
        (tmp_path / name).mkdir()
        shutil.copyfile(model, tmp_path / name / "model.onnx")
        (tmp_path / name / "manifest.json").write_text(text)
    assert '"channels": 3' in manifest
    cases = {
        "wrong key": ([model, tmp_path / "photo.ppm", "--key", tmp_path / "other.bin"], "does not match"),
        "no key": ([model, tmp_path / "photo.ppm"], "pass the key file"),
        "wrong size": ([model, tmp_path / "big.ppm", "--key", key_path], "but the model takes 16x16"),
        "missing image": ([model, tmp_path / "nope.ppm", "--key", key_path], "does not exist"),
        "missing model": ([tmp_path / "nope.onnx", tmp_path / "photo.ppm"], "does not exist"),
        "newer manifest": ([tmp_path / "newer" / "model.onnx", tmp_path / "photo.ppm", "--key", key_path],
                           "newer than this runtime reads"),
        "version 1e300": ([tmp_path / "huge-version" / "model.onnx", tmp_path / "photo.ppm"],
                          "no valid format version"),
        "channels 2.5": ([tmp_path / "fraction" / "model.onnx", tmp_path / "photo.ppm"], "not an integer"),
        "truncated manifest": ([tmp_path / "truncated" / "model.onnx", tmp_path / "photo.ppm"], "not valid JSON"),
        "deeply nested": ([tmp_path / "nested" / "model.onnx", tmp_path / "photo.ppm"], "nested deeper than 64"),
    }
    for name, (args, message) in cases.items():
        r = _classify(prefix, package, env, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], (name, r.stderr)


def test_installed_cmake_packages_are_findable_together(installed, tmp_path):
    prefix, _, _, packages, _ = installed
    app = tmp_path / "app"
    app.mkdir()
    finds = "".join(f"find_package({p} REQUIRED)\n" for p in packages.values())
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.20)\nproject(app CXX)\nset(CMAKE_CXX_STANDARD 17)\n" + finds +
        "add_executable(app main.cpp)\n"
        f"target_link_libraries(app PRIVATE keyedge::{packages['gather']})\n")
    (app / "main.cpp").write_text('#include "keyedge_model.hpp"\n'
                                  "int main() { keyedge::Options o; return o.device; }\n")
    for cmd in (["cmake", "-S", str(app), "-B", str(app / "build"), f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", str(app / "build")]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_bindings_refuses_a_non_artifact(tmp_path):
    r = keyedge("bindings", tmp_path, "-o", tmp_path / "cpp")
    assert r.returncode == 2 and "holds no keyedge artifact" in r.stderr and not (tmp_path / "cpp").exists()
    r = keyedge("bindings", tmp_path, "-o", tmp_path / "cpp2", "--name", "bad name")
    assert r.returncode == 2 and not (tmp_path / "cpp2").exists()


def test_the_engine_identity_check_of_the_cpp_runtime(installed, tmp_path):
    """keyedge::check_engine_identity (called before deserializeCudaEngine) and local_l4t_release,
    through the installed package's public header and library."""
    import json

    prefix, _, env, packages, root = installed
    package = packages["gather"]
    manifest = json.loads((root / "gather" / "art" / "manifest.json").read_text())
    manifest.update(format="keyedge-engine", tensorrt_version="100300", compute_capability="8.7",
                    l4t_release="R36.3.0")
    (tmp_path / "engine.json").write_text(json.dumps(manifest))
    (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic\n")
    (tmp_path / "check.cpp").write_text(r'''
#include <iostream>
#include "keyedge_model.hpp"
int main(int, char** argv) {
  try {
    std::cout << keyedge::local_l4t_release(argv[5]) << "|" << keyedge::local_l4t_release(argv[6]) << std::endl;
    keyedge::check_engine_identity(keyedge::Manifest::from_file(argv[1]), argv[2], argv[3], argv[4], "e");
  } catch (const keyedge::Error& e) {
    std::cerr << e.what() << std::endl;
    return 2;
  }
  return 0;
}
''')
    subprocess.run(["g++", "-std=c++17", "-o", str(tmp_path / "check"), str(tmp_path / "check.cpp"),
                    f"-I{prefix / 'include' / package}", f"-L{prefix / 'lib'}", f"-l{package}",
                    f"-Wl,-rpath,{prefix / 'lib'}"], check=True)

    def check(version, capability, l4t):
        return subprocess.run([str(tmp_path / "check"), str(tmp_path / "engine.json"), version, capability, l4t,
                               str(tmp_path / "nv_tegra_release"), str(tmp_path / "absent")],
                              capture_output=True, text=True, env=env)

    ok = check("10.3.0", "8.7", "R36.3.0")
    assert ok.returncode == 0 and ok.stdout.strip() == "R36.4.3|", ok.stderr
    assert check("100300", "8.7", "").returncode == 0  # getInferLibVersion's form; release unknown here
    for args, needle in ((("100700", "8.7", "R36.3.0"), "built with TensorRT 10.3.0, this machine has TensorRT 10.7.0"),
                         (("10.3.0", "9.0", "R36.3.0"), "compute capability 8.7, this GPU is 9.0"),
                         (("10.3.0", "8.7", "R35.4.1"), "built on Jetson Linux R36.3.0, this device runs R35.4.1")):
        r = check(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def test_a_random_ensemble_answers_in_cpp_as_in_python(lora_ensemble, onnxruntime_dev, tmp_path):
    """The C++ runtime serves a gathered ensemble: for a given draw (a test build's hook) its answer is the
    Python runner's; a deployed draw comes fresh from libsodium's CSPRNG per query; bad draws are refused."""
    from keyedge.runtime.runners.ensemble import EnsembleRunner

    ens, keys_path, _, _ = lora_ensemble
    prefix = tmp_path / "prefix"
    package, env = _build_package(tmp_path / "ens", prefix, ens, keys_path, onnxruntime_dev,
                                  cmake_args=("-DKEYEDGE_ENSEMBLE_TEST_API=ON",))
    img = _photo(16)
    (tmp_path / "photo.ppm").write_bytes(b"P6\n16 16\n255\n" + img.tobytes())
    model = _model(prefix, package)
    canonical = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with EnsembleRunner(model, draw=2) as runner:
        x = runner.input_spec.from_canonical(canonical)
        for members in ([0, 2], [1, 0], [2]):
            r = _classify(prefix, package, env, model, tmp_path / "photo.ppm", "--members",
                          ",".join(map(str, members)), "--dump-logits", tmp_path / "logits.txt")
            assert r.returncode == 0, r.stderr
            py = runner.answer(x, np.array([members]))[0]
            assert np.abs(np.loadtxt(tmp_path / "logits.txt") - py).max() <= 1e-4, members
    answers = set()
    for _ in range(12):  # a draw of one of three members per query: the answers differ across queries
        r = _classify(prefix, package, env, model, tmp_path / "photo.ppm", "--ensemble-draw", "1",
                      "--dump-logits", tmp_path / "logits.txt")
        assert r.returncode == 0, r.stderr
        answers.add(tuple(np.round(np.loadtxt(tmp_path / "logits.txt"), 4)))
    assert len(answers) >= 2
    r = _classify(prefix, package, env, model, tmp_path / "photo.ppm", "--ensemble-draw", "3")
    assert r.returncode == 0 and r.stdout.startswith("backend: onnxruntime-cpu"), r.stderr
    for bad, needle in (("4", "cannot draw 4 of 3 members"), ("0", "cannot draw 0 of 3 members")):
        r = _classify(prefix, package, env, model, tmp_path / "photo.ppm", "--ensemble-draw", bad)
        assert _one_line_refusal(r, needle), r.stderr
    r = _classify(prefix, package, env, model, tmp_path / "photo.ppm", "--members", "0,3")
    assert _one_line_refusal(r, "member index is 0 to 2"), r.stderr
