"""The schema of release 0.1, which made its tables with `create_all` and no Alembic.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# `store.UtcDateTime` is a DateTime with timezone=True; spelled out so this file never changes.
Timestamp = sa.DateTime(timezone=True)


def _job() -> sa.Column[str]:
    return sa.Column("job", sa.String(63), sa.ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("message", sa.String(1000), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("server_state_sha", sa.String(64), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("started_at", Timestamp, nullable=True),
        sa.Column("finished_at", Timestamp, nullable=True),
    )
    op.create_table(
        "silos",
        _job(),
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("joined_at", Timestamp, nullable=True),
        sa.Column("last_seen", Timestamp, nullable=True),
        sa.Column("rounds_completed", sa.Integer(), nullable=False),
        sa.Column("n_train_examples", sa.Integer(), nullable=False),
        sa.Column("n_eval_examples", sa.Integer(), nullable=False),
        sa.Column("throughput", sa.Float(), nullable=True),
    )
    op.create_table(
        "rounds",
        _job(),
        sa.Column("number", sa.Integer(), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("participants", sa.JSON(), nullable=False),
        sa.Column("opened_at", Timestamp, nullable=False),
        sa.Column("deadline", Timestamp, nullable=False),
        sa.Column("closed_at", Timestamp, nullable=True),
        sa.Column("aggregation_seconds", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    op.create_table(
        "updates",
        _job(),
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("silo", sa.String(63), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("n_bytes", sa.Integer(), nullable=False),
        sa.Column("train_seconds", sa.Float(), nullable=True),
        sa.Column("received_at", Timestamp, nullable=False),
    )
    op.create_table(
        "versions",
        _job(),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("n_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_table(
        "evaluations",
        _job(),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("silo", sa.String(63), primary_key=True),
        sa.Column("split", sa.String(16), primary_key=True),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.Column("at", Timestamp, nullable=False),
    )


def downgrade() -> None:
    for table in ("evaluations", "versions", "updates", "rounds", "silos", "jobs"):
        op.drop_table(table)
