"""Secure aggregation: per-round key, share and reveal tables, and each round's SecAgg state.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _round_table(name: str, *columns: sa.Column) -> None:  # type: ignore[type-arg]
    op.create_table(
        name,
        sa.Column("job", sa.String(63), sa.ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("round", sa.Integer(), primary_key=True),
        *columns,
    )


def upgrade() -> None:
    _round_table(
        "secagg_keys",
        sa.Column("silo", sa.String(63), primary_key=True),
        sa.Column("public", sa.JSON(), nullable=False),
    )
    _round_table(
        "secagg_shares",
        sa.Column("sender", sa.String(63), primary_key=True),
        sa.Column("recipient", sa.String(63), primary_key=True),
        sa.Column("ciphertext", sa.Text(), nullable=False),
    )
    _round_table(
        "secagg_reveals",
        sa.Column("silo", sa.String(63), primary_key=True),
        sa.Column("shares", sa.JSON(), nullable=False),
    )
    with op.batch_alter_table("rounds", recreate="never") as batch:  # see 0002: never rebuild on SQLite
        batch.add_column(sa.Column("secagg", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds", recreate="never") as batch:
        batch.drop_column("secagg")
    for name in ("secagg_reveals", "secagg_shares", "secagg_keys"):
        op.drop_table(name)
