import os
import stat

import pytest

from keyedge import Key

from .helpers import keyedge, keyedge_process, malformed_key_files


def test_help_lists_commands_as_its_own_process():
    """Smoke test of the real entry point: `python -m keyedge.cli --help` lists every command."""
    r = keyedge_process("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("keygen", "key", "train", "eval", "demo", "export", "parity", "build", "bench", "bindings"):
        assert cmd in r.stdout


def test_keygen_and_inspect(tmp_path):
    path = tmp_path / "key.bin"
    r = keyedge("keygen", "-o", path, "--block-size", "4")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = Key.load(path)
    assert not key.insecure
    r = keyedge("key", "inspect", path)
    assert r.returncode == 0
    assert key.fingerprint in r.stdout and "block size:   4" in r.stdout and "10^61.1" in r.stdout
    # the permutation is never printed, in any form
    for text in (r.stdout + r.stderr, ):
        assert str(key.perm.tolist()) not in text
        assert " ".join(map(str, key.perm[:6])) not in text
        assert ",".join(map(str, key.perm[:6])) not in text


def test_keygen_refuses_overwrite_and_records_insecure_seed(tmp_path):
    path = tmp_path / "key.bin"
    assert keyedge("keygen", "-o", path, "-m", "2", "--insecure-seed", "7", "--insecure-small-key").returncode == 0
    assert Key.load(path).insecure
    before = path.read_bytes()
    r = keyedge("keygen", "-o", path, "-m", "4")
    assert r.returncode == 2 and "--force" in r.stderr and path.read_bytes() == before
    assert keyedge("keygen", "-o", path, "-m", "2", "--force", "--insecure-small-key").returncode == 0
    assert path.read_bytes() != before


def test_keygen_into_missing_directory(tmp_path):
    r = keyedge("keygen", "-o", tmp_path / "nope" / "key.bin", "-m", "4")
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.parametrize("case", sorted(malformed_key_files()) + ["missing"])
def test_inspect_refuses_malformed(tmp_path, case):
    path = tmp_path / "bad.bin"
    if case != "missing":
        path.write_bytes(malformed_key_files()[case][0])
    r = keyedge("key", "inspect", path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyedge: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_key_export_perm(tmp_path):
    import numpy as np

    key = Key.generate(4, seed=5)
    key.save(tmp_path / "k.bin")
    r = keyedge("key", "export-perm", tmp_path / "k.bin", "-o", tmp_path / "perm.bin")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "perm.bin").st_mode) == 0o600
    assert np.array_equal(np.fromfile(tmp_path / "perm.bin", dtype="<i8"), key.perm)
    again = keyedge("key", "export-perm", tmp_path / "k.bin", "-o", tmp_path / "perm.bin")
    assert again.returncode == 2 and "--force" in again.stderr
