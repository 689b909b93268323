"""The fleet database's tables (SQLAlchemy Core). Nothing secret goes in: fingerprints, hashes, public keys
and paths, never a key. The schema's versions are Alembic migrations (``migrations/versions``); this
module is the current shape, which the migrations must produce."""

from __future__ import annotations

from sqlalchemy import (JSON, Column, DateTime, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table,
                        Text, UniqueConstraint)

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

# every release of a device, kept: what was built, its verdicts, its bundle (revision 0003). A row's state
# changes only from released to revoked (by rotation, which supersedes it, or revocation).
releases = Table(
    "releases", metadata,
    Column("id", Integer, primary_key=True),
    Column("device", Integer, ForeignKey("devices.id", ondelete="RESTRICT"), nullable=False),
    Column("number", Integer, nullable=False),  # 1, 2, ... per device
    Column("key_fingerprint", String(32), nullable=False),
    Column("target", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # released / failed / revoked
    Column("reason", Text, nullable=True),  # why it failed, or why it was revoked
    Column("fold_mode", String(16), nullable=True),
    Column("precision", String(8), nullable=True),
    Column("run_dir", Text, nullable=False),
    Column("release_dir", Text, nullable=False),
    Column("hashes", JSON, nullable=False),  # every artifact file's SHA-256, by its path in release_dir
    Column("parity", JSON, nullable=True),  # the parity verdict and accuracies (None: not reached)
    Column("audit", JSON, nullable=True),  # the audit gate's verdict (None: not reached)
    Column("clean", Float, nullable=True),  # the released artifact's clean accuracy (parity images)
    Column("transfer", Float, nullable=True),  # its accuracy on PGD l_inf transfer examples from the base
    Column("bundle_path", Text, nullable=True),
    Column("bundle_sha256", String(64), nullable=True),
    Column("bundle_bytes", Integer, nullable=True),
    Column("publisher_fingerprint", String(32), nullable=True),
    Column("worker", String(128), nullable=False),
    Column("seconds", Float, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("wave", Integer, ForeignKey("waves.id", name="fk_releases_wave", ondelete="RESTRICT"), nullable=True),
    UniqueConstraint("device", "number", name="uq_releases_device_number"),
)

# staged releases (revision 0004): a wave releases up to ``size`` devices and stops (``aborted``) once more
# than ``abort_above`` of its size has failed
waves = Table(
    "waves", metadata,
    Column("id", Integer, primary_key=True),
    Column("number", Integer, nullable=False, unique=True),
    Column("requested", String(16), nullable=False),  # "10%" or "25", as asked
    Column("size", Integer, nullable=False),
    Column("abort_above", Float, nullable=False),
    Column("state", String(16), nullable=False),  # running / completed / aborted / interrupted
    Column("released", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("worker", String(128), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # the wave's own lease, renewed by its worker while the wave runs (revision 0005)
    Column("lease_expires", DateTime(timezone=True), nullable=True),
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

STATES = ("enrolled", "training", "trained", "releasing", "released", "failed", "revoked")
