"""The typed manifests, the key rule, the path resolver, the output rule and the runner lifecycle."""

import json

import numpy as np
import pytest

from keyedge import Key
from keyedge.core.manifests import ArtifactManifest, EngineManifest, RunManifest, check_key, needs_key, read_run
from keyedge.runtime.artifacts import open_artifact
from keyedge.core.errors import KeyedgeError
from keyedge.core.io import check_output_dir, staged_dir
from keyedge.runtime.runners import OnnxRunner, open_runner

from ..helpers import keyedge


@pytest.fixture(scope="module")
def gather(tmp_path_factory, trained_keyed):
    run, key_path, key, _ = trained_keyed
    out = tmp_path_factory.mktemp("art") / "gather"
    assert keyedge("export", run, "--key", key_path, "-o", out, "--mode", "gather", "--batch", "4").returncode == 0
    return out, key


def test_manifests_round_trip(trained_keyed, gather):
    run, _, _, _ = trained_keyed
    m = read_run(run)
    assert RunManifest.from_json(m.to_json()) == m and m.input.size == (16, 16)
    art = ArtifactManifest.read(gather[0] / "manifest.json")
    assert ArtifactManifest.from_json(art.to_json()) == art and art.input.fixed_batch == 4
    with pytest.raises(KeyedgeError, match="not a keyedge-engine manifest"):
        EngineManifest.from_json(art.to_json(), "x.json")
    data = json.loads(art.to_json())
    for change, needle in (({"version": 2}, "newer than this keyedge reads"), ({"version": "1"}, "no valid"),
                           ({"surprise": 1}, "unknown field 'surprise'")):
        with pytest.raises(KeyedgeError, match=needle):
            ArtifactManifest.from_dict({**data, **change}, "m.json")
    del data["input"]
    with pytest.raises(KeyedgeError, match="missing field 'input'"):
        ArtifactManifest.from_dict(data, "m.json")


def test_one_key_rule(trained_keyed, trained_plain, gather):
    run, _, key, _ = trained_keyed
    other = Key.generate(4, seed=99)
    keyed_run, plain_run = read_run(run), read_run(trained_plain[0])
    art = open_artifact(gather[0]).manifest
    assert needs_key(keyed_run) and needs_key(art) and not needs_key(plain_run)
    check_key(art, key, "a")
    for manifest in (keyed_run, art):
        with pytest.raises(KeyedgeError, match="--key"):
            check_key(manifest, None, "a")
        with pytest.raises(KeyedgeError, match="does not match"):
            check_key(manifest, other, "a")
    check_key(plain_run, key, "a")  # a key the artifact does not take is ignored...
    with pytest.raises(KeyedgeError, match="plain"):
        check_key(plain_run, key, "a", strict=True)  # ...unless the command points at that one artifact


def test_open_artifact_resolves_every_path(trained_keyed, gather, tmp_path):
    run, _, _, _ = trained_keyed
    assert open_artifact(run).kind == "run"
    assert open_artifact(gather[0]).kind == open_artifact(gather[0] / "model.onnx").kind == "onnx"
    for bad, needle in ((tmp_path, "holds no keyedge artifact"), (tmp_path / "nope.onnx", "does not exist")):
        with pytest.raises(KeyedgeError, match=needle):
            open_artifact(bad)
    (tmp_path / "m.engine").write_bytes(b"x")
    with pytest.raises(KeyedgeError, match="no manifest m.engine.json"):
        open_artifact(tmp_path / "m.engine")


def test_runner_lifecycle(gather):
    path, key = gather
    runner = open_runner(path, key)
    assert isinstance(runner, OnnxRunner) and not runner.is_active
    images = np.random.default_rng(0).random((6, 3, 16, 16), dtype=np.float32)
    with pytest.raises(KeyedgeError, match="not active"):
        runner(images)
    with runner:
        assert runner.is_active and runner.session is not None
        logits = runner(images)  # 6 images through a fixed batch of 4: two padded chunks
        assert logits.shape == (6, 10)
        assert np.allclose(logits[:4], runner(images[:4]), atol=1e-5)
        with pytest.raises(KeyedgeError, match="shape"):
            runner(images[:, :, :8])
    assert not runner.is_active and runner.session is None and runner._feed_extra == {}


def test_a_failed_activation_frees_what_it_took(gather, tmp_path):
    path, key = gather
    runner = OnnxRunner(path / "model.onnx", key)
    runner.device = "cuda"  # a provider this machine may lack
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("ONNX Runtime here has the CUDA provider")
    with pytest.raises(KeyedgeError, match="CUDAExecutionProvider"):
        runner.activate()
    assert not runner.is_active and runner.session is None


def test_output_rule(tmp_path):
    out = tmp_path / "out"
    check_output_dir(out, False)  # missing: fine
    out.mkdir()
    check_output_dir(out, False)  # empty: fine
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "keep.txt").write_text("mine too")
    with pytest.raises(KeyedgeError, match="--force"):
        check_output_dir(out, False)
    with pytest.raises(KeyedgeError, match="boom"), staged_dir(out, force=True) as stage:
        (stage / "report.md").write_text("half")
        raise KeyedgeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]  # a failure leaves it untouched
    with staged_dir(out, force=True) as stage:
        (stage / "report.md").write_text("new")
        (stage / "sub").mkdir()
        (stage / "sub" / "mine.json").write_text("{}")
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.txt").read_text() == "mine too"
    assert (out / "report.md").read_text() == "new" and (out / "sub" / "mine.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyedgeError, match="not a directory"):
        check_output_dir(tmp_path / "file", True)
