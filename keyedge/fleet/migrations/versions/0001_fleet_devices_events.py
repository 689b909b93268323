"""The fleet, its devices and the event history.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("base_path", sa.Text, nullable=False),
        sa.Column("base_sha256", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_kwargs", sa.JSON, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("block_size", sa.Integer, nullable=False),
        sa.Column("channels", sa.Integer, nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("recipe", sa.JSON, nullable=False),
        sa.Column("publisher_fingerprint", sa.String(32), nullable=False),
        sa.Column("publisher_public", sa.LargeBinary(32), nullable=False),
        sa.Column("vault_path", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False, unique=True),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("device_public", sa.LargeBinary(32), nullable=False),
        sa.Column("device_fingerprint", sa.String(32), nullable=False),
        sa.Column("key_fingerprint", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("device_fingerprint", name="uq_devices_device_fingerprint"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("device", sa.Integer, sa.ForeignKey("devices.id", ondelete="RESTRICT"), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("devices")
    op.drop_table("fleet")
