"""The engine's foundation: the commit boundary and the in-memory state derived from rows.

Every change runs in `_write(job)`: lock the job's lease (see `lease.py`), change rows,
commit, and only then touch memory, files and metrics (`Tx.on_commit`). In-memory state
(`Live`: parsed spec, strategy, global adapter, accumulator) is derived from committed
rows and dropped whenever a transaction that changed it rolls back, so a retry after any
failure sees exactly what was committed and an accepted update counts exactly once.
The engine's parts build on this class: `ticking.Ticking` (rounds close in the background,
never inside an uploader's request), `secure_stages.SecureStages` (the secure-aggregation
stages) and `rounds.Engine` (jobs, silos, adapters, updates, evaluations, reads).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fedsilo import strategies
from fedsilo.adapters import from_bytes, schema_of
from fedsilo.aggregator import lease, specs, transitions
from fedsilo.aggregator.blobs import Blobs
from fedsilo.aggregator.errors import Fenced, NotFound
from fedsilo.aggregator.lifecycle import (
    Live,
    MaskedSum,
    Phase,
    Tx,
    fold,
    secure_weight,
)
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.store import (
    JobRow,
    RoundRow,
    SiloRow,
    UpdateRow,
    VersionRow,
    utcnow,
)
from fedsilo.aggregator.uploads import accepted_delta

log = logging.getLogger("fedsilo.aggregator")


class Move(NamedTuple):
    """A silo's state change that a poll implies: written from `was` to `to` (see `write_polls`)."""

    was: str
    to: str


SEEN_EVERY = timedelta(seconds=15)  # polls are remembered, and written as `last_seen` in one batch this often


class EngineCore:
    """The commit boundary, leases and `Live` state (see the module docstring)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        blobs: Blobs,
        metrics: Metrics,
        clock: Callable[[], datetime] = utcnow,
        *,
        holder: str | None = None,
        lease_seconds: float = 10.0,
        ingest_slots: int = 2,
    ) -> None:
        self.sessions, self.blobs, self.metrics, self.clock = sessions, blobs, metrics, clock
        self.holder = holder or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self.lease_seconds = lease_seconds
        self.changed = 0  # bumped after every commit
        self.on_changed: Callable[[str], None] | None = None  # told after each commit on a job (notify.py)
        self.wakeup = threading.Event()  # set when a round is ready to aggregate
        self._lock = threading.RLock()
        self._live: dict[str, Live] = {}
        self._epochs: dict[str, int] = {}  # leases this process holds
        self._fenced_logged: set[str] = set()
        self._slots = threading.BoundedSemaphore(ingest_slots)  # uploads parsed or being folded at once
        self._seen: dict[str, dict[str, datetime]] = {}  # job -> silo -> last poll not yet written
        self._moves: dict[str, dict[str, Move]] = {}  # job -> silo -> state change a poll saw, not yet written
        self._seen_lock = threading.Lock()
        self._seen_written = self.clock()

    # ---- the commit boundary ----------------------------------------------------------

    @contextmanager
    def _write(self, job: str) -> Iterator[Tx]:
        """A fenced write transaction on `job`; memory, files and metrics follow its commit."""
        with self._lock:
            tx = Tx(s=None, now=self.clock())  # type: ignore[arg-type]
            try:
                with self.sessions.begin() as s:
                    tx.s = s
                    self._fence(tx, job)
                    yield tx
            except BaseException:
                if tx.dirty:
                    self._live.pop(job, None)
                raise
            self.changed += 1
            for fn in tx.after:
                try:
                    fn()
                except Exception:  # a side effect after commit must not turn success into failure
                    log.exception("job %s: post-commit step failed", job)
            if self.on_changed is not None:
                self.on_changed(job)

    def _fence(self, tx: Tx, job: str) -> None:
        try:
            claim = lease.fence(tx.s, job, self.holder, self._epochs.get(job), tx.now, self.lease_seconds)
        except Fenced:
            if self._epochs.pop(job, None) is not None:
                log.error("job %s: lease lost to another aggregator; this one stops writing", job)
            self._live.pop(job, None)
            raise
        if not claim.taken:
            return
        self._live.pop(job, None)  # another writer may have changed everything
        tx.dirty = True
        tx.on_commit(lambda: self._epochs.__setitem__(job, claim.epoch))
        log.info("job %s: lease taken by %s (epoch %d)", job, self.holder, claim.epoch)
        if claim.downtime is not None and claim.downtime > timedelta(seconds=2 * self.lease_seconds):
            transitions.give_back(tx, job, claim.downtime)

    def renew_leases(self) -> None:
        """Keep the leases this process holds; forget (and drop the state of) those it lost."""
        for job in list(self._epochs):
            try:
                with self._write(job):
                    pass
            except Fenced:
                pass  # `_fence` forgot the lease and the job's state

    def release_leases(self) -> None:
        """Graceful shutdown: let a successor take over without waiting for expiry."""
        self.write_polls(force=True)
        with self._lock, self.sessions.begin() as s:
            for job in self._epochs:
                lease.release(s, job, self.holder, self.clock())
            self._epochs.clear()

    def remember_poll(self, job: str, silo: str, move: Move | None) -> None:
        """A poll, for `write_polls`'s batch: when it came, and the silo's state change it implies."""
        with self._seen_lock:
            self._seen.setdefault(job, {})[silo] = self.clock()
            if move is not None:
                self._moves.setdefault(job, {})[silo] = move

    def pending_move(self, job: str, silo: str) -> Move | None:
        """Forget and return the state change a poll of `silo` left unwritten (a writer of its state
        supersedes it; the batch would not overwrite that write anyway, see `write_polls`)."""
        with self._seen_lock:
            return self._moves.get(job, {}).pop(silo, None)

    def write_polls(self, force: bool = False) -> None:
        """Write what polls left to write, one transaction per job however many silos polled:
        the silos' state changes (`training`, `evaluating`, `done`) on every call (each tick),
        `last_seen` every `SEEN_EVERY`. A silo's answer never waits for either: a write per
        poll was most of an idle poll's cost, and a fenced transaction per silo when a round
        opened or the job ended kept the 1,000th silo waiting seconds for its answer."""
        now = self.clock()
        with self._seen_lock:
            moves, self._moves = self._moves, {}
            seen: dict[str, dict[str, datetime]] = {}
            if force or now - self._seen_written >= SEEN_EVERY:
                seen, self._seen, self._seen_written = self._seen, {}, now
        table: Table = SiloRow.__table__  # type: ignore[assignment]  # Core: executemany, no ORM rows
        silo = (table.c.job == bindparam("j")) & (table.c.name == bindparam("n"))
        # only from the state the poll read: an upload or an evaluation written since then wins
        move = update(table).where(silo & (table.c.state == bindparam("was"))).values(state=bindparam("to"))
        touch = update(table).where(silo).values(last_seen=bindparam("at"))
        for job in moves.keys() | seen.keys():
            try:
                with self._write(job) as tx:  # at most two statements, each executed for every silo
                    if moves.get(job):
                        rows = [{"j": job, "n": n, "was": m.was, "to": m.to} for n, m in moves[job].items()]
                        tx.s.execute(move, rows)
                    if seen.get(job):
                        tx.s.execute(touch, [{"j": job, "n": n, "at": at} for n, at in seen[job].items()])
            except Fenced:
                pass  # this process no longer serves the job: its holder sees the silos' next polls

    def job_names(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(JobRow.name)))

    # ---- in-memory state, derived from rows ---------------------------------------------

    def _job(self, s: Session, name: str, lock: bool = False) -> JobRow:
        row = s.get(JobRow, name, with_for_update=lock)
        if row is None:
            raise NotFound(f"no job named {name!r}")
        return row

    def _live_for(self, s: Session, row: JobRow, with_acc: bool = False) -> Live:
        live = self._live.get(row.name)
        if live is None or live.revision != row.document_sha:
            job = specs.job_of(row)
            live = Live(
                row.document_sha, job, strategies.create(job.spec.aggregation.strategy, job.spec.aggregation.params)
            )
            self._live[row.name] = live
        if row.version >= 0 and (live.version != row.version or live.schema is None):
            v, v0 = s.get(VersionRow, (row.name, row.version)), s.get(VersionRow, (row.name, 0))
            assert v is not None and v0 is not None
            state = from_bytes(self.blobs.get(v.sha256))
            schema = live.schema or schema_of(state if v0 is v else from_bytes(self.blobs.get(v0.sha256)))
            live.global_state, live.schema, live.version, live.acc = state, schema, row.version, None  # all or nothing
        if with_acc and row.phase == Phase.RUNNING:
            n = s.scalar(select(func.count()).where(UpdateRow.job == row.name, UpdateRow.round == row.current_round))
            if live.acc is None or live.acc_round != row.current_round or live.acc.count != n:
                live.acc, live.acc_round = self._rebuild_accumulator(s, row, live), row.current_round
        return live

    def _rebuild_accumulator(self, s: Session, row: JobRow, live: Live) -> Any:
        """Fold exactly the committed updates of the current round, in a fixed order."""
        assert live.global_state is not None
        rnd = s.get(RoundRow, (row.name, row.current_round))
        query = select(UpdateRow).where(UpdateRow.job == row.name, UpdateRow.round == row.current_round)
        if rnd is not None and rnd.secagg is not None:
            masked = MaskedSum()
            for u in s.scalars(query.order_by(UpdateRow.silo)):
                vector = np.frombuffer(self.blobs.get(u.sha256), dtype="<u8").astype(np.uint64)
                masked.add(vector, secure_weight(u.n_examples, live.job))
            return masked
        acc = live.strategy.accumulator(live.global_state)
        schema, hooks = live.schema or schema_of(live.global_state), live.strategy.client_config()
        for u in s.scalars(query.order_by(UpdateRow.silo)):
            staleness = row.current_round - 1 - (u.base_version if u.base_version is not None else row.version)
            path, codec = self.blobs.path(u.sha256), live.job.spec.codec_for(u.silo)
            fold(live, acc, accepted_delta(path, codec, schema, hooks).to_fold(path), u.n_examples, staleness)
        return acc
