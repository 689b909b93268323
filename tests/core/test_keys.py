import math
import os
import stat

import numpy as np
import pytest

from keyedge import Key
from keyedge.core.errors import KeyFileError

from ..helpers import malformed_key_files


def test_roundtrip_and_mode(tmp_path):
    key = Key.generate(4)
    path = key.save(tmp_path / "k.bin")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Key.load(path)
    assert np.array_equal(loaded.perm, key.perm)
    assert (loaded.block_size, loaded.channels, loaded.insecure) == (4, 3, False)
    assert loaded.fingerprint == key.fingerprint and len(key.fingerprint) == 32


def test_generated_keys_are_permutations_and_differ():
    a, b = Key.generate(8), Key.generate(8)
    assert sorted(a.perm.tolist()) == list(range(192))
    assert not np.array_equal(a.perm, b.perm)
    assert a.fingerprint != b.fingerprint


def test_seeded_key_is_marked_insecure_and_reproducible():
    a, b = Key.generate(4, seed=3), Key.generate(4, seed=3)
    assert a.insecure and np.array_equal(a.perm, b.perm)


def test_no_overwrite_without_force(tmp_path):
    path = tmp_path / "k.bin"
    Key.generate(2).save(path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="exists"):
        Key.generate(2).save(path)
    assert path.read_bytes() == before
    Key.generate(2).save(path, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["k.bin"]  # no temp files left


def test_repr_hides_permutation():
    key = Key.generate(2, channels=1, seed=0)
    text = repr(key) + str(key)
    assert key.fingerprint in text
    assert str(key.perm.tolist()) not in text and "perm" not in text


def test_keyspace():
    assert Key.generate(4).log10_keyspace == pytest.approx(math.log10(math.factorial(48)))


@pytest.mark.parametrize("case", sorted(malformed_key_files()))
def test_malformed_files_refused(tmp_path, case):
    data, message = malformed_key_files()[case]
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with pytest.raises(KeyFileError, match=message):
        Key.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        Key.load(tmp_path / "nope.bin")
