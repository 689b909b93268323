"""What ``fleet init`` pinned, read back by every other command: the fleet's row, its base checkpoint
(refused when its SHA-256 changed), its vault (opened in memory with the master key), and what a device's
key is: one key, or, in a fleet of random ensembles (``fleet init --ensemble N``), a key set of N."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.keys import Key
from ..core.keyset import KeySet, key_or_set_from_bytes
from ..core.models import file_sha256
from . import db
from .schema import devices, fleet
from .vault import Vault


def fleet_row(conn, database: str, *, lock: bool = False):
    """The fleet's one row (locked for the transaction with ``lock``: commands that rewrite the vault)."""
    query = fleet.select().with_for_update() if lock else fleet.select()
    row = conn.execute(query).first()
    if row is None:
        raise KeyedgeError(f"{db.shown(database)} holds no fleet (keyedge fleet init)")
    return row


def known_devices(conn, only: list[str] | None) -> None:
    """Refuse device ids the fleet does not have."""
    if only:
        known = {r.device_id for r in conn.execute(devices.select().where(devices.c.device_id.in_(only)))}
        if set(only) - known:
            raise KeyedgeError(f"unknown device {sorted(set(only) - known)[0]}")


def check_base(spec) -> Path:
    """The fleet's base checkpoint, as pinned at ``fleet init``."""
    path = Path(spec.base_path)
    if not path.is_file():
        raise KeyedgeError(f"base checkpoint {path} is gone (pinned at fleet init)")
    if file_sha256(path) != spec.base_sha256:
        raise KeyedgeError(f"base checkpoint {path} changed since fleet init (sha256 mismatch)")
    return path


def model_patch(spec) -> int:
    """The fleet model's patch size (the model built on the meta device)."""
    from ..core.models import patch_size_of

    return patch_size_of(spec.model, **spec.model_kwargs)


def ensemble_size(spec) -> int | None:
    """N where every device serves a random ensemble of N keyed members, else None."""
    return (spec.recipe or {}).get("ensemble")


def new_device_key(spec) -> Key | KeySet:
    """A device's fresh key (a key set of N in an ensemble fleet), from the OS CSPRNG."""
    n = ensemble_size(spec)
    if n is None:
        return Key.generate(spec.block_size, spec.channels)
    return KeySet.generate(n, spec.block_size, spec.channels)


def open_vault(spec, master: bytearray) -> Vault:
    return Vault.open(Path(spec.vault_path), master)


class VaultKeys:
    """A command's view of the vault: reopened when a claimed device's key is not the one the open copy
    holds (the device was rotated or enrolled since the command started)."""

    def __init__(self, spec, master: bytearray) -> None:
        self.spec, self.master = spec, master
        self.vault = open_vault(spec, master)

    def key(self, row) -> Key | KeySet:
        """The key (key set) of the claimed device ``row`` (a mapping with ``device_id`` and
        ``key_fingerprint``)."""
        for fresh in (False, True):
            if fresh:
                self.vault = open_vault(self.spec, self.master)
            raw = self.vault.devices.get(row["device_id"])
            if raw is not None:
                key = key_or_set_from_bytes(raw, source=f"the vault's key of {row['device_id']}")
                if key.fingerprint == row["key_fingerprint"]:
                    return key
                key.wipe()
        raise KeyedgeError(f"the vault holds no key {row['key_fingerprint']} for device {row['device_id']}")
