"""Read models: job status, round history and per-version evaluation summaries.

Pure queries over committed rows (no writes, no in-memory caches), so any aggregator
process — the lease holder or not — answers them the same way.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from fedsilo.aggregator import budget, specs
from fedsilo.aggregator.store import EvaluationRow, JobRow, RoundRow, SiloRow, UpdateRow, aware
from fedsilo.api import models as m


def latest_evaluated(s: Session, job: str) -> int:
    latest = s.scalar(select(func.max(EvaluationRow.version)).where(EvaluationRow.job == job))
    return -1 if latest is None else int(latest)


def headline(s: Session, job: str, version: int) -> tuple[str, float, float | None] | None:
    """(split, loss, accuracy) of `version` as `version_summary` weighs them, summed by the database:
    the gauges follow every report, and a 1,000-silo round has 1,000 reports."""
    n, acc_n = EvaluationRow.n_examples, case((EvaluationRow.accuracy.is_not(None), EvaluationRow.n_examples), else_=0)
    query = (
        select(EvaluationRow.split, func.sum(EvaluationRow.loss * n), func.sum(n))
        .add_columns(func.sum(func.coalesce(EvaluationRow.accuracy, 0.0) * n), func.sum(acc_n))
        .where(EvaluationRow.job == job, EvaluationRow.version == version)
        .group_by(EvaluationRow.split)
    )
    sums = {split: (loss, total, acc, with_acc) for split, loss, total, acc, with_acc in s.execute(query)}
    for split in ("test", "validation"):
        if split in sums and sums[split][1]:
            loss, total, acc, with_acc = sums[split]
            return split, float(loss) / float(total), (float(acc) / float(with_acc) if with_acc else None)
    return None


def version_summary(s: Session, job: str, version: int) -> dict[str, Any] | None:
    """Test metrics (evaluators) when present, else the example-weighted validation mean."""
    rows = s.scalars(select(EvaluationRow).where(EvaluationRow.job == job, EvaluationRow.version == version)).all()
    for split in ("test", "validation"):
        chosen = [r for r in rows if r.split == split]
        if not chosen:
            continue
        n = sum(r.n_examples for r in chosen)
        loss = sum(r.loss * r.n_examples for r in chosen) / n
        accs = [r for r in chosen if r.accuracy is not None]
        acc = None
        if accs:
            acc = sum((r.accuracy or 0.0) * r.n_examples for r in accs) / sum(r.n_examples for r in accs)
        extra: dict[str, float] = {}
        for r in chosen:
            for k, v in (r.extra or {}).items():
                if isinstance(v, int | float):
                    extra[k] = extra.get(k, 0.0) + v * r.n_examples / n
        generations = {r.silo: r.extra["generations"] for r in chosen if "generations" in (r.extra or {})}
        return {
            "split": split,
            "loss": loss,
            "accuracy": acc,
            "n_examples": n,
            "silos": len(chosen),
            "extra": extra,
            "generations": generations,
        }
    return None


def status(s: Session, row: JobRow) -> m.JobStatus:
    latest = latest_evaluated(s, row.name)
    summary = version_summary(s, row.name, latest) if latest >= 0 else None
    silos = s.scalars(select(SiloRow).where(SiloRow.job == row.name).order_by(SiloRow.name)).all()
    return m.JobStatus(
        name=row.name,
        phase=row.phase,  # type: ignore[arg-type]
        message=row.message,
        round=row.current_round,
        rounds=row.rounds,
        version=row.version,
        accuracy=summary["accuracy"] if summary else None,
        loss=summary["loss"] if summary else None,
        silos=[
            m.SiloStatus(
                name=x.name,
                role=x.role,
                state="revoked" if x.revoked_at is not None else x.state,
                joined=x.joined_at is not None,
                last_seen=aware(x.last_seen),
                rounds_completed=x.rounds_completed,
                train_examples=x.n_train_examples,
                eval_examples=x.n_eval_examples,
            )
            for x in silos
        ],
        privacy=budget.status(s, row, specs.job_of(row).spec),
        created_at=aware(row.created_at),  # type: ignore[arg-type]
        started_at=aware(row.started_at),
        finished_at=aware(row.finished_at),
    )


def history(s: Session, job: str) -> list[m.RoundInfo]:
    out = []
    for r in s.scalars(select(RoundRow).where(RoundRow.job == job).order_by(RoundRow.number)):
        ups = s.scalars(select(UpdateRow).where(UpdateRow.job == job, UpdateRow.round == r.number)).all()
        summary = version_summary(s, job, r.number) if r.state == "closed" else None
        closed, opened = aware(r.closed_at), aware(r.opened_at)
        trains = [u.train_seconds for u in ups if u.train_seconds is not None]
        out.append(
            m.RoundInfo(
                round=r.number,
                state=r.state,  # type: ignore[arg-type]
                participants=list(r.participants),
                updates=len(ups),
                examples=sum(u.n_examples for u in ups),
                bytes_received=sum(u.n_bytes for u in ups),
                opened_at=opened,  # type: ignore[arg-type]
                closed_at=closed,
                duration_seconds=(closed - opened).total_seconds() if closed and opened else None,
                aggregation_seconds=r.aggregation_seconds,
                max_train_seconds=max(trains, default=None),
                accuracy=summary["accuracy"] if summary else None,
                loss=summary["loss"] if summary else None,
                split=summary["split"] if summary else None,
                metrics={**(r.metrics or {}), **(summary["extra"] if summary else {})},
            )
        )
    return out


def evaluations(s: Session, row: JobRow) -> list[dict[str, Any]]:
    """Per version: the summary the dashboards and the local runner show (never per-example data)."""
    out = []
    for version in range(row.version + 1):
        summary = version_summary(s, row.name, version)
        if summary:
            out.append({"version": version, **summary})
    return out
