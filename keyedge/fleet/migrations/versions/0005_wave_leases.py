"""A wave's own lease: the wave's worker renews it while the wave runs (between devices too), so that a
second ``release --wave`` takes over only a wave whose worker is gone.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("waves") as batch:
        batch.add_column(sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("waves") as batch:
        batch.drop_column("lease_expires")
