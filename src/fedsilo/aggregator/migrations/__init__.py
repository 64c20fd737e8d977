"""Alembic revisions of the aggregator's store, applied in-process by `upgrade`.

There is no alembic.ini: `config()` builds Alembic's configuration in code, with this
folder as the script location, and `env.py` runs the revisions on the connection that
`upgrade` hands it. After changing a model in `aggregator/store.py`, draft the next
revision against a scratch store at the previous head, then read and tidy it:

    from alembic import command
    from fedsilo.aggregator.migrations import config, upgrade
    from fedsilo.aggregator.store import make_engine

    engine = make_engine("sqlite:///scratch.db")
    upgrade(engine)
    with engine.begin() as conn:
        cfg = config()
        cfg.attributes["connection"] = conn
        command.revision(cfg, "what changed", autogenerate=True, rev_id="0003")

SQLite runs with foreign keys on, so a batch operation that rebuilds `jobs` (copy, drop,
rename) deletes every child row with the dropped table: pass `recreate="never"` to
`op.batch_alter_table` where SQLite's ALTER TABLE suffices, and copy children otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect, text

BASELINE = "0001"
"""The schema of the last release, which made its tables without Alembic."""

LOCK_KEY = 0x66_6564_7369_6C6F
"""Key of the PostgreSQL advisory lock that lets one process at a time migrate ("fedsilo")."""

log = logging.getLogger("fedsilo.aggregator")


def config() -> Config:
    """Alembic's configuration, built in code: the revisions are this package's `versions/`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the store behind `engine` to `revision`, one process at a time, in one transaction.

    A store made before migrations existed (tables, but no `alembic_version`) is first
    stamped at the baseline revision, so it is upgraded in place.
    """
    with engine.connect() as conn:
        _lock(conn)
        cfg = config()
        cfg.attributes["connection"] = conn
        before = current(conn)
        if before is None and inspect(conn).has_table("jobs"):
            command.stamp(cfg, BASELINE)
            before = f"{BASELINE} (made before migrations)"
        command.upgrade(cfg, revision)
        after = current(conn)
        conn.commit()
    if before == after:
        log.info("store schema at revision %s, nothing to migrate", after)
    else:
        log.info("store schema migrated from %s to revision %s", before or "nothing (new store)", after)


def current(conn: Connection) -> str | None:
    """The revision the store is at; None for a store Alembic has never touched."""
    return MigrationContext.configure(conn).get_current_revision()


def _lock(conn: Connection) -> None:
    """Hold the store's schema for this transaction; a second migrating process waits here.

    PostgreSQL: a transaction-level advisory lock (`pg_advisory_xact_lock`), released by
    the commit or rollback, so it cannot outlive the upgrade on a pooled connection.
    SQLite: `BEGIN IMMEDIATE` takes the file's write lock up front (the busy timeout
    makes the other process wait), instead of at the first write, after the checks.
    Threads of one process serialise here too, which Alembic needs: its `context` and
    `op` are process-wide, so two threads inside `command.upgrade` at once would mix
    their connections up.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
