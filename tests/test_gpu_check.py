"""The prepared GPU check (benchmarks/gpu/run.sh), as far as a machine without a GPU can test it: its
arguments, the wheels it brings for what the GPU machine lacks, the JSON it writes, and the ViT benchmark's
JSON on a CPU smoke run."""

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib

import pytest
import torch
from packaging.requirements import Requirement

from .helpers import ROOT

GPU = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))
import check  # noqa: E402  (benchmarks/gpu/check.py)


def _run(*args, env=None):
    return subprocess.run(["bash", str(GPU / "run.sh"), *map(str, args)], capture_output=True, text=True, env=env)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _wheels() -> dict[str, str]:
    lines = [ln.strip() for ln in (GPU / "wheels.txt").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9a-z.]*", ln) for ln in lines), lines  # pinned, one per line
    return dict(ln.split("==") for ln in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would really run")
def test_without_a_gpu_the_check_says_so_and_measures_nothing(tmp_path):
    r = _run(tmp_path / "out")
    assert r.returncode == 3 and "no CUDA GPU" in r.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["format"] == "keyedge-gpu-check" and report["gpu"] is None and report["passed"] is False
    assert list(report["steps"]) == ["pytest_gpu", "kernel_bench", "vit_bench"]
    for step in report["steps"].values():
        assert set(step) == {"status", "rc", "seconds", "timeout_s"} and step["status"].startswith("skipped")
    assert report["pytest"] is None and report["kernel_bench"] is None and report["vit_bench"] is None


@pytest.mark.parametrize("args, words", [
    ((), "required"),
    (("FILE",), "not a directory"),
    (("OUT", "--budget-s", "5"), "at least 60"),
    (("OUT", "--budget-s", "soon"), "invalid int"),
    (("OUT", "--wheels"), "needs a directory"),
    (("OUT", "--wheels", "NOPE"), "not a directory"),
    (("OUT", "--wheels", "EMPTY"), "no wheels"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, args, words):
    (tmp_path / "FILE").write_text("")
    (tmp_path / "EMPTY").mkdir()
    names = {"FILE", "OUT", "NOPE", "EMPTY"}
    r = _run(*(tmp_path / a if a in names else a for a in args))
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "OUT").exists()


def test_the_wheels_bring_what_the_gpu_machine_lacks():
    wheels = _wheels()
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    have = check.PREINSTALLED | set(wheels) | set(check.NOT_NEEDED)
    assert deps - have == set()  # every dependency is there, carried, or known not to be needed
    gpu_python = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "sys_platform": "linux", "extra": ""}
    for name in wheels:  # and what each carried wheel needs in turn, on the GPU machine's Python
        for req in map(Requirement, importlib.metadata.requires(name) or ()):
            if req.marker is None or req.marker.evaluate(gpu_python):
                assert _name(req.name) in have, f"{name} needs {req}"
    assert not set(wheels) & check.PREINSTALLED


def test_the_check_collects_only_the_gpu_test_files():
    files = check.gpu_test_files()
    assert "tests/deploy/test_gpu_deploy.py" in files and "tests/checks/test_bench.py" in files
    assert all("mark.gpu" in (ROOT / f).read_text() for f in files)
    commands = check.commands(ROOT / "out")
    assert set(commands) == set(check.STEPS) and sum(limit for _, limit in commands.values()) <= 480 - check.RESERVE_S


def test_the_vit_benchmark_writes_its_json_on_a_cpu_smoke_run(tmp_path):
    out = tmp_path / "vit.json"
    r = subprocess.run([sys.executable, str(GPU / "vit_bench.py"), "--device", "cpu", "--model", "vit_tiny_patch16_224",
                        "--img-size", "32", "--block-size", "4", "--train-batch", "2", "--batches", "1,2", "--steps",
                        "1", "--rounds", "1", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [(t["mode"], t["keyed"]) for t in report["train"]] == [("full", True), ("full", False), ("lora", True),
                                                                   ("lora", False)]
    assert all(t["images_per_s"] > 0 and t["trainable_params"] > 0 for t in report["train"])
    lora, full = report["train"][2]["trainable_params"], report["train"][0]["trainable_params"]
    assert lora < full / 5 and "keyed_over_plain_time" in report["train"][0]
    assert [i["batch"] for i in report["inference"]] == [1, 2]
    assert all(i["folded_over_plain"] > 0 for i in report["inference"])
