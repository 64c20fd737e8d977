"""Silo identity lifecycle: token rotation with a grace period, expiry and revocation.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)  # store.UtcDateTime
COLUMNS = ("previous_token_hash", "previous_valid_until", "token_expires_at", "token_revoked_at")


def upgrade() -> None:
    with op.batch_alter_table("silos", recreate="never") as batch:  # see 0002: never rebuild on SQLite
        batch.add_column(sa.Column("previous_token_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("previous_valid_until", Timestamp, nullable=True))
        batch.add_column(sa.Column("token_expires_at", Timestamp, nullable=True))
        batch.add_column(sa.Column("token_revoked_at", Timestamp, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("silos", recreate="never") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
