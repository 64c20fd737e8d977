"""One writer per job: a lease row in the store, taken and renewed inside write transactions.

Every write transaction on a job first locks the job's lease row (`FOR UPDATE` on
PostgreSQL; SQLite serialises writers) and checks that this process still holds it with
the epoch it took. A process that lost its lease (paused longer than the lease, or a
second aggregator started on the same database) is fenced: its writes are refused before
they change anything, so two aggregators can never both fold updates into one job.
An expired lease is taken over with epoch + 1; the time since the previous holder last
renewed it is the aggregator's downtime, which the round engine gives back to the silos.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from fedsilo.aggregator.errors import Fenced
from fedsilo.aggregator.store import LeaseRow, aware


@dataclass(frozen=True)
class Claim:
    """The outcome of fencing one transaction."""

    epoch: int
    taken: bool  # this transaction took the lease (first time, or over an expired one)
    downtime: timedelta | None  # how long nobody held it, when taken over


def fence(s: Session, job: str, holder: str, held: int | None, now: datetime, seconds: float) -> Claim:
    """Check (and extend) this process's lease on `job` inside transaction `s`; raise Fenced if lost."""
    # A write first: SQLite (which ignores FOR UPDATE and starts a transaction only at the
    # first write) then holds its write lock before anything is read, like the row lock below.
    s.execute(update(LeaseRow).where(LeaseRow.job == job).values(epoch=LeaseRow.epoch))
    lease = s.get(LeaseRow, job, with_for_update=True, populate_existing=True)
    expires = now + timedelta(seconds=seconds)
    if lease is None:
        s.add(LeaseRow(job=job, holder=holder, epoch=1, expires_at=expires, renewed_at=now))
        return Claim(1, True, None)
    if lease.holder == holder:  # holder names are unique per process: this is ours
        lease.expires_at, lease.renewed_at = expires, now
        # an epoch we do not remember: the commit that took it was not acknowledged to us
        return Claim(lease.epoch, lease.epoch != held, None)
    if aware(lease.expires_at) > now:  # type: ignore[operator]
        raise Fenced(
            f"job {job!r} is served by aggregator {lease.holder} (epoch {lease.epoch}, lease until "
            f"{aware(lease.expires_at):%H:%M:%S}); this one waits",
        )
    downtime = now - aware(lease.renewed_at)  # type: ignore[operator]
    lease.holder, lease.epoch, lease.expires_at, lease.renewed_at = holder, lease.epoch + 1, expires, now
    return Claim(lease.epoch, True, downtime)


def release(s: Session, job: str, holder: str, now: datetime) -> None:
    """Let a successor take the lease at once (graceful shutdown)."""
    lease = s.get(LeaseRow, job, with_for_update=True)
    if lease is not None and lease.holder == holder:
        lease.expires_at = now
