"""Job documents get a revision, their SHA-256: hot paths find the parsed spec without decoding them.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from fedsilo.spec import document_digest

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", recreate="never") as batch:  # see 0002: never rebuild on SQLite
        batch.add_column(sa.Column("document_sha", sa.String(64), nullable=False, server_default=""))
    jobs = sa.table("jobs", sa.column("name", sa.String), sa.column("document", sa.JSON), sa.column("document_sha"))
    conn = op.get_bind()
    for name, document in conn.execute(sa.select(jobs.c.name, jobs.c.document)).all():
        conn.execute(jobs.update().where(jobs.c.name == name).values(document_sha=document_digest(document)))


def downgrade() -> None:
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.drop_column("document_sha")
