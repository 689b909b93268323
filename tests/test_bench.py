import json

import pytest

from .test_cli_keys import keyedge


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
        assert m["p50_ms"] <= m["p90_ms"] <= m["p99_ms"] and m["iterations"] == 6
        assert m["ratio_vs_plain"] > 0
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
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    (tmp_path / "model.engine.json").write_text((root / "fused" / "manifest.json").read_text())
    r = keyedge("bench", engine, "-o", tmp_path / "b")
    assert r.returncode == 2 and "TensorRT" in r.stderr
    r = keyedge("bench", root / "gather", "-o", tmp_path / "b")  # gather needs its key
    assert r.returncode == 2 and "--key" in r.stderr


def test_help_lists_every_command():
    out = keyedge("--help").stdout
    for cmd in ("keygen", "key", "train", "eval", "demo", "export", "parity", "build", "bench", "bindings"):
        assert cmd in out, cmd
