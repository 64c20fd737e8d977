"""Persistent state of the aggregator (SQLAlchemy 2): SQLite by default, PostgreSQL by URL.

Everything needed to resume after a restart lives here or in the content-addressed
blob folder (`blobs.py`): jobs, silos, rounds, accepted updates, adapter versions,
evaluations and the leases that make one engine own a job. Tokens are stored only as
SHA-256 hashes. The models below are the schema's source of truth; the database gets
it through the Alembic revisions in `aggregator/migrations`, applied by `make_sessions`
(a test fails when models and revisions disagree).
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker, validates

from fedsilo.aggregator.migrations import upgrade
from fedsilo.spec import document_digest


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(DateTime):
    """Timezone-aware datetimes on every backend (SQLite forgets the zone)."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)


def aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON, datetime: UtcDateTime}


class JobRow(Base):
    """A job. Its document (JSON; a 1,000-silo spec is ~100 KB) loads only when read: hot paths
    find the parsed spec by `document_sha`, the document's revision (see `specs.py`)."""

    __tablename__ = "jobs"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(deferred=True)
    document_sha: Mapped[str] = mapped_column(String(64), server_default="")  # set with `document`, always
    pending_document: Mapped[dict[str, Any] | None] = mapped_column(
        default=None, deferred=True
    )  # applied at the next round
    phase: Mapped[str] = mapped_column(String(16), default="Pending")
    message: Mapped[str] = mapped_column(String(1000), default="")
    rounds: Mapped[int]
    current_round: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=-1)
    server_state_sha: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    @validates("document")
    def _revise(self, _key: str, document: dict[str, Any]) -> dict[str, Any]:
        """Every assignment of the document names its revision: no path can change one without the other."""
        self.document_sha = document_digest(document)
        return document


class SiloRow(Base):
    __tablename__ = "silos"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    joined_at: Mapped[datetime | None] = mapped_column(default=None)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    rounds_completed: Mapped[int] = mapped_column(default=0)
    n_train_examples: Mapped[int] = mapped_column(default=0)
    n_eval_examples: Mapped[int] = mapped_column(default=0)
    throughput: Mapped[float | None] = mapped_column(Float, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)  # removed from the job
    # identity lifecycle (see `identity.py`): the token before the last rotation stays valid
    # until `previous_valid_until`; a token may expire; a revoked token is refused at once
    previous_token_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    previous_valid_until: Mapped[datetime | None] = mapped_column(default=None)
    token_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    token_revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class RoundRow(Base):
    __tablename__ = "rounds"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="open")
    participants: Mapped[list[str]]
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline: Mapped[datetime]
    closed_at: Mapped[datetime | None] = mapped_column(default=None)
    aggregation_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    secagg: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # secure rounds: stage, threshold, U1..U3


class UpdateRow(Base):
    __tablename__ = "updates"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(primary_key=True)
    silo: Mapped[str] = mapped_column(String(63), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    n_examples: Mapped[int]
    n_bytes: Mapped[int]
    train_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    base_version: Mapped[int | None] = mapped_column(default=None)  # global version trained from (async mode)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class VersionRow(Base):
    __tablename__ = "versions"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    n_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvaluationRow(Base):
    __tablename__ = "evaluations"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    silo: Mapped[str] = mapped_column(String(63), primary_key=True)
    split: Mapped[str] = mapped_column(String(16), primary_key=True)
    loss: Mapped[float] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    n_examples: Mapped[int]
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class SecAggKeyRow(Base):
    """A silo's public keys for one secure round (relayed to the round's other silos)."""

    __tablename__ = "secagg_keys"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(primary_key=True)
    silo: Mapped[str] = mapped_column(String(63), primary_key=True)
    public: Mapped[dict[str, Any]]


class SecAggShareRow(Base):
    """One encrypted share bundle from `sender` to `recipient`: the aggregator cannot open it."""

    __tablename__ = "secagg_shares"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(primary_key=True)
    sender: Mapped[str] = mapped_column(String(63), primary_key=True)
    recipient: Mapped[str] = mapped_column(String(63), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)


class SecAggRevealRow(Base):
    """The shares one surviving silo revealed to unmask a round: per sender, of b or of s_sk."""

    __tablename__ = "secagg_reveals"

    job: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(primary_key=True)
    silo: Mapped[str] = mapped_column(String(63), primary_key=True)
    shares: Mapped[dict[str, Any]]


class LeaseRow(Base):
    """Which engine process owns a job, until when; `epoch` grows with every new holder.

    No foreign key to `jobs`: a lease may be taken before its job row exists.
    """

    __tablename__ = "leases"

    job: Mapped[str] = mapped_column(String(63), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    epoch: Mapped[int]
    expires_at: Mapped[datetime]
    renewed_at: Mapped[datetime]


SQLITE_TIMEOUT = 30.0  # seconds a connection waits for another's lock


def _write_ahead_log(cursor: sqlite3.Cursor, seconds: float = SQLITE_TIMEOUT) -> None:
    """Put the file in WAL mode. Connections racing to switch a new file (processes starting
    together) get "database is locked" at once, not after the busy timeout: retry until it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_engine(url: str) -> Engine:
    """Engine for `url`; SQLite gets WAL and foreign keys so it behaves like a real server."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_TIMEOUT})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            _write_ahead_log(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_sessions(url: str) -> sessionmaker[Session]:
    """Sessions on the store at `url`, after migrating its schema to the newest revision."""
    engine = make_engine(url)
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)
