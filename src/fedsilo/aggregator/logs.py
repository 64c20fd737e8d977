"""The aggregator's log: logfmt lines, one per event a person or a log query looks for.

- `setup` routes every logger (fedsilo's, uvicorn's, warnings) through one logfmt handler.
- `RoundWatch` runs in the ticker and logs what the committed state shows: a job's phase
  changes and each round opened and closed, with its participants, updates and timings.
  It reads what every replica can read, so it also logs rounds another replica drove.
- Uploads, joins, metrics and refusals are logged by the routes in `app.py`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from fedsilo.api import models as m
from fedsilo.logfmt import Logfmt, event

log = logging.getLogger("fedsilo.aggregator")
NOISY = ("httpx", "httpcore", "multipart", "sqlalchemy.engine", "alembic.runtime.migration")


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def setup(level: str) -> None:
    """One logfmt handler on stderr for the whole process, uvicorn's loggers included."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Logfmt("aggregator"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)


class Reads(Protocol):
    """What the watch needs of the engine (committed reads only)."""

    def job_names(self) -> list[str]: ...

    def status(self, job: str) -> m.JobStatus: ...

    def history(self, job: str) -> list[m.RoundInfo]: ...


@dataclass
class _Seen:
    phase: str
    round: int
    version: int
    opened: int  # highest round number whose opening was logged
    closed: int  # highest round number whose closing was logged


@dataclass
class RoundWatch:
    """Call after each tick; reads status at most every `every` seconds and history only on a change."""

    engine: Reads
    every: float = 1.0
    seen: dict[str, _Seen] = field(default_factory=dict)
    last: float = 0.0
    started: datetime = field(default_factory=lambda: datetime.now(UTC))  # older events were logged before

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        try:
            for job in self.engine.job_names():
                self.watch(job)
        except Exception:  # only logging: never let it stop the ticker's next steps
            log.debug("round watch failed", exc_info=True)

    def watch(self, job: str) -> None:
        status = self.engine.status(job)
        old = self.seen.get(job)
        if old is not None and (old.phase, old.round, old.version) == (status.phase, status.round, status.version):
            return
        if old is None:  # first sight (start, restart, a new job): say where it stands, then what is new
            rounds = self.engine.history(job)
            before = [r for r in rounds if _utc(r.opened_at) < self.started]  # a restart does not replay these
            opened = max((r.round for r in before), default=0)
            closed = max((r.round for r in before if r.closed_at and _utc(r.closed_at) < self.started), default=0)
            old = self.seen[job] = _Seen(status.phase, status.round, status.version, opened, closed)
            event(log, "job", job=job, phase=status.phase, round=status.round, rounds=status.rounds,
                  version=status.version, silos=len(status.silos))
            for info in rounds:  # a job that opened and closed rounds between two looks still logs them
                self._round(job, info, old)
            if _utc(status.created_at) >= self.started and status.phase != "Pending":
                self._phase(job, status)  # its phase changed since it was created here
            return
        for info in self.engine.history(job):
            self._round(job, info, old)
        if status.phase != old.phase:
            self._phase(job, status)
        old.phase, old.round, old.version = status.phase, status.round, status.version

    def _phase(self, job: str, status: m.JobStatus) -> None:
        fields: dict[str, Any] = {"job": job, "phase": status.phase, "round": status.round, "version": status.version}
        if status.message:
            fields["message"] = status.message
        event(log, "job_phase", logging.WARNING if status.phase == "Failed" else logging.INFO, **fields)

    def _round(self, job: str, info: m.RoundInfo, seen: _Seen) -> None:
        if info.round > seen.opened:
            seen.opened = info.round
            event(log, "round_opened", job=job, round=info.round, participants=",".join(info.participants))
        if info.state == "closed" and info.round > seen.closed:
            seen.closed = info.round
            event(log, "round_closed", job=job, round=info.round, updates=info.updates, examples=info.examples,
                  bytes=info.bytes_received, seconds=info.duration_seconds,
                  aggregation_seconds=info.aggregation_seconds, max_train_seconds=info.max_train_seconds)
