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
    Key.generate(4).save(path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="exists"):
        Key.generate(4).save(path)
    assert path.read_bytes() == before
    Key.generate(4).save(path, overwrite=True)
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


def test_small_key_spaces_are_refused_unless_asked():
    for m, c in ((2, 3), (3, 3), (4, 1), (5, 1)):  # 12!, 27!, 16!, 25! < 2^128
        with pytest.raises(KeyFileError, match="below 2\\^128"):
            Key.generate(m, c)
    assert Key.generate(4, 3).small is False and Key.generate(6, 1).small is False  # 48!, 36! > 2^128
    small = Key.generate(2, 3, allow_small=True)
    assert small.small and Key.from_bytes(small.to_bytes()).small


def test_two_keys_of_one_permutation_have_unrelated_fingerprints():
    a = Key.generate(4)
    b = Key(a.perm, 4, 3, key_id=os.urandom(16))
    assert np.array_equal(a.perm, b.perm) and a.fingerprint != b.fingerprint and a != b
    assert a.fingerprint not in a.to_bytes().hex()


def test_version_1_files_are_read_with_a_warning(tmp_path, capsys):
    import hashlib
    import struct

    key = Key.generate(4, seed=2)
    body = struct.pack("<8sHHHHI", b"KEYEDGE\x00", 1, 1, 4, 3, 48) + key.perm.astype("<u4").tobytes()
    path = tmp_path / "v1.bin"
    path.write_bytes(body + hashlib.sha256(body).digest())
    old = Key.load(path)
    assert old.version == 1 and old.key_id is None and np.array_equal(old.perm, key.perm)
    # the version 1 fingerprint: a hash of (M, C, permutation), as manifests made then recorded it
    want = hashlib.sha256(b"keyedge-key-fingerprint-v1\x00" + struct.pack("<HH", 4, 3)
                          + key.perm.astype("<u4").tobytes()).hexdigest()[:32]
    assert old.fingerprint == want
    err = capsys.readouterr().err
    assert "version 1 key file" in err and "re-key" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(KeyFileError, match="no key ID"):
        old.to_bytes()


def test_unknown_flags_refused():
    import hashlib

    data = bytearray(Key.generate(4).to_bytes()[:-32])
    data[10] = 0x80
    with pytest.raises(KeyFileError, match="unknown flags"):
        Key.from_bytes(bytes(data) + hashlib.sha256(data).digest())


def test_a_changed_permutation_changes_the_fingerprint():
    """The key ID makes the fingerprint unsearchable; M, C and the permutation bind it to the key, so a
    key file whose permutation was swapped (and its SHA-256 recomputed) no longer matches its models."""
    import hashlib

    key = Key.generate(4)
    data = bytearray(key.to_bytes())
    data[36:36 + 4 * 48] = np.arange(48, dtype="<u4").tobytes()  # the identity, same key ID
    data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    forged = Key.from_bytes(bytes(data))
    assert forged.key_id == key.key_id and forged.fingerprint != key.fingerprint and forged != key


def test_small_keys_are_read_with_a_warning(tmp_path, capsys):
    Key.generate(2, 3, allow_small=True).save(tmp_path / "small.bin")
    Key.load(tmp_path / "small.bin")
    err = capsys.readouterr().err
    assert "below 2^128" in err and len(err.strip().splitlines()) == 1
