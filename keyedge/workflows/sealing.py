"""``keyedge seal`` and ``keyedge unseal``: a device's artifact sealed to that device, and the debugging
view of a bundle (plaintext on disk only when asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, check_output_dir, staged_dir
from ..core.keys import Key
from ..core.progress import Echo, echo
from ..deploy.seal import seal_artifact
from ..runtime.bundle import SUFFIX, DevicePublicKey, open_bundle, read_device_key


def seal_to(artifact: Path, recipient: Path, out: Path, key_path: Path | None = None, *, force: bool = False,
            echo: Echo = echo) -> dict[str, Any]:
    """Seal an export or build directory to the device whose public key is ``recipient`` (with the key, for
    gather / kernel artifacts)."""
    if out.suffix != SUFFIX:
        raise KeyedgeError(f"a sealed bundle is named *{SUFFIX}, not {out.name}")
    if out.exists() and not force:
        raise KeyedgeError(f"{out} exists; pass --force to overwrite it")
    data, summary = seal_artifact(artifact, DevicePublicKey.load(recipient), Key.load(key_path) if key_path else None)
    atomic_write_bytes(out, data, mode=0o600, overwrite=force)
    echo(f"wrote {out} ({len(data):,} bytes): {summary['model']} ({summary['fold_mode']}, "
         f"{summary['precision']}) sealed to device {summary['recipient']}"
         + ("; it holds the key, opened only in memory on that device" if summary["holds_key"] else ""))
    return summary


def unseal(bundle: Path, out: Path | None = None, *, device_key: Path | None = None,
           device_key_command: str | None = None, write_plaintext: bool = False, force: bool = False,
           echo: Echo = echo) -> dict[str, int]:
    """Check that a bundle opens with the device's private key (:func:`read_device_key`) and list its files;
    write them in plaintext to ``out`` only with ``write_plaintext`` (debugging). Returns each file's size."""
    if write_plaintext and out is None:
        raise KeyedgeError("--write-plaintext needs --out DIR")
    if out is not None and not write_plaintext:
        raise KeyedgeError("writing a bundle's plaintext to disk defeats sealing: pass --write-plaintext to do it")
    if out is not None:
        check_output_dir(out, force)
    opened = open_bundle(bundle, read_device_key(device_key, device_key_command))
    try:
        sizes = {name: size for name, (_, size) in opened.plain.spans.items()}
        echo(f"{bundle}: opens on this device; "
             + ", ".join(f"{name} ({size:,} bytes)" for name, size in sizes.items()))
        if out is not None:
            with staged_dir(out, force=force) as stage:
                for name in sizes:
                    atomic_write_bytes(stage / name, opened.plain.read(name), mode=0o600)
            echo(f"WARNING: wrote the plaintext to {out}: it is as secret as the device's key", err=True)
    finally:
        opened.wipe()
    return sizes
