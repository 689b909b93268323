"""Bad input to train / eval: one line on stderr, exit 2, nothing half-written."""

import json

from keyedge import Key

from .helpers import keyedge

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4", "--depth", "1",
             "--embed-dim", "24", "--heads", "2", "--num-classes", "10"]


def _assert_refused(r, out, needle):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyedge: error:") and needle in lines[0], r.stderr
    assert not out.exists()


def test_train_missing_data_path(tmp_path):
    out = tmp_path / "run"
    r = keyedge("train", "-o", out, "--data", tmp_path / "nope", *TINY_ARGS)
    _assert_refused(r, out, "does not exist")


def test_train_empty_imagefolder(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    out = tmp_path / "run"
    r = keyedge("train", "-o", out, "--data", tmp_path / "data", *TINY_ARGS)
    _assert_refused(r, out, "class folder")


def test_train_bad_key_and_block_size(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "bad.bin").write_bytes(b"junk")
    _assert_refused(keyedge("train", "-o", out, "--key", tmp_path / "bad.bin", *TINY_ARGS), out, "truncated")
    Key.generate(32).save(tmp_path / "k32.bin")
    _assert_refused(keyedge("train", "-o", out, "--key", tmp_path / "k32.bin", *TINY_ARGS), out, "does not fit")


def test_train_lora_without_base(tmp_path):
    out = tmp_path / "run"
    _assert_refused(keyedge("train", "-o", out, "--mode", "lora", *TINY_ARGS), out, "--checkpoint")


def test_eval_refuses_mismatched_key_and_missing_run(tmp_path, trained_plain):
    run, _, _ = trained_plain
    Key.generate(4, seed=0).save(tmp_path / "k.bin")
    out = tmp_path / "report"
    _assert_refused(keyedge("eval", run, "--key", tmp_path / "k.bin", "-o", out), out, "plain")
    _assert_refused(keyedge("eval", tmp_path / "nope", "-o", out), out, "does not exist")


def test_eval_end_to_end_and_the_output_rule(tmp_path, trained_plain):
    """eval writes its report; a non-empty -o needs --force, and --force keeps the user's files."""
    run, _, _ = trained_plain
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["eval", run, "-o", out, "--base", run, "--n", "16", "--steps", "1", "--autoattack", "off",
            "--whitebox-steps", "2", "--queries", "10", "--query-n", "4"]
    r = keyedge(*args)
    assert r.returncode == 2 and "--force" in r.stderr
    assert {p.name for p in out.iterdir()} == {"notes.txt"}
    r = keyedge(*args, "--force")
    assert r.returncode == 0, r.stderr
    assert {"report.md", "results.json", "robust_vs_eps.png", "robust_vs_queries.png", "notes.txt"} <= \
        {p.name for p in out.iterdir()}
    assert (out / "notes.txt").read_text() == "mine"
    results = json.loads((out / "results.json").read_text())
    assert results["models"][run.name]["clean"] > 0.5
