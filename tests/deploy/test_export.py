import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from keyedge import Key
from keyedge.core.manifests import METADATA_KEY, ArtifactManifest, read_onnx_manifest, read_run
from keyedge.core.data import run_images
from keyedge.checks.verify import verify
from keyedge.deploy.config import ExportOptions
from keyedge.deploy.onnx_export import export_onnx

from ..helpers import keyedge


def _export(tmp_path, trained, **opts):
    """Export, then verify against PyTorch on 16 real images through the runner's batching."""
    run, _, key, keyed = trained
    out = tmp_path / "art"
    out.mkdir()
    run_manifest = read_run(run)
    manifest = export_onnx(keyed, out, ExportOptions(**opts), run_manifest)
    report = verify(out / "model.onnx", keyed, manifest, run_images(run_manifest, 16)[0])
    assert report["images"] == 16 and {"random", "real"} <= set(report)
    return out / "model.onnx", manifest, report, key


def _int_payloads(path):
    """Every integer tensor stored in the graph: initializers and Constant nodes."""
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return [numpy_helper.to_array(t).ravel() for t in tensors
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)]


def _contains(arrays, seq):
    seq = np.asarray(seq)
    for a in arrays:
        if a.size >= seq.size:
            windows = np.lib.stride_tricks.sliding_window_view(a, seq.size)
            if (windows == seq).all(axis=1).any():
                return True
    return False


@pytest.mark.parametrize("mode", ["fused", "gather"])
@pytest.mark.parametrize("kind", ["float", "uint8"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_export_matches_reference(tmp_path, trained_keyed, mode, kind, layout):
    path, manifest, report, _ = _export(tmp_path, trained_keyed, mode=mode, input=kind, layout=layout, batch=2)
    assert report["passed"] and report["random"]["rel_error"] <= 1e-4 and report["real"]["rel_error"] <= 1e-4
    assert report["real"]["top1_agreement"] == 1.0
    assert manifest.fold_mode == mode and manifest.input.layout == layout.upper() and manifest.input.batch == 2
    assert manifest.contains_key == (mode == "fused")


def test_onnx_structure_manifest_and_no_key_in_gather(tmp_path, trained_keyed):
    path, manifest, _, key = _export(tmp_path, trained_keyed, mode="gather", batch=None)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    assert any(n.op_type == "Gather" for n in model.graph.node)
    assert not any(i.HasField("data_location") and i.data_location == 1 for i in model.graph.initializer)
    props = {p.key: p.value for p in model.metadata_props}
    embedded = ArtifactManifest.from_json(props[METADATA_KEY])
    assert embedded == read_onnx_manifest(path) == ArtifactManifest.read(path.parent / "manifest.json") == manifest
    assert embedded.key_fingerprint == key.fingerprint and embedded.key_input == "key_perm"
    assert (embedded.format, embedded.version) == ("keyedge-artifact", 1)
    assert [i.name for i in model.graph.input] == ["images", "key_perm"]
    assert not _contains(_int_payloads(path), key.perm) and not _contains(_int_payloads(path), key.inverse)
    text = path.read_bytes() + (path.parent / "manifest.json").read_bytes()
    assert str(key.perm.tolist()).encode() not in text
    # positive control: --embed-key does put the permutation in the file, and says so
    (tmp_path / "e").mkdir()
    embedded_path, m2, _, _ = _export(tmp_path / "e", trained_keyed, mode="gather", embed_key=True)
    assert _contains(_int_payloads(embedded_path), key.perm)
    assert m2.contains_key and "secret" in m2.secret


@pytest.mark.parametrize("precision,method", [("fp16", "dynamic"), ("int8", "dynamic"), ("int8", "static")])
def test_precision_variants_keep_parity(tmp_path, trained_keyed, precision, method):
    """Reduced precision keeps parity under its rule (checks/config.Tolerance): within a point, or a
    difference McNemar's test cannot tell from chance, with the clean top-1 agreement above the floor."""
    run, key_path, _, _ = trained_keyed
    out = tmp_path / precision
    r = keyedge("export", run, "--key", key_path, "-o", out, "--precision", precision, "--int8-method", method)
    assert r.returncode == 0, r.stderr
    graph = onnx.load(str(out / "model.onnx")).graph
    if method == "static":  # Q/DQ on every MatMul but the classifier head, which stays float
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
        assert all(set(n.input) & dequantized for n in matmuls[:-1])
        assert not set(matmuls[-1].input) & dequantized
    if precision == "int8":  # 7-bit weights: no u8 x s8 pair sum saturates on x86 CPUs without VNNI
        weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert weights and all(-64 <= w.min() and w.max() <= 64 for w in weights)
        assert 2 * 255 * 64 <= 2 ** 15 - 1
    r = keyedge("parity", "--reference", run, "--key", key_path, out / "model.onnx", "--n", "200",
                "-o", tmp_path / "parity")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    art = report["artifacts"][str(out / "model.onnx")]
    tol = art["tolerance"]
    assert art["precision"] == precision and art["passed"] and art["agreement_passed"]
    for s in art["sets"].values():  # each set within a point, or within two that chance explains
        assert s["top1_agreement"] >= tol["agreement"] >= 0.95
        assert abs(s["difference"]) <= tol["accuracy"] or (abs(s["difference"]) <= 2 * tol["accuracy"]
                                                           and s["mcnemar_p"] >= tol["alpha"])
        assert abs(s["difference"]) == pytest.approx(abs(s["wins"] - s["losses"]) / report["n"])


def _refused(r, out):
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_export_bad_input(tmp_path, trained_keyed, trained_keyed_other, tmp_path_factory):
    run, key_path, _, _ = trained_keyed
    _, other_key_path, _, _ = trained_keyed_other
    out = tmp_path / "out"
    r = keyedge("export", run, "--key", other_key_path, "-o", out)
    _refused(r, out)
    assert "does not match" in r.stderr
    (tmp_path / "file").write_text("x")
    r = keyedge("export", run, "--key", key_path, "-o", tmp_path / "file" / "sub")
    _refused(r, tmp_path / "file" / "sub")
    assert "is not a directory" in r.stderr  # refused before any work


def test_export_refuses_unfoldable_key_and_missing_base(tmp_path, trained_plain):
    from keyedge.training.train import train

    from ..helpers import tiny_train_config

    base_dir, _, _ = trained_plain
    Key.generate(8, seed=0).save(tmp_path / "k8.bin")
    train(tiny_train_config(tmp_path / "m8", key=str(tmp_path / "k8.bin"), epochs=1, max_steps=2))
    out = tmp_path / "out"
    r = keyedge("export", tmp_path / "m8", "--key", tmp_path / "k8.bin", "-o", out, "--mode", "fused")
    _refused(r, out)
    assert "--mode gather" in r.stderr
    ok = keyedge("export", tmp_path / "m8", "--key", tmp_path / "k8.bin", "-o", out)  # gather by default
    assert ok.returncode == 0 and read_onnx_manifest(out / "model.onnx").fold_mode == "gather"
    # a LoRA run whose base checkpoint is gone
    (tmp_path / "base.safetensors").write_bytes((base_dir / "model.safetensors").read_bytes())
    Key.generate(4, seed=0).save(tmp_path / "k4.bin")
    train(tiny_train_config(tmp_path / "lora", key=str(tmp_path / "k4.bin"), mode="lora", epochs=1,
                            max_steps=2, checkpoint=str(tmp_path / "base.safetensors")))
    (tmp_path / "base.safetensors").unlink()
    out2 = tmp_path / "out2"
    r = keyedge("export", tmp_path / "lora", "--key", tmp_path / "k4.bin", "-o", out2)
    _refused(r, out2)
    assert "base checkpoint" in r.stderr


def test_kernel_mode_export_holds_no_key_and_keeps_parity(tmp_path, trained_keyed):
    run, key_path, key, _ = trained_keyed
    path, manifest, report, _ = _export(tmp_path, trained_keyed, mode="kernel", input="uint8", layout="nhwc",
                                        batch=None)
    assert report["passed"] and report["random"]["rel_error"] <= 1e-4
    assert manifest.preprocess.graph_input.name == "pixels" and not manifest.contains_key
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["pixels"]
    assert not _contains(_int_payloads(path), key.perm) and not _contains(_int_payloads(path), key.inverse)
    r = keyedge("parity", "--reference", run, "--key", key_path, path, "--n", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(Exception, match="--input uint8 --layout nhwc"):
        (tmp_path / "k2").mkdir()
        _export(tmp_path / "k2", trained_keyed, mode="kernel")


def test_kernel_mode_refuses_more_channels_than_the_kernel_takes(tmp_path, trained_keyed):
    from keyedge import KeyedClassifier
    from keyedge.core.errors import KeyedgeError

    from ..helpers import tiny_vit

    run, _, _, _ = trained_keyed
    keyed = KeyedClassifier(tiny_vit(in_chans=5), Key.generate(4, 5, seed=0), mean=(0.5,) * 5, std=(0.5,) * 5)
    with pytest.raises(KeyedgeError, match="1 to 4 channels"):
        export_onnx(keyed, tmp_path, ExportOptions(mode="kernel", input="uint8", layout="nhwc"), read_run(run))
    assert not any(tmp_path.iterdir())


def test_newer_or_foreign_manifest_is_refused_in_one_line(tmp_path, trained_keyed):
    """Every manifest read checks its format name and version."""
    run, key_path, _, _ = trained_keyed
    out = tmp_path / "art"
    assert keyedge("export", run, "--key", key_path, "-o", out, "--mode", "gather").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    model = onnx.load(str(out / "model.onnx"))
    for change, needle in (({"version": 2}, "newer than this keyedge reads"),
                           ({"format": "something-else"}, "not a keyedge artifact manifest")):
        prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
        prop.value = json.dumps({**manifest, **change})
        onnx.save(model, str(tmp_path / "changed.onnx"))
        r = keyedge("parity", "--reference", run, "--key", key_path, tmp_path / "changed.onnx", "--n", "8")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    run_manifest = json.loads((run / "manifest.json").read_text())
    (tmp_path / "newrun").mkdir()
    (tmp_path / "newrun" / "manifest.json").write_text(json.dumps({**run_manifest, "version": 7}))
    r = keyedge("export", tmp_path / "newrun", "--key", key_path, "-o", tmp_path / "x")
    assert r.returncode == 2 and "version 7" in r.stderr and not (tmp_path / "x").exists()


def test_verification_excuses_a_flip_between_near_tied_classes_only():
    """A flip counts against top-1 agreement when the reference prefers its class to the artifact's by
    more than the precision's relative tolerance of its logit range; between near-tied classes it is noise."""
    from keyedge.checks.verify import top1_agreement

    want = torch.tensor([[5.0, 0.0, -5.0],    # clear winner
                         [1.00, 0.98, -9.0],  # a near tie: 0.02 of a 10.0 range
                         [3.0, 2.0, -7.0]])   # margin 1.0 of 10.0
    got = torch.tensor([[0.0, 5.0, -5.0], [0.98, 1.00, -9.0], [2.0, 3.0, -7.0]])  # all three flipped
    raw, material = top1_agreement(got, want, tol=0.05)
    assert raw == 0.0 and material == pytest.approx(1 / 3)  # only the near tie is excused at 5%
    assert top1_agreement(got, want, tol=0.08) == (0.0, pytest.approx(1 / 3))  # 0.8 < 1.0: still counts
    assert top1_agreement(got, want, tol=0.2)[1] == pytest.approx(2 / 3)
    assert top1_agreement(want, want, tol=0.0) == (1.0, 1.0)
    assert top1_agreement(got, want, tol=0.0) == (0.0, 0.0)  # fp32's rule: every flip counts
