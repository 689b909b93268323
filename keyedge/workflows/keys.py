"""Secret keys and device identities: ``keyedge keygen``, ``key inspect``, ``key export-perm`` and
``device keygen``. A key is never printed: only its fingerprint."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes
from ..core.keys import Key
from ..core.progress import Echo, echo
from ..runtime.bundle import DeviceKey


def keygen(out: Path, block_size: int, channels: int = 3, *, force: bool = False, insecure_seed: int | None = None,
           echo: Echo = echo) -> Key:
    """A new key from the OS CSPRNG (``insecure_seed``: from a seeded generator, for tests), written 0600."""
    key = Key.generate(block_size, channels, seed=insecure_seed)
    key.save(out, overwrite=force)
    echo(f"wrote {out} (block size {block_size}, {channels} channels, "
         f"fingerprint {key.fingerprint}{', INSECURE seeded key' if key.insecure else ''})")
    echo("keep this file secret: anyone holding it can craft white-box attacks on its models")
    return key


def inspect(path: Path, *, echo: Echo = echo) -> Key:
    """A key's block size, channels, key-space size and fingerprint; never the permutation."""
    key = Key.load(path)
    for name, value in (("file", path), ("block size", key.block_size), ("channels", key.channels),
                        ("values", f"{key.size} per block"),
                        ("key space", f"10^{key.log10_keyspace:.1f} keys  ((M*M*C)!)"),
                        ("insecure", "yes (seeded, for tests only)" if key.insecure else "no"),
                        ("fingerprint", key.fingerprint)):
        echo(f"{name + ':':<14}{value}")
    return key


def export_perm(path: Path, out: Path, *, force: bool = False, echo: Echo = echo) -> Path:
    """The permutation as raw little-endian int64 (a gather engine's key input for trtexec); secret, 0600."""
    key = Key.load(path)
    atomic_write_bytes(out, key.perm.astype("<i8").tobytes(), mode=0o600, overwrite=force)
    echo(f"wrote {out} (key {key.fingerprint}); it is the key itself: keep it secret")
    return out


def device_keygen(out: Path, pub: Path | None = None, *, force: bool = False, echo: Echo = echo) -> DeviceKey:
    """A device key pair: the private key 0600 at ``out``, the public one beside it (``.pub``)."""
    pub = pub or out.with_suffix(".pub")
    if not force and (out.exists() or pub.exists()):
        raise KeyedgeError(f"{out if out.exists() else pub} exists; pass --force to overwrite it")
    key = DeviceKey.generate()
    atomic_write_bytes(pub, key.public.to_bytes(), mode=0o644, overwrite=force)
    key.save(out, overwrite=force)
    echo(f"wrote {out} (private, 0600) and {pub} (public); device fingerprint {key.fingerprint}")
    echo("keep the private key off the disk where the device allows: see the README's sealing section")
    return key
