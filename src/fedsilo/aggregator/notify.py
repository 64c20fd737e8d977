"""Wake long-polls when a job changes, with no timer and no database read per waiter.

A waiting request sleeps on its job's `asyncio.Event`. What sets it:
- a commit in this process: the engine calls `Changes.committed(job)` from its worker thread;
  one refresh per job (coalesced) reads the job's fingerprint and, only if it moved, wakes the
  job's waiters, so the thousand uploads of a round do not wake a thousand idle silos each;
- a commit by another aggregator process on the same store (a takeover, a fenced second
  replica serving reads): one watcher per process reads every job's fingerprint each
  `WATCH_SECONDS` while anyone waits.

The fingerprint is what can turn a waiting silo's `wait` into work: the job's phase, version,
round and planned rounds, and the current round's state and secure-aggregation stage. A spec
change outside these (a silo's rank before the first adapter) reaches a waiter at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable, Iterator

from sqlalchemy import and_, select
from sqlalchemy.orm import Session, sessionmaker

from fedsilo.aggregator.store import JobRow, RoundRow

log = logging.getLogger("fedsilo.aggregator")
WATCH_SECONDS = 1.0  # how soon a change committed by another aggregator process reaches waiters


def fingerprints(s: Session, job: str | None = None) -> dict[str, Hashable]:
    """Per job (one job, or all): the committed state a waiting silo's task depends on. One query."""
    query = select(
        JobRow.name, JobRow.phase, JobRow.version, JobRow.current_round, JobRow.rounds, RoundRow.state, RoundRow.secagg
    ).outerjoin(RoundRow, and_(RoundRow.job == JobRow.name, RoundRow.number == JobRow.current_round))
    if job is not None:
        query = query.where(JobRow.name == job)
    keys: dict[str, Hashable] = {}
    for name, phase, version, current, rounds, state, secagg in s.execute(query):
        keys[name] = (phase, version, current, rounds, state, (secagg or {}).get("stage"))
    return keys


class Changes:
    """Per-job wake-ups for long-polls; see the module docstring."""

    def __init__(self, sessions: sessionmaker[Session], on_waiting: Callable[[str, int], None] | None = None) -> None:
        self.sessions = sessions
        self.on_waiting = on_waiting  # (job, +1 / -1): the waiters gauge
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keys: dict[str, Hashable] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._dirty: set[str] = set()
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.waiting = 0

    def read(self, job: str | None = None) -> dict[str, Hashable]:
        """The fingerprints of one job or all, as committed now."""
        with self.sessions() as s:
            return fingerprints(s, job)

    # ---- sources of change ----------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on commits wake waiters on `loop` (the server's event loop)."""
        self._loop = loop

    def committed(self, job: str) -> None:
        """A transaction on `job` committed (any thread): recheck its fingerprint, soon, once."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: shutting down, nobody waits
            loop.call_soon_threadsafe(self._poke, job)

    def _poke(self, job: str) -> None:
        self._dirty.add(job)
        if job not in self._refreshing:
            self._refreshing.add(job)
            task = asyncio.get_running_loop().create_task(self._refresh(job))
            self._tasks.add(task)  # keep a reference until it ends
            task.add_done_callback(self._tasks.discard)

    async def _refresh(self, job: str) -> None:
        try:
            while job in self._dirty:  # commits during the read: one more read covers them all
                self._dirty.discard(job)
                self._update(await asyncio.to_thread(self.read, job), {job})
        except Exception:  # the store is unreachable: the watcher or the waiters' deadlines cover it
            log.warning("job %s: change fingerprint unreadable", job, exc_info=True)
        finally:
            self._refreshing.discard(job)

    async def watch(self, seconds: float = WATCH_SECONDS) -> None:
        """The one watcher of this process: changes committed by other aggregator processes."""
        while True:
            await asyncio.sleep(seconds)
            if not self.waiting:
                continue
            try:
                keys = await asyncio.to_thread(self.read, None)
            except Exception:
                log.warning("change fingerprints unreadable", exc_info=True)
                continue
            self._update(keys, set(keys) | set(self._keys))

    def _update(self, keys: dict[str, Hashable], jobs: set[str]) -> None:
        for job in jobs:
            key = keys.get(job)
            if self._keys.get(job) != key or job not in self._keys:
                self._keys[job] = key
                event = self._events.pop(job, None)
                if event is not None:
                    event.set()

    # ---- the waiters' side ----------------------------------------------------------------

    def ticket(self, job: str) -> asyncio.Event:
        """The event the next change of `job` sets. Take it *before* reading: no change is missed."""
        event = self._events.get(job)
        if event is None:
            event = self._events[job] = asyncio.Event()
        return event

    @contextlib.contextmanager
    def waiter(self, job: str) -> Iterator[None]:
        """Count one waiting request of `job` (for the watcher and the gauge)."""
        self.waiting += 1
        if self.on_waiting:
            self.on_waiting(job, 1)
        try:
            yield
        finally:
            self.waiting -= 1
            if self.on_waiting:
                self.on_waiting(job, -1)
