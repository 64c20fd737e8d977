"""Updates keep the silo's mean training loss of the round: aggregation.lossWeighting weighs by it.

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
    with op.batch_alter_table("updates", recreate="never") as batch:  # see 0002: never rebuild on SQLite
        batch.add_column(sa.Column("train_loss", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("updates", recreate="never") as batch:
        batch.drop_column("train_loss")
