import os
import stat

import numpy as np
import pytest

from keyedge import Key
from keyedge.core.errors import KeyFileError
from keyedge.core.keyset import KeySet


def test_roundtrip_one_fingerprint_per_member_and_mode(tmp_path):
    keys = KeySet.generate(4, block_size=4)
    path = keys.save(tmp_path / "keys.bin")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = KeySet.load(path)
    assert len(loaded) == 4 and loaded.fingerprints == keys.fingerprints and len(set(keys.fingerprints)) == 4
    assert all(np.array_equal(a.perm, b.perm) for a, b in zip(loaded, keys))
    assert loaded.fingerprint == keys.fingerprint and loaded.fingerprint not in keys.fingerprints
    assert (loaded.block_size, loaded.channels) == (4, 3)
    assert str(keys.members[0].perm.tolist()) not in repr(loaded)


def test_the_set_fingerprint_binds_every_member_and_their_order():
    a, b, c = (Key.generate(4) for _ in range(3))
    assert KeySet((a, b)).fingerprint != KeySet((b, a)).fingerprint != KeySet((a, c)).fingerprint


def test_bad_sets_are_refused():
    a = Key.generate(4)
    with pytest.raises(KeyFileError, match="at least 2"):
        KeySet((a,))
    with pytest.raises(KeyFileError, match="twice"):
        KeySet((a, a))
    with pytest.raises(KeyFileError, match="block size"):
        KeySet((a, Key.generate(8)))
    with pytest.raises(KeyFileError, match="at least 2"):
        KeySet.generate(1, block_size=4)


def test_a_key_set_is_not_a_key_and_a_key_is_not_a_key_set(tmp_path):
    KeySet.generate(2, block_size=4).save(tmp_path / "keys.bin")
    Key.generate(4).save(tmp_path / "key.bin")
    with pytest.raises(KeyFileError, match="is a key set of 2 keys"):
        Key.load(tmp_path / "keys.bin")
    with pytest.raises(KeyFileError, match="one key, not a key set"):
        KeySet.load(tmp_path / "key.bin")


@pytest.mark.parametrize("damage", ["truncate", "flip_member", "flip_header", "append", "empty"])
def test_damaged_files_are_refused(tmp_path, damage):
    path = KeySet.generate(3, block_size=4).save(tmp_path / "keys.bin")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-40]
    elif damage == "flip_member":
        data[60] ^= 1
    elif damage == "flip_header":
        data[10] ^= 1
    elif damage == "append":
        data += b"x"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(KeyFileError):
        KeySet.load(path)


def test_seeded_sets_are_reproducible_and_insecure():
    a, b = KeySet.generate(3, block_size=4, seed=7), KeySet.generate(3, block_size=4, seed=7)
    assert a.fingerprints == b.fingerprints and all(k.insecure for k in a)


def test_key_inspect_shows_a_set_s_members_and_never_a_permutation(tmp_path):
    from ..helpers import keyedge

    keys = KeySet.generate(3, block_size=4)
    keys.save(tmp_path / "keys.bin")
    r = keyedge("key", "inspect", tmp_path / "keys.bin")
    assert r.returncode == 0, r.stderr
    assert keys.fingerprint in r.stdout and all(fp in r.stdout for fp in keys.fingerprints)
    assert "3 keys" in r.stdout and not any(str(k.perm.tolist()) in r.stdout for k in keys)
