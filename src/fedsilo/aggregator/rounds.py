"""The round engine: the one place that changes a job, one fenced transaction at a time.

`Engine` is what the HTTP layer calls: jobs, silos, adapters, updates, evaluations and the
read models. It builds on `core.EngineCore` (the commit boundary and `Live` state; read its
docstring first), `ticking.Ticking` (rounds close in the background) and
`secure_stages.SecureStages` (the secure-aggregation stages).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedsilo import strategies
from fedsilo.adapters import AdapterError, sha256, to_bytes
from fedsilo.aggregator import budget, changes, identity, reads, secure, specs, transitions, views
from fedsilo.aggregator.acceptance import Incoming, accept, parse, parse_masked, refusal
from fedsilo.aggregator.blobs import Staged
from fedsilo.aggregator.core import Move
from fedsilo.aggregator.errors import Conflict, EngineError, Forbidden, Invalid, NotFound, Unavailable
from fedsilo.aggregator.secure_stages import SecureStages
from fedsilo.aggregator.store import (
    EvaluationRow,
    JobRow,
    RoundRow,
    SiloRow,
    VersionRow,
)
from fedsilo.aggregator.ticking import Ticking
from fedsilo.aggregator.uploads import validate_initial
from fedsilo.api import models as m
from fedsilo.spec import FederatedJob, SpecError, document_digest, dump_job, parse_job

__all__ = ["Engine", "Incoming"]

log = logging.getLogger("fedsilo.aggregator")


class Engine(Ticking, SecureStages):
    """Jobs, silos, adapters, updates, evaluations and reads (see the module docstring)."""

    # ---- jobs -----------------------------------------------------------------------

    def create_job(self, job: FederatedJob, tokens: dict[str, str]) -> m.JobCreated:
        """Create a job, or return the existing one unchanged if the document is identical."""
        spec = job.spec
        try:
            strategies.create(spec.aggregation.strategy, spec.aggregation.params)
        except ValueError as exc:
            raise Invalid(f"spec.aggregation: {exc}", "invalid_spec") from None
        budget.check_first_round(spec)
        names = {s.name for s in spec.silos}
        changes.check_tokens(tokens, names)
        name = job.metadata.name
        document = dump_job(job)
        with self._write(name) as tx:
            existing = tx.s.get(JobRow, name)
            if existing is not None:
                if document_digest(document) != existing.document_sha and document != existing.pending_document:
                    raise Conflict(f"job {name!r} exists with a different spec", "conflict")
                return m.JobCreated(name=name, silo_tokens={}, created=False)
            issued = {n: tokens.get(n) or identity.new_token() for n in sorted(names)}
            tx.s.add(JobRow(name=name, document=document, rounds=spec.training.rounds, created_at=tx.now))
            tx.s.flush()
            for silo in spec.silos:
                tx.s.add(
                    SiloRow(job=name, name=silo.name, role=silo.role, token_hash=identity.token_hash(issued[silo.name]))
                )
            tx.on_commit(lambda: self.metrics.rounds_total_planned.labels(name).set(spec.training.rounds))
            tx.on_commit(lambda: self.metrics.silos_joined.labels(name).set(0))
        return m.JobCreated(name=name, silo_tokens=issued, created=True)

    def patch_job(self, name: str, patch: m.PatchJob) -> m.JobStatus:
        """Rounds, resume and spec changes, all in one transaction (see `PatchJob`)."""
        with self._write(name) as tx:
            row = self._job(tx.s, name, lock=True)
            if patch.job is not None and changes.change_spec(tx, row, patch.job, patch.silo_tokens):
                tx.on_commit(self.wakeup.set)
            rounds = (
                patch.rounds
                if patch.rounds is not None
                else (patch.job.spec.training.rounds if patch.job is not None else None)
            )
            if rounds is not None and rounds != row.rounds:
                changes.set_rounds(tx, row, rounds, self.metrics)
            if patch.resume:
                changes.resume(tx, row, self.metrics)
        return self.status(name)

    def document(self, name: str, silo: str | None = None) -> dict[str, Any]:
        """The job's document; a silo (`silo` set) reads only its own slice of it."""
        with self.sessions() as s:
            row = self._job(s, name)
            if silo is None:
                return dict(row.document)
            return dump_job(specs.of(row).silo_view(silo))

    # ---- silos ----------------------------------------------------------------------

    def authenticate(self, job: str, silo: str, token: str) -> identity.Role:
        """The role of the silo `token` belongs to (see `identity.verify`)."""
        with self.sessions() as s:
            return self._authenticated(s, job, silo, token).role  # type: ignore[return-value]

    def _authenticated(self, s: Session, job: str, silo: str, token: str) -> SiloRow:
        """The silo's row, once `token` is verified as its token: one read (the job's only if no silo)."""
        row = s.get(SiloRow, (job, silo))
        if row is None and s.get(JobRow, job) is None:
            raise NotFound(f"no job named {job!r}")
        identity.verify(row, token, self.clock())
        assert row is not None  # verify refuses an unknown silo
        return row

    def _polled(self, s: Session, job: str, silo: str, token: str) -> tuple[SiloRow, JobRow, RoundRow | None]:
        """`_authenticated`, `_job` and the job's current round (None before the first) in one
        statement: a poll's SQL was three reads."""
        current = (RoundRow.job == JobRow.name) & (RoundRow.number == JobRow.current_round)
        query = (
            select(SiloRow, JobRow, RoundRow)
            .join(JobRow, JobRow.name == SiloRow.job)
            .outerjoin(RoundRow, current)
            .where(SiloRow.job == job, SiloRow.name == silo)
        )
        found = s.execute(query).first()
        if found is None:  # no such job or silo: the reads one by one refuse and say which
            silo_row, row = self._authenticated(s, job, silo, token), self._job(s, job)
            return silo_row, row, s.get(RoundRow, (job, row.current_round))
        identity.verify(found[0], token, self.clock())
        return found[0], found[1], found[2]

    def rotate_token(self, job: str, silo: str, req: m.RotateToken) -> m.TokenIssued:
        """A new token for `silo`; the current one stays valid for `req.grace_seconds`."""
        with self._write(job) as tx:
            self._job(tx.s, job, lock=True)
            row = self._silo(tx.s, job, silo)
            expires_in = timedelta(seconds=req.expires_in_seconds) if req.expires_in_seconds is not None else None
            done = identity.rotate(row, req.token, timedelta(seconds=req.grace_seconds), expires_in, tx.now)
            return m.TokenIssued(
                silo=silo,
                token=done.token,
                previous_valid_until=done.previous_valid_until,
                expires_at=done.expires_at,
                rotated=done.changed,
            )

    def revoke_token(self, job: str, silo: str) -> None:
        """Refuse `silo`'s tokens from now on, until a rotation issues a new one."""
        with self._write(job) as tx:
            self._job(tx.s, job, lock=True)
            identity.revoke(self._silo(tx.s, job, silo), tx.now)

    @staticmethod
    def _silo(s: Session, job: str, silo: str) -> SiloRow:
        row = s.get(SiloRow, (job, silo))
        if row is None:
            raise NotFound(f"job {job!r} has no silo named {silo!r}")
        return row

    def join(self, job: str, silo: str, req: m.JoinRequest) -> m.JoinResponse:
        with self._write(job) as tx:
            row = self._job(tx.s, job, lock=True)
            silo_row = self._silo(tx.s, job, silo)
            if silo_row.joined_at is not None:  # a re-join (restart): the first declaration is the cap
                _check_declared(silo_row, req)
            silo_row.joined_at = silo_row.joined_at or tx.now
            silo_row.last_seen = tx.now
            silo_row.state = "joined"
            silo_row.n_train_examples, silo_row.n_eval_examples = req.n_train_examples, req.n_eval_examples
            silo_row.throughput = req.throughput_examples_per_second
            tx.s.flush()
            transitions.maybe_start(tx, row, self.metrics)
            joined = tx.s.scalar(select(func.count()).where(SiloRow.job == job, SiloRow.joined_at.is_not(None)))
            tx.on_commit(lambda: self.metrics.silos_joined.labels(job).set(joined or 0))
            return m.JoinResponse(job=specs.of(row).silo_view(silo), role=silo_row.role)  # type: ignore[arg-type]

    def task(self, job: str, silo: str, token: str) -> m.Task:
        """What `silo` (if `token` is its token) should do now. A read: that it asked, and the state
        change its answer implies, are remembered and written in `write_polls`'s batch."""
        with self.sessions() as s:  # no engine lock: polls never wait behind an aggregation
            silo_row, row, current = self._polled(s, job, silo, token)
            if silo_row.joined_at is None:
                raise Conflict("join the job first", "not_joined")
            parsed = specs.of(row)
            task = transitions.next_task(s, row, current, silo_row, parsed)
            state = {"train": "training", "evaluate": "evaluating", "done": "done"}.get(task.action, silo_row.state)
        self.remember_poll(job, silo, Move(silo_row.state, state) if state != silo_row.state else None)
        return task

    # ---- adapters -------------------------------------------------------------------

    def put_initial(self, job: str, silo: str, body: Staged) -> str:
        """The initial adapter fixes every later upload's layout: only a trainer of the global
        rank may send it, once; the same adapter again is a no-op, a different one a 409.
        Consumes `body` (a staged file): it is removed whatever the outcome."""
        try:
            return self._put_initial(job, silo, body)
        finally:
            self.blobs.discard(body)

    def _put_initial(self, job: str, silo: str, body: Staged) -> str:
        with self.sessions() as s:  # a read: the parse cache, not the engine's locked state
            spec = specs.job_of(self._job(s, job)).spec
            silo_row = self._silo(s, job, silo)
        rank = spec.silo(silo).rank if silo in {x.name for x in spec.silos} else None
        if silo_row.role != "trainer" or rank not in (None, spec.peft.r):
            raise Forbidden("only a trainer of the global rank peft.r sends the initial adapter", "not_allowed")
        try:
            state = validate_initial(body, spec.aggregation.max_update_bytes)
        except AdapterError as exc:
            self.metrics.updates_rejected.labels(job, exc.reason).inc()
            raise refusal(exc) from None
        payload = to_bytes(state)
        with self._write(job) as tx:
            row = self._job(tx.s, job, lock=True)
            existing = tx.s.get(VersionRow, (job, 0))
            if existing is not None:
                if existing.sha256 == sha256(payload):  # a retry, or a trainer with the same seed
                    return existing.sha256
                raise Conflict("the job already has a different initial adapter (version 0)", "initial_exists")
            digest = self.blobs.put(payload)
            tx.s.add(VersionRow(job=job, version=0, sha256=digest, n_bytes=len(payload), created_at=tx.now))
            row.version = 0
            tx.s.flush()
            transitions.maybe_start(tx, row, self.metrics)
            return digest

    def upload_limit(self, job: str) -> int:
        """The largest upload body `job` takes: maxUpdateBytes; a secure job's masked update has
        8 bytes a parameter, so up to 8 times a plain (at least 1 byte a parameter) one."""
        with self.sessions() as s:
            aggregation = specs.job_of(self._job(s, job)).spec.aggregation
        return aggregation.max_update_bytes * (8 if aggregation.secure else 1)

    def adapter(self, job: str, version: int) -> tuple[bytes, str]:
        with self.sessions() as s:
            self._job(s, job)
            v = s.get(VersionRow, (job, version))
            if v is None:
                raise NotFound(f"job {job!r} has no adapter version {version}")
            data = self.blobs.get(v.sha256)
        self.metrics.sent_bytes.labels(job).inc(len(data))
        return data, v.sha256

    def submit_update(self, job: str, up: Incoming) -> m.UpdateAccepted:
        """Validate and fsync outside the lock, then accept inside one fenced transaction.

        Consumes `up.body`: adopted as the update's blob when accepted, removed otherwise.
        At most `ingest_slots` uploads hold their parsed tensors at once, whatever the number
        of concurrent uploads (their bodies wait on disk).
        """
        try:
            return self._submit(job, up)
        finally:
            self.blobs.discard(up.body)

    def _submit(self, job: str, up: Incoming) -> m.UpdateAccepted:
        try:
            with self.sessions() as s:
                row = self._job(s, job)
                if row.version < 0:
                    raise Conflict("the job has no initial adapter yet", "wrong_round")
                # the schema and limit, without waiting behind another upload's transaction (`accept` re-checks)
                live = self._live.get(job)
                if live is None or live.schema is None or live.revision != row.document_sha:
                    with self._lock:
                        live = self._live_for(s, row)
                schema, limit, spec = live.schema, live.job.spec.aggregation.max_update_bytes, live.job.spec
                hooks = live.strategy.client_config()
                rnd = s.get(RoundRow, (job, row.current_round))
                masked = rnd is not None and rnd.secagg is not None and rnd.number == up.round
            assert schema is not None
            self.blobs.sync(up.body)  # the costly half of durability, in parallel with other uploads
            with self._slots:
                delta = (
                    parse_masked(up, secure.layout(schema, hooks).size)
                    if masked
                    else parse(up, schema, limit, spec.codec_for(up.silo), hooks)
                )
                with self._write(job) as tx:
                    row = self._job(tx.s, job, lock=True)
                    live = self._live_for(tx.s, row, with_acc=True)
                    answer, complete = accept(tx, row, live, up, delta, self.blobs)
                    if not answer.duplicate:
                        tx.on_commit(lambda: self._count_upload(job, up))
                    if complete:
                        tx.on_commit(self.wakeup.set)
                del delta
            return answer
        except EngineError as exc:
            if not isinstance(exc, Unavailable):  # "try again" is not a rejection
                self.metrics.updates_rejected.labels(job, exc.reason).inc()
            raise

    def _count_upload(self, job: str, up: Incoming) -> None:
        self.metrics.received_bytes.labels(job).inc(up.body.size)
        self.metrics.updates_accepted.labels(job).inc()
        if not self.metrics.per_silo:
            return
        self.metrics.silo_examples.labels(job, up.silo).set(up.n_examples)
        if up.train_seconds is not None:
            self.metrics.silo_train_seconds.labels(job, up.silo).set(up.train_seconds)

    # ---- evaluations ----------------------------------------------------------------

    def submit_metrics(self, job: str, silo: str, report: m.MetricsReport) -> None:
        with self._write(job) as tx:
            s = tx.s
            self._job(s, job)
            _check_report(self._silo(s, job, silo), report)
            if s.get(VersionRow, (job, report.version)) is None:
                raise Conflict(f"version {report.version} does not exist yet", "wrong_version")
            if s.get(EvaluationRow, (job, report.version, silo, report.split)) is None:
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
                        at=tx.now,
                    )
                )
            silo_row = s.get(SiloRow, (job, silo))
            move = self.pending_move(job, silo)  # the poll that handed out this evaluation, maybe unwritten
            if silo_row is not None and (move.to if move else silo_row.state) == "evaluating":
                silo_row.state = "joined"
            s.flush()
            latest = report.version == reads.latest_evaluated(s, job)
            headline = reads.headline(s, job, report.version) if latest else None
            tx.on_commit(lambda: self._publish_metrics(job, silo, report, headline))

    def _publish_metrics(
        self, job: str, silo: str, report: m.MetricsReport, headline: tuple[str, float, float | None] | None
    ) -> None:
        if self.metrics.per_silo:
            self.metrics.silo_loss.labels(job, silo, report.split).set(report.loss)
            if report.accuracy is not None:
                self.metrics.silo_accuracy.labels(job, silo, report.split).set(report.accuracy)
        if headline is not None:
            split, loss, accuracy = headline
            self.metrics.global_loss.labels(job, split).set(loss)
            if accuracy is not None:
                self.metrics.global_accuracy.labels(job, split).set(accuracy)

    # ---- read models ----------------------------------------------------------------

    def status(self, job: str, silo: str | None = None) -> m.JobStatus:
        """The job's status; a silo (`silo` set) sees only its own record among the silos."""
        with self.sessions() as s:
            status = reads.status(s, self._job(s, job))
        return status if silo is None else views.silo_status(status, silo)

    def history(self, job: str, silo: str | None = None) -> list[m.RoundInfo]:
        with self.sessions() as s:
            self._job(s, job)
            rounds = reads.history(s, job)
        return rounds if silo is None else views.silo_history(rounds, silo)

    def evaluations(self, job: str) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return reads.evaluations(s, self._job(s, job))

    def ensure_job(self, job_document: dict[str, Any], tokens: dict[str, str]) -> None:
        """Create the job from a start-up file unless it exists; a changed file is applied as a patch."""
        try:
            job = parse_job(job_document)
        except SpecError as exc:
            raise SystemExit(f"FEDSILO_JOB_FILE is not a valid FederatedJob:\n{exc}") from None
        name = job.metadata.name
        with self.sessions() as s:
            existing = s.get(JobRow, name)
            current = (existing.pending_document or existing.document) if existing is not None else None
        if current is None:
            self.create_job(job, tokens)
        elif current != dump_job(job):
            self.patch_job(name, m.PatchJob(job=job, silo_tokens=tokens))
        else:
            with self._write(name):  # take the lease now: a second aggregator learns it at once
                pass


def _check_declared(row: SiloRow, req: m.JoinRequest) -> None:
    """Example counts weight a silo's updates: a silo cannot raise what it declared at its first join."""
    if req.n_train_examples > row.n_train_examples or req.n_eval_examples > row.n_eval_examples:
        raise Conflict(
            f"silo {row.name!r} declared {row.n_train_examples} training / {row.n_eval_examples} evaluation "
            f"examples when it first joined and cannot declare more ({req.n_train_examples} / "
            f"{req.n_eval_examples}); the job's admin can remove and re-add it",
            "declared_examples",
        )


def _check_report(row: SiloRow, report: m.MetricsReport) -> None:
    """Test metrics (the job's headline) come only from evaluators, validation only from trainers,
    each counting no more examples than the silo declared."""
    expected = "test" if row.role == "evaluator" else "validation"
    if report.split != expected:
        raise Forbidden(f"a {row.role} silo reports split {expected!r}, not {report.split!r}", "wrong_split")
    if report.n_examples > row.n_eval_examples:
        raise Invalid(
            f"n_examples={report.n_examples} exceeds the {row.n_eval_examples} evaluation examples "
            f"silo {row.name!r} declared when it joined",
            "examples_exceed_declared",
        )
