"""What ``fleet init`` pinned, read back by every other command: the fleet's row, its base checkpoint
(refused when its SHA-256 changed), and its vault (opened in memory with the master key)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.keys import Key
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


def open_vault(spec, master: bytearray) -> Vault:
    return Vault.open(Path(spec.vault_path), master)


class VaultKeys:
    """A command's view of the vault: reopened when a claimed device's key is not the one the open copy
    holds (the device was rotated or enrolled since the command started)."""

    def __init__(self, spec, master: bytearray) -> None:
        self.spec, self.master = spec, master
        self.vault = open_vault(spec, master)

    def key(self, row) -> Key:
        """The key of the claimed device ``row`` (a mapping with ``device_id`` and ``key_fingerprint``)."""
        for fresh in (False, True):
            if fresh:
                self.vault = open_vault(self.spec, self.master)
            raw = self.vault.devices.get(row["device_id"])
            if raw is not None:
                key = Key.from_bytes(raw, source=f"the vault's key of {row['device_id']}")
                if key.fingerprint == row["key_fingerprint"]:
                    return key
                key.wipe()
        raise KeyedgeError(f"the vault holds no key {row['key_fingerprint']} for device {row['device_id']}")
