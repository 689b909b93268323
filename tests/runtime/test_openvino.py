"""The OpenVINO backend: every artifact mode runs through OpenVINO's CPU plugin with the logits ONNX Runtime
gives (fp32), bf16 execution where the CPU has it (refused in one line where it has not), and --backend
openvino in bench and parity, refused in one line, before any work, where OpenVINO is not installed."""

import json
import os
import subprocess
import sys

import pytest

from keyedge.core.errors import KeyedgeError
from keyedge.runtime.runners import OnnxRunner, OpenVinoRunner, open_runner

from ..helpers import keyedge, max_rel_err, runner_images
from .bundles import MODES, opener

ov = pytest.importorskip("openvino", reason="the OpenVINO backend's tests need openvino (pip install 'keyedge[openvino]')")
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_gives_onnx_runtimes_logits_through_openvino(sealed, mode):
    root, key = sealed
    model = root / mode / "model.onnx"
    with OnnxRunner(model, key) as ref, open_runner(root / mode, key, backend="openvino") as r:
        assert isinstance(r, OpenVinoRunner) and r.precision == "fp32" and r.name == "openvino-cpu-fp32"
        for n in (1, 5):  # one image, and a batch (chunked where the artifact's batch is fixed)
            x = runner_images(ref, n, seed=n)
            assert max_rel_err(r(x), ref(x)) <= 1e-4


def test_the_key_rule_holds_under_openvino(sealed):
    root, key = sealed
    with pytest.raises(KeyedgeError, match="key"):
        open_runner(root / "gather", None, backend="openvino")  # the gather takes the key at run time


def test_a_sealed_bundle_is_refused_by_openvino_in_one_line(sealed):
    root, _ = sealed
    with pytest.raises(KeyedgeError, match="ONNX Runtime"):
        open_runner(root / "fused.kes", backend="openvino", opener=opener(root))


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has neither AMX nor AVX512-BF16 (OpenVINO offers no BF16)")
def test_bf16_execution_on_a_cpu_that_has_it(sealed, trained_keyed, tmp_path):
    root, key = sealed
    run, key_path, _, _ = trained_keyed
    with OnnxRunner(root / "fused" / "model.onnx", key) as ref, \
            open_runner(root / "fused", key, backend="openvino", inference_precision="bf16") as r:
        assert r.precision == "bf16" and r.name == "openvino-cpu-bf16"
        x = runner_images(ref, 8)
        err = max_rel_err(r(x), ref(x))
        assert 0 < err <= 3e-2  # bf16 really ran (fp32 would be ~1e-6), within an 8-bit mantissa's error
    # adversarial images lie near the decision boundary: on 100 of them bf16 may flip up to 3 (the 97% floor)
    r = keyedge("parity", root / "fused", "--reference", run, "--key", key_path, "--n", "100", "--backend", "openvino",
                "--inference-precision", "bf16", "-o", tmp_path / "parity")
    assert r.returncode == 0, r.stdout + r.stderr
    (result,) = json.loads((tmp_path / "parity" / "parity.json").read_text())["artifacts"].values()
    assert result["passed"] and result["precision"] == "bf16" and result["runner"] == "openvino-cpu-bf16"


@pytest.mark.skipif(HAS_BF16, reason="this CPU has bf16 (AMX or AVX512-BF16): the refusal cannot be seen here")
def test_bf16_is_refused_in_one_line_on_a_cpu_without_it(sealed, tmp_path):
    root, key = sealed
    r = keyedge("bench", root / "fused", "--backend", "openvino", "--inference-precision", "bf16", "-o", tmp_path / "b")
    assert r.returncode == 2 and "AVX512-BF16" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_bench_and_parity_run_on_openvino(sealed, trained_keyed, tmp_path):
    root, key = sealed
    run, key_path, _, _ = trained_keyed
    r = keyedge("bench", root / "fused", root / "gather", "--key", key_path, "--backend", "openvino", "--batch", "1",
                "--rounds", "1", "--iters", "2", "-o", tmp_path / "bench")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["measurements"]
    assert {m["backend"] for m in rows} == {"openvino-cpu-fp32"} and {m["batch"] for m in rows} == {1}
    r = keyedge("parity", root / "fused", root / "kernel", "--reference", run, "--key", key_path, "--n", "32",
                "--backend", "openvino", "-o", tmp_path / "parity")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    assert report["passed"] and {a["runner"] for a in report["artifacts"].values()} == {"openvino-cpu-fp32"}


def test_openvino_missing_is_one_line_exit_2_before_any_work(sealed, trained_keyed, tmp_path):
    """A Python where ``import openvino`` fails, as where it is not installed."""
    root, key = sealed
    run, key_path, _, _ = trained_keyed
    blocker = tmp_path / "site"
    (blocker / "openvino").mkdir(parents=True)
    (blocker / "openvino" / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for args in (["bench", root / "fused", "--backend", "openvino", "-o", tmp_path / "b"],
                 ["parity", root / "fused", "--reference", run, "--key", key_path, "--backend", "openvino",
                  "-o", tmp_path / "p"]):
        p = subprocess.run([sys.executable, "-m", "keyedge.cli", *map(str, args)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert p.returncode == 2, p.stderr
        assert "pip install 'keyedge[openvino]'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists() and not (tmp_path / "p").exists()
