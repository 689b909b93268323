"""``keyedge seal`` and ``keyedge unseal``: a device's artifact sealed to that device, and the debugging
view of a bundle (plaintext on disk only when asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, check_new_dir, check_output_file, new_dir, write_new_file
from ..core.keys import Key
from ..core.progress import Echo, echo
from ..deploy.seal import seal_artifact
from ..runtime.bundle import SUFFIX, DeviceAccess, DevicePublicKey, PublisherKey, open_bundle


def read_signer(sign_with: Path | None, allow_unsigned: bool) -> PublisherKey | None:
    """The publisher's signing key (``-``: standard input); none only for a development bundle."""
    if sign_with is None and not allow_unsigned:
        raise KeyedgeError("a bundle is signed by its publisher: pass --sign-with PUBLISHER.key (keyedge publisher "
                           "keygen); --allow-unsigned makes one that devices refuse unless they allow it")
    return PublisherKey.load(sign_with) if sign_with is not None else None


def seal_to(artifact: Path, recipient: Path, out: Path, key_path: Path | Key | None = None, *,
            sign_with: Path | None = None, allow_unsigned: bool = False, force: bool = False,
            echo: Echo = echo) -> dict[str, Any]:
    """Seal an export or build directory to the device whose public key is ``recipient`` (with the key, for
    gather / kernel artifacts), signed with the publisher's key ``sign_with``."""
    if out.suffix != SUFFIX:
        raise KeyedgeError(f"a sealed bundle is named *{SUFFIX}, not {out.name}")
    check_output_file(out, force)
    device = DevicePublicKey.load(recipient)
    key = Key.given(key_path)
    signer = read_signer(sign_with, allow_unsigned)
    data, summary = seal_artifact(artifact, device, key, signer)
    atomic_write_bytes(out, data, mode=0o600, overwrite=force)
    signed = f"signed by publisher {signer.fingerprint}" if signer else "UNSIGNED (development only)"
    echo(f"wrote {out} ({len(data):,} bytes): {summary['model']} ({summary['fold_mode']}, "
         f"{summary['precision']}) sealed to device {summary['recipient']}, {signed}"
         + ("; it holds the key, opened only in memory on that device" if summary["holds_key"] else ""))
    return summary


def unseal(bundle: Path, out: Path | None = None, *, access: DeviceAccess = DeviceAccess(),
           write_plaintext: bool = False, echo: Echo = echo) -> dict[str, int]:
    """Check that a bundle's publisher is trusted and that it opens with the device's private key, and list
    its files; write them in plaintext to ``out`` (a new or empty directory, never overwritten) only with
    ``write_plaintext`` (debugging). Returns each file's size."""
    if write_plaintext and out is None:
        raise KeyedgeError("--write-plaintext needs --out DIR")
    if out is not None and not write_plaintext:
        raise KeyedgeError("writing a bundle's plaintext to disk defeats sealing: pass --write-plaintext to do it")
    if out is not None:
        check_new_dir(out)
    opener = access.opener(echo)
    opened = open_bundle(bundle, opener)
    try:
        sizes = {name: size for name, (_, size) in opened.plain.spans.items()}
        publisher = opened.plain.publisher
        echo(f"{bundle}: opens on this device ({opener.fingerprint}), "
             + (f"signed by trusted publisher {publisher}; " if publisher else "UNSIGNED (allowed for development); ")
             + ", ".join(f"{name} ({size:,} bytes)" for name, size in sizes.items()))
        if out is not None:
            with new_dir(out) as stage:  # the index's names were checked as plain names when it was read
                for name in sizes:
                    with opened.plain.view(name) as data:
                        write_new_file(stage / name, data)
            echo(f"WARNING: wrote the plaintext to {out}: it is as secret as the device's key", err=True)
    finally:
        opened.wipe()
    return sizes
