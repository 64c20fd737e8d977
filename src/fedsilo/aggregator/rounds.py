"""The round engine: an explicit, persisted state machine per job.

Job phases: Pending -> Running -> Succeeded | Failed.
Round states: open -> (aggregating) -> closed. Round r trains from global version r-1
and produces version r; version 0 is the initial adapter uploaded by the first trainer.

All state transitions happen under one lock and are committed to the store before the
call returns; in-memory objects (`Live`) are caches rebuilt from the store on demand, so
a restarted aggregator resumes an open round with the updates it had already accepted.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fedsilo import strategies
from fedsilo.adapters import AdapterError, Schema, State, from_bytes, schema_of, sha256, to_bytes
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.store import (
    Blobs,
    EvaluationRow,
    JobRow,
    RoundRow,
    SiloRow,
    UpdateRow,
    VersionRow,
    aware,
    utcnow,
)
from fedsilo.aggregator.uploads import validate_initial, validate_update
from fedsilo.api import models as m
from fedsilo.spec import FederatedJob, FederatedJobSpec, SpecError, parse_job


class ApiError(Exception):
    """An error the HTTP layer turns into `status` with a Problem body."""

    def __init__(self, status: int, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason


def token_hash(token: str) -> str:
    return sha256(token.encode())


@dataclass(frozen=True)
class Incoming:
    """One silo's upload for one round, as it arrived (before any validation)."""

    silo: str
    round: int
    data: bytes
    claimed_sha256: str
    n_examples: int
    train_seconds: float | None = None
    examples_seen: int | None = None


@dataclass
class Live:
    """Per-job caches; always rebuildable from the store."""

    job: FederatedJob
    strategy: strategies.Strategy
    schema: Schema | None = None
    global_state: State | None = None
    acc: Any = None
    acc_round: int = 0


class Engine:
    def __init__(
        self, sessions: sessionmaker[Session], blobs: Blobs, metrics: Metrics, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.RLock()
        self._live: dict[str, Live] = {}

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._lock, self.sessions.begin() as session:
            yield session

    # ---- jobs -----------------------------------------------------------------------

    def create_job(self, job: FederatedJob, tokens: dict[str, str]) -> m.JobCreated:
        """Create a job, or return the existing one unchanged if the document is identical."""
        spec = job.spec
        try:
            strategies.create(spec.aggregation.strategy, spec.aggregation.params)
        except ValueError as exc:
            raise ApiError(422, f"spec.aggregation: {exc}", "invalid_spec") from None
        names = {s.name for s in spec.silos}
        unknown = sorted(set(tokens) - names)
        if unknown:
            raise ApiError(422, f"silo_tokens names silos not in the job: {unknown}", "invalid_spec")
        short = sorted(n for n, t in tokens.items() if len(t) < 16)
        if short:
            raise ApiError(422, f"silo tokens must have at least 16 characters: {short}", "invalid_spec")
        name = job.metadata.name
        document = job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
        with self._tx() as s:
            existing = s.get(JobRow, name)
            if existing is not None:
                if existing.document != document:
                    raise ApiError(409, f"job {name!r} exists with a different spec", "conflict")
                return m.JobCreated(name=name, silo_tokens={}, created=False)
            issued = {n: tokens.get(n) or secrets.token_urlsafe(24) for n in sorted(names)}
            s.add(JobRow(name=name, document=document, rounds=spec.training.rounds, created_at=self.clock()))
            s.flush()
            for silo in spec.silos:
                s.add(SiloRow(job=name, name=silo.name, role=silo.role, token_hash=token_hash(issued[silo.name])))
        self.metrics.rounds_total_planned.labels(name).set(spec.training.rounds)
        self.metrics.silos_joined.labels(name).set(0)
        return m.JobCreated(name=name, silo_tokens=issued, created=True)

    def patch_job(self, name: str, patch: m.PatchJob) -> m.JobStatus:
        with self._tx() as s:
            row = self._job(s, name)
            if patch.rounds is not None:
                if patch.rounds < row.current_round:
                    raise ApiError(
                        422, f"rounds={patch.rounds} is below the current round {row.current_round}", "invalid"
                    )
                row.rounds = patch.rounds
                if row.phase == "Succeeded" and row.version < row.rounds:
                    row.phase, row.finished_at = "Running", None
                    self._open_round(s, row, row.version + 1)
                self.metrics.rounds_total_planned.labels(name).set(row.rounds)
        return self.status(name)

    def document(self, name: str) -> dict[str, Any]:
        with self.sessions() as s:
            return dict(self._job(s, name).document)

    def job_names(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(JobRow.name)))

    def _job(self, s: Session, name: str) -> JobRow:
        row = s.get(JobRow, name)
        if row is None:
            raise ApiError(404, f"no job named {name!r}", "not_found")
        return row

    def _spec(self, row: JobRow) -> FederatedJobSpec:
        """The job's spec, parsed once per process (the stored document never changes)."""
        live = self._live.get(row.name)
        return live.job.spec if live is not None else parse_job(row.document).spec

    def _live_for(self, s: Session, row: JobRow) -> Live:
        live = self._live.get(row.name)
        if live is None:
            job = parse_job(row.document)
            live = Live(job, strategies.create(job.spec.aggregation.strategy, job.spec.aggregation.params))
            self._live[row.name] = live
        if live.global_state is None and row.version >= 0:
            v = s.get(VersionRow, (row.name, row.version))
            assert v is not None
            live.global_state = from_bytes(self.blobs.get(v.sha256))
            v0 = s.get(VersionRow, (row.name, 0))
            assert v0 is not None
            live.schema = schema_of(from_bytes(self.blobs.get(v0.sha256)))
        if (row.phase == "Running" and live.acc is None) or (
            live.acc is not None and live.acc_round != row.current_round
        ):
            live.acc, live.acc_round = self._rebuild_accumulator(s, row, live), row.current_round
        return live

    def _rebuild_accumulator(self, s: Session, row: JobRow, live: Live) -> Any:
        assert live.global_state is not None
        acc = live.strategy.accumulator(live.global_state)
        if row.phase != "Running":
            return acc
        for u in s.scalars(select(UpdateRow).where(UpdateRow.job == row.name, UpdateRow.round == row.current_round)):
            live.strategy.add(acc, from_bytes(self.blobs.get(u.sha256)), float(u.n_examples))
        return acc

    # ---- silos ----------------------------------------------------------------------

    def authenticate(self, job: str, silo: str, token: str) -> None:
        with self.sessions() as s:
            row = s.get(SiloRow, (job, silo))
            if s.get(JobRow, job) is None:
                raise ApiError(404, f"no job named {job!r}", "not_found")
            if row is None or not hmac.compare_digest(row.token_hash, token_hash(token)):
                raise ApiError(401, "invalid silo token", "unauthorized")

    def join(self, job: str, silo: str, req: m.JoinRequest) -> m.JoinResponse:
        with self._tx() as s:
            row = self._job(s, job)
            silo_row = s.get(SiloRow, (job, silo))
            assert silo_row is not None
            now = self.clock()
            silo_row.joined_at = silo_row.joined_at or now
            silo_row.last_seen = now
            silo_row.state = "joined"
            silo_row.n_train_examples, silo_row.n_eval_examples = req.n_train_examples, req.n_eval_examples
            silo_row.throughput = req.throughput_examples_per_second
            s.flush()
            self._maybe_start(s, row)
            joined = s.scalars(select(SiloRow).where(SiloRow.job == job, SiloRow.joined_at.is_not(None))).all()
            self.metrics.silos_joined.labels(job).set(len(joined))
            live = self._live_for(s, row)
            return m.JoinResponse(job=live.job, role=silo_row.role)  # type: ignore[arg-type]

    def task(self, job: str, silo: str) -> m.Task:
        with self._tx() as s:
            row = self._job(s, job)
            silo_row = s.get(SiloRow, (job, silo))
            assert silo_row is not None
            silo_row.last_seen = self.clock()
            if silo_row.joined_at is None:
                raise ApiError(409, "join the job first", "not_joined")
            task = self._task(s, row, silo_row)
            if task.action == "train":
                silo_row.state = "training"
            elif task.action == "evaluate":
                silo_row.state = "evaluating"
            elif task.action == "done":
                silo_row.state = "done"
            return task

    def _evaluated(self, s: Session, job: str, silo: str, version: int) -> bool:
        return any(
            s.scalars(
                select(EvaluationRow.split).where(
                    EvaluationRow.job == job, EvaluationRow.silo == silo, EvaluationRow.version == version
                )
            )
        )

    def _task(self, s: Session, row: JobRow, silo: SiloRow) -> m.Task:
        if row.phase == "Failed":
            return m.Task(action="done")
        live = self._live_for(s, row)
        silo_spec = live.job.spec.silo(silo.name)
        if row.version < 0:
            full_rank = silo_spec.rank in (None, live.job.spec.peft.r)
            return m.Task(action="init" if silo.role == "trainer" and full_rank else "wait")
        if silo.role == "evaluator":
            for version in range(row.version + 1):
                if not self._evaluated(s, row.name, silo.name, version):
                    return m.Task(action="evaluate", version=version)
            return m.Task(action="done" if row.phase == "Succeeded" else "wait", version=row.version)
        if row.phase == "Running":
            rnd = s.get(RoundRow, (row.name, row.current_round))
            if (
                rnd is not None
                and rnd.state == "open"
                and silo.name in rnd.participants
                and s.get(UpdateRow, (row.name, rnd.number, silo.name)) is None
            ):
                return m.Task(
                    action="train",
                    round=rnd.number,
                    version=rnd.number - 1,
                    deadline=aware(rnd.deadline),
                    client_config=live.strategy.client_config(),
                    rank=silo_spec.rank,
                    local_steps=(rnd.metrics or {}).get("steps", {}).get(silo.name),
                )
        if row.phase == "Succeeded":
            if silo.n_eval_examples > 0 and not self._evaluated(s, row.name, silo.name, row.version):
                return m.Task(action="evaluate", version=row.version)
            return m.Task(action="done", version=row.version)
        return m.Task(action="wait", round=row.current_round, version=row.version)

    # ---- adapters -------------------------------------------------------------------

    def put_initial(self, job: str, silo: str, data: bytes) -> str:
        with self._tx() as s:
            row = self._job(s, job)
            live = self._live_for(s, row)
            limit = live.job.spec.aggregation.max_update_bytes
            try:
                state = validate_initial(data, limit)
            except AdapterError as exc:
                self.metrics.updates_rejected.labels(job, exc.reason).inc()
                raise ApiError(422, str(exc), exc.reason) from None
            existing = s.get(VersionRow, (job, 0))
            if existing is not None:  # another trainer was first: same seed, so harmless
                return existing.sha256
            digest = self.blobs.put(to_bytes(state))
            s.add(VersionRow(job=job, version=0, sha256=digest, n_bytes=len(data), created_at=self.clock()))
            row.version = 0
            live.global_state, live.schema = state, schema_of(state)
            s.flush()
            self._maybe_start(s, row)
            return digest

    def adapter(self, job: str, version: int) -> tuple[bytes, str]:
        with self.sessions() as s:
            self._job(s, job)
            v = s.get(VersionRow, (job, version))
            if v is None:
                raise ApiError(404, f"job {job!r} has no adapter version {version}", "not_found")
            data = self.blobs.get(v.sha256)
        self.metrics.sent_bytes.labels(job).inc(len(data))
        return data, v.sha256

    def submit_update(self, job: str, update: Incoming) -> m.UpdateAccepted:
        with self._tx() as s:
            row = self._job(s, job)
            live = self._live_for(s, row)
            try:
                return self._accept(s, row, live, update)
            except ApiError as exc:
                self.metrics.updates_rejected.labels(job, exc.reason or "invalid").inc()
                raise

    def _accept(self, s: Session, row: JobRow, live: Live, update: Incoming) -> m.UpdateAccepted:
        silo, round_, data, claimed_sha = update.silo, update.round, update.data, update.claimed_sha256
        n_examples, train_seconds, examples_seen = update.n_examples, update.train_seconds, update.examples_seen
        previous = s.get(UpdateRow, (row.name, round_, silo))
        if previous is not None:
            if previous.sha256 == claimed_sha.lower():
                return m.UpdateAccepted(round=round_, sha256=previous.sha256, duplicate=True)
            raise ApiError(409, f"silo {silo!r} already sent a different update for round {round_}", "duplicate")
        rnd = s.get(RoundRow, (row.name, round_))
        if row.phase != "Running" or rnd is None or rnd.state != "open" or round_ != row.current_round:
            raise ApiError(
                409, f"round {round_} is not open (current round {row.current_round}, {row.phase})", "wrong_round"
            )
        if silo not in rnd.participants:
            raise ApiError(403, f"silo {silo!r} is not sampled for round {round_}", "not_participant")
        if n_examples < 1:
            raise ApiError(422, "X-Fedsilo-Examples must be a positive integer", "bad_examples")
        assert live.schema is not None
        try:
            delta = validate_update(data, claimed_sha, live.schema, live.job.spec.aggregation.max_update_bytes)
        except AdapterError as exc:
            raise ApiError(422 if exc.reason != "too_large" else 413, str(exc), exc.reason) from None
        try:
            live.strategy.add(live.acc, delta, float(n_examples))
        except AdapterError as exc:
            raise ApiError(422, str(exc), exc.reason) from None
        except ValueError as exc:
            raise ApiError(422, str(exc), "rejected_by_strategy") from None
        digest = self.blobs.put(data)
        s.add(
            UpdateRow(
                job=row.name,
                round=round_,
                silo=silo,
                sha256=digest,
                n_examples=n_examples,
                n_bytes=len(data),
                train_seconds=train_seconds,
                received_at=self.clock(),
            )
        )
        silo_row = s.get(SiloRow, (row.name, silo))
        assert silo_row is not None
        silo_row.state, silo_row.rounds_completed = "uploaded", silo_row.rounds_completed + 1
        if train_seconds and examples_seen:
            silo_row.throughput = examples_seen / train_seconds
        self.metrics.received_bytes.labels(row.name).inc(len(data))
        self.metrics.updates_accepted.labels(row.name).inc()
        self.metrics.silo_examples.labels(row.name, silo).set(n_examples)
        if train_seconds is not None:
            self.metrics.silo_train_seconds.labels(row.name, silo).set(train_seconds)
        s.flush()
        received = s.scalars(select(UpdateRow.silo).where(UpdateRow.job == row.name, UpdateRow.round == round_)).all()
        if set(rnd.participants) <= set(received):
            self._close_round(s, row, live, rnd)
        return m.UpdateAccepted(round=round_, sha256=digest, duplicate=False)

    # ---- round transitions ----------------------------------------------------------

    def _maybe_start(self, s: Session, row: JobRow) -> None:
        if row.phase != "Pending" or row.version < 0:
            return
        spec = self._spec(row)
        trainers = s.scalars(select(SiloRow).where(SiloRow.job == row.name, SiloRow.role == "trainer")).all()
        joined = [t for t in trainers if t.joined_at is not None]
        waited = (self.clock() - aware(row.created_at)).total_seconds()  # type: ignore[operator]
        everyone = len(joined) == len(trainers)
        if everyone or (len(joined) >= spec.aggregation.min_silos and waited >= spec.aggregation.round_timeout_seconds):
            row.phase, row.started_at = "Running", self.clock()
            self._open_round(s, row, 1)

    def _open_round(self, s: Session, row: JobRow, number: int) -> None:
        spec = self._spec(row)
        joined = s.scalars(
            select(SiloRow.name).where(
                SiloRow.job == row.name, SiloRow.role == "trainer", SiloRow.joined_at.is_not(None)
            )
        ).all()
        participants = strategies.sample_silos(
            list(joined), spec.aggregation.fraction, spec.aggregation.min_silos, spec.training.seed, number
        )
        now = self.clock()
        deadline = now + timedelta(seconds=spec.aggregation.round_timeout_seconds)
        plan: dict[str, Any] = {}
        if spec.aggregation.balance_workload and spec.training.local_steps:
            rows = s.scalars(select(SiloRow).where(SiloRow.job == row.name, SiloRow.name.in_(participants))).all()
            plan["steps"] = strategies.assign_steps(
                {r.name: r.throughput for r in rows}, spec.training.local_steps, spec.training.batch_size
            )
        s.add(
            RoundRow(
                job=row.name,
                number=number,
                state="open",
                participants=participants,
                opened_at=now,
                deadline=deadline,
                metrics=plan,
            )
        )
        row.current_round = number
        live = self._live.get(row.name)
        if live is not None and live.global_state is not None:
            live.acc, live.acc_round = live.strategy.accumulator(live.global_state), number
        self.metrics.round.labels(row.name).set(number)
        self.metrics.silos_participating.labels(row.name).set(len(participants))

    def _close_round(self, s: Session, row: JobRow, live: Live, rnd: RoundRow) -> None:
        rnd.state = "aggregating"
        started = time.perf_counter()
        server_state: State = from_bytes(self.blobs.get(row.server_state_sha)) if row.server_state_sha else {}
        assert live.global_state is not None
        result = live.strategy.aggregate(live.global_state, live.acc, server_state)
        data = to_bytes(result.state)
        digest = self.blobs.put(data)
        if result.server_state:
            row.server_state_sha = self.blobs.put(to_bytes(result.server_state))
        seconds = time.perf_counter() - started
        now = self.clock()
        s.add(VersionRow(job=row.name, version=rnd.number, sha256=digest, n_bytes=len(data), created_at=now))
        rnd.state, rnd.closed_at, rnd.aggregation_seconds = "closed", now, seconds
        rnd.metrics = {**(rnd.metrics or {}), **{k: float(v) for k, v in result.metrics.items()}}
        row.version = rnd.number
        live.global_state, live.acc = result.state, None
        for u in s.scalars(select(UpdateRow).where(UpdateRow.job == row.name, UpdateRow.round == rnd.number)):
            self.blobs.delete(u.sha256)
        self.metrics.aggregation_duration.labels(row.name).observe(seconds)
        self.metrics.round_duration.labels(row.name).observe((now - aware(rnd.opened_at)).total_seconds())  # type: ignore[operator]
        if "lora_truncation_error" in result.metrics:
            self.metrics.lora_truncation_error.labels(row.name).set(result.metrics["lora_truncation_error"])
        if rnd.number >= row.rounds:
            row.phase, row.finished_at = "Succeeded", now
        else:
            self._open_round(s, row, rnd.number + 1)

    def tick(self) -> None:
        """Enforce deadlines and start conditions; called periodically by the server."""
        for name in self.job_names():
            with self._tx() as s:
                row = self._job(s, name)
                if row.phase == "Pending":
                    self._maybe_start(s, row)
                if row.phase != "Running":
                    continue
                rnd = s.get(RoundRow, (name, row.current_round))
                if rnd is None or rnd.state != "open" or self.clock() < aware(rnd.deadline):  # type: ignore[operator]
                    continue
                received = s.scalars(
                    select(UpdateRow.silo).where(UpdateRow.job == name, UpdateRow.round == rnd.number)
                ).all()
                spec = self._spec(row)
                for silo in set(rnd.participants) - set(received):
                    late = s.get(SiloRow, (name, silo))
                    if late is not None:
                        late.state = "late"
                if len(received) >= spec.aggregation.min_silos:
                    self._close_round(s, row, self._live_for(s, row), rnd)
                else:
                    row.phase, row.finished_at = "Failed", self.clock()
                    row.message = (
                        f"round {rnd.number}: {len(received)} update(s) by the deadline, "
                        f"aggregation.minSilos is {spec.aggregation.min_silos}"
                    )

    # ---- evaluations ----------------------------------------------------------------

    def submit_metrics(self, job: str, silo: str, report: m.MetricsReport) -> None:
        with self._tx() as s:
            row = self._job(s, job)
            if s.get(VersionRow, (job, report.version)) is None:
                raise ApiError(409, f"version {report.version} does not exist yet", "wrong_version")
            key = (job, report.version, silo, report.split)
            existing = s.get(EvaluationRow, key)
            if existing is None:
                s.add(
                    EvaluationRow(
                        job=job,
                        version=report.version,
                        silo=silo,
                        split=report.split,
                        loss=report.loss,
                        accuracy=report.accuracy,
                        n_examples=report.n_examples,
                        extra={**report.extra, **({"generations": report.generations} if report.generations else {})},
                        at=self.clock(),
                    )
                )
            silo_row = s.get(SiloRow, (job, silo))
            if silo_row is not None and silo_row.state == "evaluating":
                silo_row.state = "joined"
            s.flush()
            self.metrics.silo_loss.labels(job, silo, report.split).set(report.loss)
            if report.accuracy is not None:
                self.metrics.silo_accuracy.labels(job, silo, report.split).set(report.accuracy)
            summary = self._version_summary(s, row.name, report.version)
            if summary and report.version == self._latest_evaluated(s, row.name):
                self.metrics.global_loss.labels(job, summary["split"]).set(summary["loss"])
                if summary["accuracy"] is not None:
                    self.metrics.global_accuracy.labels(job, summary["split"]).set(summary["accuracy"])

    def _latest_evaluated(self, s: Session, job: str) -> int:
        versions = s.scalars(select(EvaluationRow.version).where(EvaluationRow.job == job)).all()
        return max(versions, default=-1)

    def _version_summary(self, s: Session, job: str, version: int) -> dict[str, Any] | None:
        """Test metrics (evaluators) when present, else the example-weighted validation mean."""
        rows = s.scalars(select(EvaluationRow).where(EvaluationRow.job == job, EvaluationRow.version == version)).all()
        for split in ("test", "validation"):
            chosen = [r for r in rows if r.split == split]
            if chosen:
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

    # ---- read models ----------------------------------------------------------------

    def status(self, job: str) -> m.JobStatus:
        with self.sessions() as s:
            row = self._job(s, job)
            latest = self._latest_evaluated(s, job)
            summary = self._version_summary(s, job, latest) if latest >= 0 else None
            silos = s.scalars(select(SiloRow).where(SiloRow.job == job).order_by(SiloRow.name)).all()
            return m.JobStatus.model_validate(
                dict(
                    name=row.name,
                    phase=row.phase,
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
                            state=x.state,
                            joined=x.joined_at is not None,
                            last_seen=aware(x.last_seen),
                            rounds_completed=x.rounds_completed,
                        )
                        for x in silos
                    ],
                    created_at=aware(row.created_at),
                    started_at=aware(row.started_at),
                    finished_at=aware(row.finished_at),
                )
            )

    def history(self, job: str) -> list[m.RoundInfo]:
        with self.sessions() as s:
            self._job(s, job)
            out = []
            for r in s.scalars(select(RoundRow).where(RoundRow.job == job).order_by(RoundRow.number)):
                ups = s.scalars(select(UpdateRow).where(UpdateRow.job == job, UpdateRow.round == r.number)).all()
                summary = self._version_summary(s, job, r.number) if r.state == "closed" else None
                closed, opened = aware(r.closed_at), aware(r.opened_at)
                trains = [u.train_seconds for u in ups if u.train_seconds is not None]
                out.append(
                    m.RoundInfo.model_validate(
                        dict(
                            round=r.number,
                            state=r.state,
                            participants=list(r.participants),
                            updates=len(ups),
                            examples=sum(u.n_examples for u in ups),
                            bytes_received=sum(u.n_bytes for u in ups),
                            opened_at=opened,
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
                )
            return out

    def evaluations(self, job: str) -> list[dict[str, Any]]:
        """Per version: the summary the dashboards and the local runner show (never per-example data)."""
        with self.sessions() as s:
            row = self._job(s, job)
            out = []
            for version in range(row.version + 1):
                summary = self._version_summary(s, job, version)
                if summary:
                    out.append({"version": version, **summary})
            return out

    def ensure_job(self, job_document: dict[str, Any], tokens: dict[str, str]) -> None:
        """Create the job from a start-up file unless it exists (restart resumes it)."""
        try:
            job = parse_job(job_document)
        except SpecError as exc:
            raise SystemExit(f"FEDSILO_JOB_FILE is not a valid FederatedJob:\n{exc}") from None
        with self.sessions() as s:
            existing = s.get(JobRow, job.metadata.name)
        if existing is None:
            self.create_job(job, tokens)
        elif job.spec.training.rounds != existing.rounds:
            self.patch_job(job.metadata.name, m.PatchJob(rounds=job.spec.training.rounds))
