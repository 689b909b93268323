import json

import pytest
import torch

from ..helpers import fake_engine, keyedge


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, trained_keyed, trained_plain):
    run, key_path, _, _ = trained_keyed
    plain_run, _, _ = trained_plain
    root = tmp_path_factory.mktemp("bench_art")
    for name, r_dir, args in (("fused", run, ["--key", key_path]),
                              ("gather", run, ["--key", key_path, "--mode", "gather"]),
                              ("plain", plain_run, [])):
        res = keyedge("export", r_dir, *args, "-o", root / name, "--dynamic-batch")
        assert res.returncode == 0, res.stderr
    return root, key_path


def test_bench_interleaved_with_ratios(tmp_path, artifacts):
    root, key_path = artifacts
    out = tmp_path / "bench"
    r = keyedge("bench", root / "fused", root / "gather", root / "plain", "--key", key_path, "--batch", "1,4",
                "--rounds", "2", "--iters", "3", "-o", out)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").is_file() and (out / "latency.png").stat().st_size > 0
    kinds = {(m["fold_mode"], m["batch"]) for m in results["measurements"]}
    assert kinds == {(k, b) for k in ("fused", "gather", "plain") for b in (1, 4)}
    for m in results["measurements"]:
        assert m["iterations"] == 6 and m["p50_ms"] > 0
        assert m["throughput_ips"] == pytest.approx(1000 * m["batch"] / m["p50_ms"])
        if m["fold_mode"] == "plain":
            assert m["ratio_vs_plain"] == 1.0  # the plain model is its own reference
        else:
            assert 0.1 < m["ratio_vs_plain"] < 10  # same tiny ViT: same order of magnitude
    assert results["machine"]["cores"] >= 1 and "onnxruntime" in results["machine"]["versions"]


def test_bench_jetson_on_a_non_jetson_host(tmp_path, artifacts):
    root, _ = artifacts
    r = keyedge("bench", root / "fused", "--device", "jetson-orin", "-o", tmp_path / "b")
    assert r.returncode == 2 and "bench_engine.sh" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_estimate_roofline(artifacts):
    root, _ = artifacts
    r = keyedge("bench", root / "fused", "--estimate", "--target", "jetson-orin", "--batch", "1,8")
    assert r.returncode == 0, r.stderr
    assert "GFLOP/image" in r.stdout and "batch 8: floor" in r.stdout


def test_bench_refuses_what_cannot_run_here(tmp_path, artifacts):
    root, _ = artifacts
    engine = fake_engine(root / "fused", tmp_path)  # not an engine: TensorRT, absent or present, refuses it
    r = keyedge("bench", engine, "-o", tmp_path / "b")
    assert r.returncode == 2 and "TensorRT" in r.stderr and not (tmp_path / "b").exists()
    r = keyedge("bench", root / "gather", "-o", tmp_path / "b")  # gather needs its key
    assert r.returncode == 2 and "--key" in r.stderr and not (tmp_path / "b").exists()


def test_bench_output_rule(tmp_path, artifacts):
    root, _ = artifacts
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["bench", root / "fused", "--batch", "1", "--rounds", "1", "--iters", "1", "-o", out]
    r = keyedge(*args)
    assert r.returncode == 2 and "--force" in r.stderr and {p.name for p in out.iterdir()} == {"notes.txt"}
    assert keyedge(*args, "--force").returncode == 0
    assert {p.name for p in out.iterdir()} == {"notes.txt", "bench.json", "bench.md", "latency.png"}


def test_gpu_backends_follow_the_providers_present():
    from keyedge.runtime.runners.onnxruntime import gpu_backends

    assert gpu_backends(["CPUExecutionProvider"]) == []
    assert gpu_backends(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["cuda"]
    assert gpu_backends(["NvTensorRTRTXExecutionProvider", "CUDAExecutionProvider",
                         "CPUExecutionProvider"]) == ["cuda", "nv-tensorrt-rtx"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda_measures_the_gpu_beside_the_cpu(tmp_path, artifacts):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("ONNX Runtime here has no CUDA execution provider (install onnxruntime-gpu)")
    root, key_path = artifacts
    out = tmp_path / "bench"
    r = keyedge("bench", root / "fused", root / "plain", "--device", "cuda", "--batch", "1,8", "--rounds", "2",
                "--iters", "3", "-o", out)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "bench.json").read_text())
    assert "gpu" in results["machine"] and results["machine"]["gpu"]["driver"]
    backends = {m["backend"] for m in results["measurements"]}
    assert {"onnxruntime-cpu", "onnxruntime-cuda"} <= backends
