"""Alembic's entry point: run the revisions on the connection `migrations.upgrade` passes in.

The caller owns the transaction (and the lock around it), so nothing is committed here.
"""

from alembic import context
from sqlalchemy import Connection

from fedsilo.aggregator.store import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through fedsilo.aggregator.migrations.upgrade(engine)")
# render_as_batch: drafted ALTERs use batch mode, which SQLite needs.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
