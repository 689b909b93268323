"""The fleet database's tables (SQLAlchemy Core). Nothing secret goes in: fingerprints, hashes, public keys
and paths, never a key. The schema's versions are Alembic migrations (``migrations/versions``); this
module is the current shape, which the migrations must produce."""

from __future__ import annotations

from sqlalchemy import (JSON, Column, DateTime, ForeignKey, Integer, LargeBinary, MetaData, String, Table, Text,
                        UniqueConstraint)

metadata = MetaData()

# one row: the fleet's base, model, recipe and publisher
fleet = Table(
    "fleet", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False),
    Column("base_path", Text, nullable=False),
    Column("base_sha256", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("model_kwargs", JSON, nullable=False),
    Column("data", Text, nullable=False),
    Column("block_size", Integer, nullable=False),
    Column("channels", Integer, nullable=False),
    Column("mode", String(8), nullable=False),
    Column("recipe", JSON, nullable=False),
    Column("publisher_fingerprint", String(32), nullable=False),
    Column("publisher_public", LargeBinary(32), nullable=False),
    Column("vault_path", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

devices = Table(
    "devices", metadata,
    Column("id", Integer, primary_key=True),
    Column("device_id", String(128), nullable=False, unique=True),
    Column("target", String(64), nullable=False),
    Column("device_public", LargeBinary(32), nullable=False),
    Column("device_fingerprint", String(32), nullable=False),
    Column("key_fingerprint", String(32), nullable=False),  # the current key's (the key is in the vault)
    Column("state", String(16), nullable=False),  # enrolled / training / trained / released / failed / revoked
    Column("enrolled_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # training work, claimed by a lease (revision 0002)
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires", DateTime(timezone=True), nullable=True),
    Column("run_dir", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    UniqueConstraint("device_fingerprint", name="uq_devices_device_fingerprint"),
)

# what happened, in order, never overwritten
events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True),
    Column("device", Integer, ForeignKey("devices.id", ondelete="RESTRICT"), nullable=True),
    Column("kind", String(32), nullable=False),
    Column("detail", JSON, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
)

STATES = ("enrolled", "training", "trained", "released", "failed", "revoked")
