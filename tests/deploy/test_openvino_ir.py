"""keyedge export --runtime openvino: OpenVINO IR of every mode with the PyTorch model's logits, int8 by NNCF
calibrated on keyed images and held to parity before it is written, sealed IR bundles run from memory, the
key read off a folded IR by the audit, and bad input refused in one line."""

import json
import shutil
import stat

import numpy as np
import pytest

from keyedge import Key
from keyedge.checks import config as checks_config
from keyedge.checks.config import Tolerance
from keyedge.core.manifests import read_ir_manifest
from keyedge.runtime.runners import OnnxRunner, OpenVinoRunner, open_runner

from ..helpers import keyedge, max_rel_err, runner_images
from ..runtime.bundles import MODES, opener

ov = pytest.importorskip("openvino", reason="OpenVINO IR needs openvino (pip install 'keyedge[openvino]')")
pytest.importorskip("nncf", reason="int8 IR needs NNCF (pip install 'keyedge[openvino]')")
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _int8_fed(op, depth: int = 4) -> bool:
    """Whether an input of ``op`` comes (through converts, scales and reshapes) from int8: a FakeQuantize on an
    activation, or an 8-bit constant (NNCF's compressed weights)."""
    for i in range(op.get_input_size()):
        node = op.input_value(i).get_node()
        kind = node.get_type_name()
        if kind == "FakeQuantize" or (kind == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")):
            return True
        if depth and kind in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose") and _int8_fed(node, depth - 1):
            return True
    return False


@pytest.fixture(scope="module")
def irs(tmp_path_factory, finetuned_keyed):
    """Every mode as fp32 IR, the folded and the kernel mode as int8 IR, and the fused ONNX beside them."""
    run, key_path, key, _ = finetuned_keyed
    root = tmp_path_factory.mktemp("ir")
    exports = {**{name: args for name, args in MODES.items()},
               "fused_int8": ["--precision", "int8"], "kernel_int8": [*MODES["kernel"], "--precision", "int8"]}
    for name, args in exports.items():
        r = keyedge("export", run, "--key", key_path, "-o", root / name, "--runtime", "openvino", "--parity-n", "100",
                    *args)
        assert r.returncode == 0, r.stdout + r.stderr
    assert keyedge("export", run, "--key", key_path, "-o", root / "onnx").returncode == 0
    return root, key


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_as_ir_has_the_pytorch_models_logits(irs, mode):
    root, key = irs
    report = json.loads((root / mode / "verification.json").read_text())
    assert report["passed"] and report["runner"] == "openvino-cpu-fp32" and report["real"]["rel_error"] <= 1e-4
    assert sorted(p.name for p in (root / mode).iterdir()) == ["manifest.json", "model.bin", "model.xml",
                                                                "verification.json"]
    for name in ("model.xml", "model.bin"):  # a keyed model's weights: as secret as the key
        assert stat.S_IMODE((root / mode / name).stat().st_mode) == 0o600
    manifest = read_ir_manifest(root / mode / "model.xml")
    assert manifest.to_dict() == json.loads((root / mode / "manifest.json").read_text())
    assert manifest.runtime == "openvino" and manifest.inference_precision == "fp32" and manifest.fold_mode == mode \
        .replace("embedded", "gather")
    with open_runner(root / mode, key) as r:  # an IR runs on OpenVINO whatever --backend says
        assert isinstance(r, OpenVinoRunner) and r.is_ir
        if mode == "fused":
            with OnnxRunner(root / "onnx" / "model.onnx") as ref:
                x = runner_images(ref, 5)
                assert max_rel_err(r(x), ref(x)) <= 1e-4


def test_int8_ir_is_calibrated_keeps_patch_embedding_and_head_passed_parity_before_writing(irs, finetuned_keyed,
                                                                                          tmp_path):
    root, key = irs
    run, key_path, _, _ = finetuned_keyed
    for name in ("fused_int8", "kernel_int8"):
        manifest = read_ir_manifest(root / name / "model.xml")
        assert manifest.precision == "int8" and manifest.int8_method == "nncf" and "nncf" in manifest.versions
        report = json.loads((root / name / "verification.json").read_text())
        # calibrated on the data's ranges: uniform noise is reported, the real images held
        assert report["random_held"] is False and report["real"]["rel_error"] <= 0.1 and report["passed"]
        gate = report["parity"]
        assert gate["passed"] and gate["precision"] == "int8" and gate["n"] == 100
        assert {"clean", "whitebox_linf", "pgd_linf_transfer_base"} <= set(gate["sets"])  # adversarial, transfer too
        model = ov.Core().read_model(str(root / name / "model.xml"))
        matmuls = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
        assert sum(_int8_fed(m) for m in matmuls) >= 8  # the blocks' matrix products really are int8
        conv = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")
        assert not _int8_fed(matmuls[-1]) and not _int8_fed(conv)  # the head and the patch embedding are not
    r = keyedge("parity", root / "fused_int8", root / "kernel_int8", "--reference", run, "--key", key_path, "--n",
                "100", "-o", tmp_path / "parity")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((tmp_path / "parity" / "parity.json").read_text())["artifacts"]
    assert all(v["precision"] == "int8" and v["runner"] == "openvino-cpu-fp32" for v in results.values())


def test_an_int8_ir_that_fails_parity_is_not_written(finetuned_keyed, tmp_path, monkeypatch):
    run, key_path, _, _ = finetuned_keyed
    strict = Tolerance(accuracy=0.0, agreement=1.0, paired_test=False)  # int8 moves some image: this fails
    monkeypatch.setitem(checks_config.DEFAULT_TOLERANCE, "int8", strict)
    r = keyedge("export", run, "--key", key_path, "-o", tmp_path / "ir", "--runtime", "openvino", "--precision", "int8",
                "--parity-n", "100")
    assert r.returncode == 1 and "fails parity" in r.stderr and "nothing written" in r.stderr
    assert "the int8 rule: 0.0 point, agreement >= 100%" in r.stderr  # the set that failed, and the rule it broke
    failed = r.stderr.split("(", 1)[1].split(":", 1)[0]
    assert failed in ("clean", "whitebox_linf", "whitebox_l2", "pgd_linf_transfer_base", "pgd_l2_transfer_base")
    assert not (tmp_path / "ir").exists() and not list(tmp_path.glob(".ir*"))


def test_a_reduced_precision_ir_without_the_runs_test_images_is_refused_unless_unchecked(finetuned_keyed, tmp_path):
    run, key_path, _, _ = finetuned_keyed
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["data"]["spec"] = str(tmp_path / "not-here")  # the run's data set is on another machine
    (moved / "manifest.json").write_text(json.dumps(manifest))
    r = keyedge("export", moved, "--key", key_path, "-o", tmp_path / "ir", "--runtime", "openvino", "--precision",
                "int8")
    assert r.returncode == 2 and "--parity-n 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ir").exists()
    if HAS_BF16:  # bf16 needs no calibration: --parity-n 0 writes it, and says it is unchecked
        r = keyedge("export", moved, "--key", key_path, "-o", tmp_path / "bf16", "--runtime", "openvino",
                    "--inference-precision", "bf16", "--parity-n", "0")
        assert r.returncode == 0 and "parity NOT checked" in r.stdout, r.stdout + r.stderr
        assert json.loads((tmp_path / "bf16" / "verification.json").read_text())["parity"] is None


def test_a_sealed_ir_runs_from_memory_and_its_buffer_is_wiped(irs, finetuned_keyed, tmp_path):
    root, key = irs
    _, key_path, _, _ = finetuned_keyed
    assert keyedge("device", "keygen", "-o", tmp_path / "device.key").returncode == 0
    assert keyedge("publisher", "keygen", "-o", tmp_path / "publisher.key").returncode == 0
    for name in ("fused_int8", "gather"):  # the folded weights; the gather's key travels in the bundle
        r = keyedge("seal", root / name, "--to", tmp_path / "device.pub", "-o", tmp_path / f"{name}.kes", "--key",
                    key_path, "--sign-with", tmp_path / "publisher.key")
        assert r.returncode == 0, r.stderr
        with open_runner(root / name, key) as plain, \
                open_runner(tmp_path / f"{name}.kes", opener=opener(tmp_path)) as sealed:
            assert isinstance(sealed, OpenVinoRunner) and sealed.precision == plain.precision
            bundle = sealed._bundle
            assert bundle is not None and not bundle.plain.wiped  # OpenVINO executes from it while active
            x = runner_images(plain, 4, seed=3)
            np.testing.assert_array_equal(sealed(x), plain(x))
        assert bundle.plain.wiped and sealed._bundle is None


def test_the_audit_reads_the_key_off_a_folded_ir(irs, finetuned_keyed, tmp_path):
    root, _ = irs
    _, key_path, _, base = finetuned_keyed
    r = keyedge("audit", root / "fused", root / "fused_int8", root / "gather", root / "embedded", "--base", base,
                "--key", key_path, "-o", tmp_path / "audit", "--n", "32")
    assert r.returncode == 0, r.stdout + r.stderr
    found = {f["kind"]: f for f in json.loads((tmp_path / "audit" / "audit.json").read_text())["artifacts"]}
    assert found["fused-ir-fp32"]["fraction"] >= 0.9 and found["fused-ir-int8"]["fraction"] >= 0.9
    assert found["gather-ir"]["holds_key"] is False and found["gather-ir-embedded-key"]["fraction"] == 1.0


def test_an_ir_whose_manifest_does_not_match_is_refused_in_one_line(irs, tmp_path):
    root, key = irs
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for f in ("model.xml", "model.bin"):
        (swapped / f).write_bytes((root / "fused" / f).read_bytes())
    (swapped / "manifest.json").write_text((root / "gather" / "manifest.json").read_text())
    r = keyedge("bench", swapped, "-o", tmp_path / "bench")
    assert r.returncode == 2 and "does not match" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bench").exists()
    other = tmp_path / "other.bin"
    Key.generate(key.block_size, channels=key.channels, seed=99, allow_small=True).save(other)
    r = keyedge("bench", root / "gather", "--key", other, "-o", tmp_path / "bench")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bench").exists()


@pytest.mark.parametrize("args, words", [
    (["--runtime", "openvino", "--precision", "fp16"], "bf16"),
    (["--inference-precision", "bf16"], "--runtime openvino"),
])
def test_export_refuses_what_openvino_ir_does_not_take(finetuned_keyed, tmp_path, args, words):
    run, key_path, _, _ = finetuned_keyed
    r = keyedge("export", run, "--key", key_path, "-o", tmp_path / "ir", *args)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ir").exists()


def test_an_ir_does_not_go_into_an_onnx_export(irs, finetuned_keyed):
    root, _ = irs
    run, key_path, _, _ = finetuned_keyed
    r = keyedge("export", run, "--key", key_path, "-o", root / "onnx", "--runtime", "openvino", "--force")
    assert r.returncode == 2 and "directory of its own" in r.stderr


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has neither AMX nor AVX512-BF16 (OpenVINO offers no BF16)")
def test_a_bf16_ir_records_its_precision_and_passed_parity(finetuned_keyed, tmp_path):
    run, key_path, key, _ = finetuned_keyed
    r = keyedge("export", run, "--key", key_path, "-o", tmp_path / "ir", "--runtime", "openvino",
                "--inference-precision", "bf16", "--parity-n", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_ir_manifest(tmp_path / "ir" / "model.xml").inference_precision == "bf16"
    assert json.loads((tmp_path / "ir" / "verification.json").read_text())["parity"]["precision"] == "bf16"
    with open_runner(tmp_path / "ir", key) as r:
        assert r.precision == "bf16" and r.name == "openvino-cpu-bf16"


def test_the_cpu_x86_profile_is_an_openvino_target_and_only_that():
    from keyedge.core.errors import KeyedgeError
    from keyedge.deploy.targets import load_cpu_target, load_target

    t = load_cpu_target("cpu-x86")
    assert (t.name, t.precision, t.inference_precision) == ("cpu-x86", "fp32", "auto")
    assert t.resolved_inference_precision(True) == "bf16" and t.resolved_inference_precision(False) == "fp32"
    with pytest.raises(KeyedgeError, match="OpenVINO CPU target, not a TensorRT one"):
        load_target("cpu-x86")  # keyedge build has nothing to build for it
    with pytest.raises(KeyedgeError, match="TensorRT target, not an OpenVINO CPU one"):
        load_cpu_target("desktop")


@pytest.mark.parametrize("body, words", [
    ('precision = "fp16"\ninference_precision = "auto"', "fp32 or int8"),
    ('precision = "fp32"\ninference_precision = "fp16"', "auto, fp32 or bf16"),
])
def test_a_malformed_cpu_profile_is_refused_in_one_line_before_any_work(finetuned_keyed, tmp_path, body, words):
    run, key_path, _, _ = finetuned_keyed
    profile = tmp_path / "mine.toml"
    profile.write_text(f'name = "mine"\ndescription = "x"\nruntime = "openvino"\n{body}\n')
    r = keyedge("export", run, "--key", key_path, "-o", tmp_path / "ir", "--target", profile)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ir").exists()


def test_export_bench_and_parity_take_the_cpu_x86_target(finetuned_keyed, tmp_path):
    """--target cpu-x86: IR in the precision this CPU resolves auto to (bf16 where it has it), run on
    OpenVINO in that precision by bench and parity; a TensorRT profile there is refused in one line."""
    run, key_path, _, _ = finetuned_keyed
    want = "bf16" if HAS_BF16 else "fp32"
    r = keyedge("export", run, "--key", key_path, "-o", tmp_path / "ir", "--target", "cpu-x86", "--parity-n", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = read_ir_manifest(tmp_path / "ir" / "model.xml")
    assert manifest.runtime == "openvino" and manifest.inference_precision == want and manifest.precision == "fp32"
    report = json.loads((tmp_path / "ir" / "verification.json").read_text())
    assert report["precision"] == want and ("parity" in report) == (want == "bf16")
    r = keyedge("bench", tmp_path / "ir", "--target", "cpu-x86", "--batch", "1", "--rounds", "1", "--iters", "2",
                "-o", tmp_path / "bench")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {m["backend"] for m in json.loads((tmp_path / "bench" / "bench.json").read_text())["measurements"]} \
        == {f"openvino-cpu-{want}"}
    r = keyedge("parity", tmp_path / "ir", "--reference", run, "--key", key_path, "--n", "40", "--target", "cpu-x86",
                "-o", tmp_path / "parity")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((tmp_path / "parity" / "parity.json").read_text())["artifacts"]
    assert [v["runner"] for v in results.values()] == [f"openvino-cpu-{want}"]
    r = keyedge("export", run, "--key", key_path, "-o", tmp_path / "ir32", "--target", "cpu-x86",
                "--inference-precision", "fp32")  # an explicit precision wins over the profile's auto
    assert r.returncode == 0 and read_ir_manifest(tmp_path / "ir32" / "model.xml").inference_precision == "fp32"
    r = keyedge("parity", tmp_path / "ir", "--reference", run, "--key", key_path, "--target", "desktop",
                "-o", tmp_path / "parity2")
    assert r.returncode == 2 and "TensorRT target" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "parity2").exists()
