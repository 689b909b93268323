"""Releases: every release of a device, its artifacts' hashes, parity and audit verdicts and bundle.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("device", sa.Integer, sa.ForeignKey("devices.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("key_fingerprint", sa.String(32), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("fold_mode", sa.String(16), nullable=True),
        sa.Column("precision", sa.String(8), nullable=True),
        sa.Column("run_dir", sa.Text, nullable=False),
        sa.Column("release_dir", sa.Text, nullable=False),
        sa.Column("hashes", sa.JSON, nullable=False),
        sa.Column("parity", sa.JSON, nullable=True),
        sa.Column("audit", sa.JSON, nullable=True),
        sa.Column("clean", sa.Float, nullable=True),
        sa.Column("transfer", sa.Float, nullable=True),
        sa.Column("bundle_path", sa.Text, nullable=True),
        sa.Column("bundle_sha256", sa.String(64), nullable=True),
        sa.Column("bundle_bytes", sa.Integer, nullable=True),
        sa.Column("publisher_fingerprint", sa.String(32), nullable=True),
        sa.Column("worker", sa.String(128), nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("device", "number", name="uq_releases_device_number"),
    )


def downgrade() -> None:
    op.drop_table("releases")
