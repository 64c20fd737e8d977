"""Exactly-once rounds: job leases, pending spec changes, silo revocation, async base versions.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)  # store.UtcDateTime


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("job", sa.String(63), primary_key=True),  # no foreign key: a lease may precede its job
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.Column("renewed_at", Timestamp, nullable=False),
    )
    # recreate="never": plain ALTER TABLE, also on SQLite (DROP COLUMN needs SQLite 3.35).
    # A rebuilt SQLite table is copied and dropped, and with foreign keys on, dropping
    # `jobs` deletes every silo, round, update, version and evaluation with it.
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.add_column(sa.Column("pending_document", sa.JSON(), nullable=True))
    with op.batch_alter_table("silos", recreate="never") as batch:
        batch.add_column(sa.Column("revoked_at", Timestamp, nullable=True))
    with op.batch_alter_table("updates", recreate="never") as batch:
        batch.add_column(sa.Column("base_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("updates", recreate="never") as batch:
        batch.drop_column("base_version")
    with op.batch_alter_table("silos", recreate="never") as batch:
        batch.drop_column("revoked_at")
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.drop_column("pending_document")
    op.drop_table("leases")
