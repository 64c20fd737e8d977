"""Alembic revisions against the ORM models, on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, create_engine, insert, inspect, text
from sqlalchemy.orm import Session, sessionmaker
from tests.aggregator.conftest import PG_ADMIN_URL, postgres_database

from fedsilo.aggregator.migrations import BASELINE, config, current, upgrade
from fedsilo.aggregator.store import (
    Base,
    EvaluationRow,
    JobRow,
    LeaseRow,
    RoundRow,
    SiloRow,
    UpdateRow,
    VersionRow,
    aware,
    make_engine,
    make_sessions,
)
from fedsilo.spec import document_digest

HEAD = "0005"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An empty store; a PostgreSQL one is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('store') / 'fedsilo.db'}"
        return
    database_url = postgres_database()
    yield database_url
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{database_url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def differences(engine: Engine, metadata: MetaData = Base.metadata) -> list[object]:
    """What `alembic revision --autogenerate` would write to turn the database into `metadata`."""
    with engine.connect() as conn:
        # compare_type: a changed column type counts too. The custom `UtcDateTime`
        # (a DateTime with timezone=True) compares equal to the reflected
        # TIMESTAMP WITH TIME ZONE / DATETIME, so no type differences need ignoring.
        return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata))


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return current(conn)


def bind(sessions: sessionmaker[Session]) -> Engine:
    engine = sessions.kw["bind"]
    assert isinstance(engine, Engine)
    return engine


def test_fresh_store_reaches_head_and_matches_the_models(url: str) -> None:
    engine = bind(make_sessions(url))
    try:
        assert revision(engine) == HEAD
        schema = inspect(engine)
        for table in Base.metadata.sorted_tables:
            columns = {c["name"]: c for c in schema.get_columns(table.name)}
            assert set(columns) == set(table.columns.keys()), table.name
            for column in table.columns:
                assert columns[column.name]["nullable"] == column.nullable, f"{table.name}.{column.name}"
            assert set(schema.get_pk_constraint(table.name)["constrained_columns"]) == {
                c.name for c in table.primary_key
            }
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_the_comparison_catches_a_model_without_a_revision(url: str) -> None:
    engine = bind(make_sessions(url))
    try:
        changed = MetaData()
        for table in Base.metadata.sorted_tables:
            table.to_metadata(changed)
        changed.tables["jobs"].append_column(Column("priority", Integer, nullable=True))
        (diff,) = differences(engine, changed)
        assert diff[0] == "add_column" and diff[3].name == "priority"  # type: ignore[index]
    finally:
        engine.dispose()


def make_pre_alembic_store(url: str) -> None:
    """A store as the release before migrations left it: the 0001 tables, some rows, no `alembic_version`."""
    engine = make_engine(url)
    upgrade(engine, BASELINE)
    old = MetaData()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        old.reflect(conn)
        assert "leases" not in old.tables and "pending_document" not in old.tables["jobs"].c
        rows = {
            "jobs": {"name": "j", "document": {"rounds": 3}, "phase": "Running", "message": "", "rounds": 3}
            | {"current_round": 1, "version": 0, "server_state_sha": None, "created_at": T0, "started_at": T0},
            "silos": {"job": "j", "name": "s1", "role": "trainer", "token_hash": "ab" * 32, "state": "joined"}
            | {"joined_at": T0, "rounds_completed": 1, "n_train_examples": 10, "n_eval_examples": 2},
            "rounds": {"job": "j", "number": 1, "state": "open", "participants": ["s1"], "opened_at": T0}
            | {"deadline": T0, "metrics": {}},
            "updates": {"job": "j", "round": 1, "silo": "s1", "sha256": "cd" * 32, "n_examples": 10}
            | {"n_bytes": 123, "received_at": T0},
            "versions": {"job": "j", "version": 0, "sha256": "ef" * 32, "n_bytes": 456, "created_at": T0},
            "evaluations": {"job": "j", "version": 0, "silo": "s1", "split": "eval", "loss": 1.5}
            | {"n_examples": 2, "extra": {"perplexity": 4.5}, "at": T0},
        }
        for name, row in rows.items():
            conn.execute(insert(old.tables[name]).values(row))
    engine.dispose()


def test_a_store_from_before_migrations_is_upgraded_in_place(url: str) -> None:
    make_pre_alembic_store(url)
    sessions = make_sessions(url)
    try:
        assert revision(bind(sessions)) == HEAD
        assert differences(bind(sessions)) == []
        with sessions() as session:
            job = session.get_one(JobRow, "j")
            assert (job.document, job.phase, job.current_round, aware(job.started_at)) == (
                {"rounds": 3},
                "Running",
                1,
                T0,
            )
            assert job.pending_document is None
            assert job.document_sha == document_digest({"rounds": 3})  # 0005 named the old document's revision
            silo = session.get_one(SiloRow, ("j", "s1"))
            assert (silo.state, silo.n_train_examples, silo.revoked_at) == ("joined", 10, None)
            assert session.get_one(RoundRow, ("j", 1)).participants == ["s1"]
            update = session.get_one(UpdateRow, ("j", 1, "s1"))
            assert (update.n_bytes, update.base_version) == (123, None)
            assert session.get_one(VersionRow, ("j", 0)).n_bytes == 456
            assert session.get_one(EvaluationRow, ("j", 0, "s1", "eval")).extra == {"perplexity": 4.5}
            session.add(LeaseRow(job="not-yet-a-job", holder="engine-a", epoch=1, expires_at=T0, renewed_at=T0))
            job.pending_document = {"rounds": 5}
            job.document = {"rounds": 4}
            session.commit()
        with sessions() as session:
            job = session.get_one(JobRow, "j")
            assert job.pending_document == {"rounds": 5}
            assert job.document_sha == document_digest({"rounds": 4})  # every assignment names its revision
    finally:
        bind(sessions).dispose()


def test_downgrading_to_the_baseline_keeps_every_row(url: str) -> None:
    """SQLite must ALTER in place: rebuilding `jobs` would cascade-delete its children."""
    make_pre_alembic_store(url)
    engine = bind(make_sessions(url))
    try:
        with engine.begin() as conn:
            cfg = config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, BASELINE)
        with engine.connect() as conn:
            assert current(conn) == BASELINE
            counts = [
                conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in ("silos", "rounds", "evaluations")
            ]
        assert counts == [1, 1, 1]
        upgrade(engine)
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_make_sessions_twice_is_a_no_op(url: str, caplog: pytest.LogCaptureFixture) -> None:
    bind(make_sessions(url)).dispose()
    with caplog.at_level("INFO", logger="fedsilo.aggregator"):
        engine = bind(make_sessions(url))
    try:
        assert revision(engine) == HEAD
        assert differences(engine) == []
        assert f"store schema at revision {HEAD}" in caplog.text
    finally:
        engine.dispose()


def test_processes_starting_together_migrate_once(url: str) -> None:
    """Four threads race `make_sessions` on one empty store; each must come up with the full schema.

    Without the lock in `migrations._lock` this fails every time: on SQLite with "table
    already exists", on PostgreSQL by deadlocking.
    """
    start = threading.Barrier(4)
    errors: list[BaseException] = []
    engines: list[Engine] = []

    def boot() -> None:
        start.wait()
        try:
            engines.append(bind(make_sessions(url)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=boot, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert not any(thread.is_alive() for thread in threads), "deadlocked"
        assert errors == []
        assert len(engines) == 4
        assert revision(engines[0]) == HEAD
        assert differences(engines[0]) == []
    finally:
        for engine in engines:
            engine.dispose()
