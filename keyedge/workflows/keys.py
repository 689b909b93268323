"""Secret keys and device identities: ``keyedge keygen``, ``key inspect``, ``key export-perm`` and
``device keygen``. A key is never printed: only its fingerprint."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, check_output_file
from ..core.keys import Key
from ..core.keyset import SET_MAGIC, KeySet
from ..core.progress import Echo, echo
from ..runtime.bundle import DeviceKey, PublisherKey


def keygen(out: Path, block_size: int, channels: int = 3, *, force: bool = False, insecure_seed: int | None = None,
           insecure_small_key: bool = False, members: int | None = None, echo: Echo = echo) -> Key | KeySet:
    """A new key from the OS CSPRNG (``insecure_seed``: from a seeded generator, for tests), written 0600;
    with ``members``, a key set of that many independent keys (a random ensemble's).
    A block size whose key space is below 2**128 is refused unless ``insecure_small_key``."""
    key: Key | KeySet
    if members is None:
        key = Key.generate(block_size, channels, seed=insecure_seed, allow_small=insecure_small_key)
    else:
        key = KeySet.generate(members, block_size, channels, seed=insecure_seed, allow_small=insecure_small_key)
    key.save(out, overwrite=force)
    first = key if isinstance(key, Key) else key[0]
    flags = [f for f, on in (("INSECURE seeded key", first.insecure), ("INSECURE small key space", first.small))
             if on]
    what = "" if isinstance(key, Key) else f"{len(key)} keys, member fingerprints {', '.join(key.fingerprints)}; "
    echo(f"wrote {out} ({what}block size {block_size}, {channels} channels, "
         f"fingerprint {key.fingerprint}{''.join(', ' + f for f in flags)})")
    echo("keep this file secret: anyone holding it can craft white-box attacks on its models")
    return key


def inspect(path: Path, *, echo: Echo = echo) -> Key | KeySet:
    """A key's block size, channels, key-space size and fingerprint; never the permutation. A key set: its
    fingerprint and members, then its first member as a key."""
    if path.is_file():
        with path.open("rb") as fh:
            is_set = fh.read(len(SET_MAGIC)) == SET_MAGIC
        if is_set:
            keys = KeySet.load(path)
            _describe(path, keys[0], keys.fingerprint, echo)
            echo(f"{'members:':<14}{len(keys)} keys (a random ensemble's), one shape")
            for i, fp in enumerate(keys.fingerprints):
                echo(f"{f'member {i}:':<14}{fp}")
            return keys
    key = Key.load(path)
    _describe(path, key, key.fingerprint, echo)
    return key


def _describe(path: Path, key: Key, fingerprint: str, echo: Echo) -> None:
    for name, value in (("file", path), ("block size", key.block_size), ("channels", key.channels),
                        ("values", f"{key.size} per block"),
                        ("key space", f"10^{key.log10_keyspace:.1f} keys  ((M*M*C)!)"
                                      + ("  BELOW 2^128: a search finds it" if key.small else "")),
                        ("insecure", "yes (seeded, for tests only)" if key.insecure else
                         "yes (small key space, --insecure-small-key)" if key.small else "no"),
                        ("format", f"version {key.version}" + ("  (re-key: its fingerprint is a hash of the "
                                                               "permutation)" if key.version == 1 else "")),
                        ("fingerprint", fingerprint)):
        echo(f"{name + ':':<14}{value}")


def export_perm(path: Path, out: Path, *, force: bool = False, echo: Echo = echo) -> Path:
    """The permutation as raw little-endian int64 (a gather engine's key input for trtexec); secret, 0600."""
    key = Key.load(path)
    atomic_write_bytes(out, key.perm.astype("<i8").tobytes(), mode=0o600, overwrite=force)
    echo(f"wrote {out} (key {key.fingerprint}); it is the key itself: keep it secret")
    return out


def _key_pair(kind: type, out: Path, pub: Path | None, force: bool):
    check_output_file(out, force)  # a directory, '.', '/': refused before a name is derived from it
    pub = pub or out.with_suffix(".pub")
    if pub == out:
        raise KeyedgeError(f"the private and the public key cannot both be {out}")
    for path in (out, pub):
        check_output_file(path, force)
    key = kind.generate()
    atomic_write_bytes(pub, key.public.to_bytes(), mode=0o644, overwrite=force)
    key.save(out, overwrite=force)
    return key, pub


def device_keygen(out: Path, pub: Path | None = None, *, force: bool = False, echo: Echo = echo) -> DeviceKey:
    """A device key pair: the private key 0600 at ``out``, the public one beside it (``.pub``)."""
    key, pub = _key_pair(DeviceKey, out, pub, force)
    echo(f"wrote {out} (private, 0600) and {pub} (public); device fingerprint {key.fingerprint}")
    echo("keep the private key off the disk where the device allows: see the README's sealing section")
    return key


def publisher_keygen(out: Path, pub: Path | None = None, *, force: bool = False, echo: Echo = echo) -> PublisherKey:
    """The publisher's Ed25519 key pair: the signing key 0600 at ``out``, the public one beside it (``.pub``),
    which devices pin (``--trust``, or compiled into a C++ package)."""
    key, pub = _key_pair(PublisherKey, out, pub, force)
    echo(f"wrote {out} (signing key, 0600) and {pub} (public: pin it on devices); publisher fingerprint "
         f"{key.fingerprint}")
    echo("anyone holding the signing key can publish models your devices accept: keep it offline")
    return key
