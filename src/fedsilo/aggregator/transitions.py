"""Round transitions inside one write transaction, and the task each silo gets.

Plain functions over a `Tx` and the job's rows: they change rows and register what must
follow the commit (metrics) with `tx.on_commit`; nothing here touches files or caches.
Closing a round needs the accumulator and the blobs, so it stays with the engine.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedsilo import strategies
from fedsilo.aggregator import secure, specs
from fedsilo.aggregator.lifecycle import Phase, RoundState, Tx
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.store import EvaluationRow, JobRow, RoundRow, SecAggKeyRow, SiloRow, UpdateRow, aware
from fedsilo.api import models as m
from fedsilo.privacy.dp import share_std
from fedsilo.spec import FederatedJob

log = logging.getLogger("fedsilo.aggregator")


def received(s: Session, job: str, number: int) -> list[str]:
    """Silos whose update round `number` accepted."""
    return list(s.scalars(select(UpdateRow.silo).where(UpdateRow.job == job, UpdateRow.round == number)))


def sample(s: Session, row: JobRow, number: int) -> list[str]:
    """Round `number`'s participants: a deterministic sample of joined trainers (all of them in async mode)."""
    spec = specs.job_of(row).spec
    joined = s.scalars(
        select(SiloRow.name).where(
            SiloRow.job == row.name,
            SiloRow.role == "trainer",
            SiloRow.joined_at.is_not(None),
            SiloRow.revoked_at.is_(None),
        )
    ).all()
    if spec.aggregation.mode == "async":
        return sorted(joined)
    return strategies.sample_silos(
        sorted(joined), spec.aggregation.fraction, spec.aggregation.min_silos, spec.training.seed, number
    )


def open_round(tx: Tx, row: JobRow, number: int, metrics: Metrics) -> None:
    """Open round `number`; a changed aggregation waiting in `pending_document` takes effect here."""
    if row.pending_document is not None:
        old_strategy = specs.job_of(row).spec.aggregation.strategy
        row.document, row.pending_document = row.pending_document, None
        if specs.job_of(row).spec.aggregation.strategy != old_strategy:
            row.server_state_sha = None  # another strategy's optimiser state means nothing
        tx.dirty = True
    spec = specs.job_of(row).spec
    participants = sample(tx.s, row, number)
    plan: dict[str, Any] = {}
    if spec.aggregation.balance_workload and spec.training.local_steps:
        rows = tx.s.scalars(select(SiloRow).where(SiloRow.job == row.name, SiloRow.name.in_(participants))).all()
        plan["steps"] = strategies.assign_steps(
            {r.name: r.throughput for r in rows}, spec.training.local_steps, spec.training.batch_size
        )
    deadline = tx.now + timedelta(seconds=spec.aggregation.round_timeout_seconds)
    rnd = RoundRow(
        job=row.name,
        number=number,
        state=RoundState.OPEN,
        participants=participants,
        opened_at=tx.now,
        deadline=deadline,
        metrics=plan,
    )
    if spec.aggregation.secure:
        secure.start(tx, rnd, spec.aggregation)
    tx.s.add(rnd)
    row.current_round = number
    name = row.name
    tx.on_commit(lambda: metrics.round.labels(name).set(number))
    tx.on_commit(lambda: metrics.silos_participating.labels(name).set(len(participants)))


def maybe_start(tx: Tx, row: JobRow, metrics: Metrics) -> None:
    """Pending -> Running once the initial adapter exists and every trainer joined (or quorum + timeout)."""
    if row.phase != Phase.PENDING or row.version < 0:
        return
    spec = specs.job_of(row).spec
    trainers = tx.s.scalars(
        select(SiloRow).where(SiloRow.job == row.name, SiloRow.role == "trainer", SiloRow.revoked_at.is_(None))
    ).all()
    joined = [t for t in trainers if t.joined_at is not None]
    waited = (tx.now - aware(row.created_at)).total_seconds()  # type: ignore[operator]
    everyone = len(joined) == len(trainers)
    if everyone or (len(joined) >= spec.aggregation.min_silos and waited >= spec.aggregation.round_timeout_seconds):
        row.phase, row.started_at = Phase.RUNNING, tx.now
        open_round(tx, row, 1, metrics)


def deadline_passed(tx: Tx, row: JobRow, rnd: RoundRow) -> None:
    """At the deadline: aggregate with a quorum, else fail the job (resumable)."""
    spec = specs.job_of(row).spec
    got = received(tx.s, row.name, rnd.number)
    if rnd.secagg is not None:  # a secure round goes on to unmasking, not straight to aggregation
        secure.expire(tx, row, rnd, spec.aggregation.min_silos)
        return
    for silo in set(rnd.participants) - set(got):
        late = tx.s.get(SiloRow, (row.name, silo))
        if late is not None:
            late.state = "late"
    if got and len(got) >= spec.aggregation.min_silos:
        rnd.state = RoundState.AGGREGATING
        return
    row.phase, row.finished_at = Phase.FAILED, tx.now
    row.message = (
        f"round {rnd.number}: {len(got)} update(s) by the deadline, "
        f'aggregation.minSilos is {spec.aggregation.min_silos}; resume with PATCH {{"resume": true}}'
    )
    log.error("job %s: %s", row.name, row.message)


def give_back(tx: Tx, job: str, downtime: timedelta) -> None:
    """Time nobody served the job does not count against the silos: the open round's deadline moves."""
    row = tx.s.get(JobRow, job)
    if row is None or row.phase != Phase.RUNNING:
        return
    rnd = tx.s.get(RoundRow, (job, row.current_round))
    if rnd is not None and rnd.state == RoundState.OPEN:
        deadline = aware(rnd.deadline)
        assert deadline is not None
        rnd.deadline = deadline + downtime
        log.warning(
            "job %s: aggregator was down %.0fs; round %d deadline moved by that",
            job,
            downtime.total_seconds(),
            rnd.number,
        )


def _evaluated(s: Session, job: str, silo: str, version: int) -> bool:
    query = select(EvaluationRow.split).where(
        EvaluationRow.job == job, EvaluationRow.silo == silo, EvaluationRow.version == version
    )
    return s.scalars(query).first() is not None


def _may_join_secure(s: Session, rnd: RoundRow, silo: str) -> bool:
    """A secure round is joined at its key stage, once: a silo that posted keys and asks again
    (restarted, its private keys gone) sits the round out; the threshold covers it."""
    return secure.stage(rnd) == "keys" and s.get(SecAggKeyRow, (rnd.job, rnd.number, silo)) is None


def _dp_share(job: FederatedJob, rnd: RoundRow) -> dict[str, float]:
    """Secure rounds with DP: each silo clips and adds its share of the noise (the aggregator cannot)."""
    dp = job.spec.privacy.dp
    if dp is None or rnd.secagg is None:
        return {}
    threshold = int(rnd.secagg["threshold"])
    return {"clip_norm": dp.clip_norm, "noise_std": share_std(dp.noise_multiplier, dp.clip_norm, threshold)}


def next_task(s: Session, row: JobRow, rnd: RoundRow | None, silo: SiloRow, parsed: specs.Parsed) -> m.Task:
    """What `silo` should do now, from committed rows only and the job document in force
    (`rnd`: the job's current round, read with `row`)."""
    if row.phase == Phase.FAILED:  # agents wait for a resume instead of leaving
        return m.Task(action="wait", round=row.current_round, version=row.version)
    job, hooks = parsed.job, parsed.hooks
    silo_spec = parsed.silo(silo.name)
    if row.version < 0:
        full_rank = silo_spec.rank in (None, job.spec.peft.r)
        return m.Task(action="init" if silo.role == "trainer" and full_rank else "wait")
    if silo.role == "evaluator":
        for version in range(row.version + 1):
            if not _evaluated(s, row.name, silo.name, version):
                return m.Task(action="evaluate", version=version)
        return m.Task(action="done" if row.phase == Phase.SUCCEEDED else "wait", version=row.version)
    if row.phase == Phase.RUNNING and (
        rnd is not None
        and rnd.state == RoundState.OPEN
        and silo.name in rnd.participants
        and s.get(UpdateRow, (row.name, rnd.number, silo.name)) is None
        and (rnd.secagg is None or _may_join_secure(s, rnd, silo.name))
    ):
        return m.Task(
            action="train",
            round=rnd.number,
            version=rnd.number - 1,
            deadline=aware(rnd.deadline),
            client_config=hooks,
            rank=silo_spec.rank,
            local_steps=(rnd.metrics or {}).get("steps", {}).get(silo.name),
            secure=rnd.secagg is not None,
            dp=_dp_share(job, rnd),
        )
    if row.phase == Phase.SUCCEEDED:
        if silo.n_eval_examples > 0 and not _evaluated(s, row.name, silo.name, row.version):
            return m.Task(action="evaluate", version=row.version)
        return m.Task(action="done", version=row.version)
    return m.Task(action="wait", round=row.current_round, version=row.version)
