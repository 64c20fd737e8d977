"""Silos' declared label counts: the federation's sum is the logit adjustment's reference prior.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("silos", recreate="never") as batch:  # see 0002: never rebuild on SQLite
        batch.add_column(sa.Column("label_counts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("silos", recreate="never") as batch:
        batch.drop_column("label_counts")
