"""The round engine: the one place that changes a job, one fenced transaction at a time.

Every change runs in `_write(job)`: lock the job's lease (see `lease.py`), change rows,
commit, and only then touch memory, files and metrics (`Tx.on_commit`). In-memory state
(`Live`: parsed spec, strategy, global adapter, accumulator) is derived from committed
rows and dropped whenever a transaction that changed it rolls back, so a retry after any
failure sees exactly what was committed and an accepted update counts exactly once.
Rounds close in the background (`tick`), never inside an uploader's request.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fedsilo import strategies
from fedsilo.adapters import AdapterError, State, from_bytes, schema_of, sha256, to_bytes
from fedsilo.aggregator import budget, changes, identity, lease, reads, secure, specs, transitions, views
from fedsilo.aggregator.acceptance import Incoming, accept, parse, parse_masked, refusal
from fedsilo.aggregator.blobs import Blobs, Staged
from fedsilo.aggregator.errors import Conflict, EngineError, Fenced, Forbidden, Invalid, NotFound, Unavailable
from fedsilo.aggregator.lifecycle import (
    Live,
    MaskedSum,
    Phase,
    RoundState,
    Tx,
    fold,
    secure_weight,
    update_weight,
)
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.store import (
    EvaluationRow,
    JobRow,
    RoundRow,
    SiloRow,
    UpdateRow,
    VersionRow,
    aware,
    utcnow,
)
from fedsilo.aggregator.uploads import accepted_delta, validate_initial
from fedsilo.api import models as m
from fedsilo.privacy import dp as privacy_dp
from fedsilo.privacy import secagg
from fedsilo.privacy.vectors import unflatten
from fedsilo.spec import FederatedJob, SpecError, document_digest, dump_job, parse_job
from fedsilo.strategies import WeightedSum

__all__ = ["Engine", "Incoming"]

log = logging.getLogger("fedsilo.aggregator")
SEEN_EVERY = timedelta(seconds=15)  # last_seen is written at most this often: polls stay read-only


class Engine:
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
        with self._lock, self.sessions.begin() as s:
            for job in self._epochs:
                lease.release(s, job, self.holder, self.clock())
            self._epochs.clear()

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
            return specs.of(row).silo_view(silo)[1]

    def job_names(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(JobRow.name)))

    # ---- silos ----------------------------------------------------------------------

    def authenticate(self, job: str, silo: str, token: str) -> identity.Role:
        """The role of the silo `token` belongs to (see `identity.verify`)."""
        with self.sessions() as s:
            if s.get(JobRow, job) is None:
                raise NotFound(f"no job named {job!r}")
            return identity.verify(s.get(SiloRow, (job, silo)), token, self.clock())

    def rotate_token(self, job: str, silo: str, req: m.RotateToken) -> m.TokenIssued:
        """A new token for `silo`; the current one stays valid for `req.grace_seconds`."""
        with self._write(job) as tx:
            self._job(tx.s, job, lock=True)
            row = self._silo(tx.s, job, silo)
            expires_in = timedelta(seconds=req.expires_in_seconds) if req.expires_in_seconds is not None else None
            done = identity.rotate(row, req.token, timedelta(seconds=req.grace_seconds), expires_in, tx.now)
            return m.TokenIssued(
                silo=silo, token=done.token, previous_valid_until=done.previous_valid_until,
                expires_at=done.expires_at, rotated=done.changed,
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
            return m.JoinResponse(job=specs.of(row).silo_view(silo)[0], role=silo_row.role)  # type: ignore[arg-type]

    def task(self, job: str, silo: str) -> m.Task:
        """What `silo` should do now. A read: it writes only when the silo's state changes."""
        with self.sessions() as s:  # no engine lock: polls never wait behind an aggregation
            row = self._job(s, job)
            silo_row = s.get(SiloRow, (job, silo))
            assert silo_row is not None
            if silo_row.joined_at is None:
                raise Conflict("join the job first", "not_joined")
            parsed = specs.of(row)
            task = transitions.next_task(s, row, silo_row, parsed.job, parsed.hooks)
            state = {"train": "training", "evaluate": "evaluating", "done": "done"}.get(task.action, silo_row.state)
            now = self.clock()
            stale = silo_row.last_seen is None or now - aware(silo_row.last_seen) > SEEN_EVERY  # type: ignore[operator]
        if state != silo_row.state or stale:
            try:
                with self._write(job) as tx:
                    tx.s.execute(
                        update(SiloRow)
                        .where(SiloRow.job == job, SiloRow.name == silo)
                        .values(state=state, last_seen=tx.now)
                    )
            except Fenced:
                pass  # bookkeeping only; the lease holder answers the silo's next call
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

    # ---- secure aggregation's stages ------------------------------------------------

    def _secure_round(self, s: Session, job: str, number: int) -> RoundRow:
        self._job(s, job)
        rnd = s.get(RoundRow, (job, number))
        if rnd is None or rnd.secagg is None:
            raise NotFound(f"job {job!r} has no secure round {number}", "not_secure")
        return rnd

    def secagg_stage(self, job: str, number: int) -> str:
        with self.sessions() as s:
            rnd = self._secure_round(s, job, number)
            return "closed" if rnd.state == RoundState.CLOSED else secure.stage(rnd)

    def secagg_view(self, job: str, silo: str, number: int) -> m.SecAggView:
        with self.sessions() as s:
            return secure.view(s, self._secure_round(s, job, number), silo)

    def secagg_keys(self, job: str, silo: str, number: int, keys: m.SecAggKeys) -> None:
        with self._write(job) as tx:
            secure.post_keys(tx, self._secure_round(tx.s, job, number), silo, keys)

    def secagg_shares(self, job: str, silo: str, number: int, shares: m.SecAggShares) -> None:
        with self._write(job) as tx:
            secure.post_shares(tx, self._secure_round(tx.s, job, number), silo, shares)

    def secagg_reveal(self, job: str, silo: str, number: int, reveal: m.SecAggReveal) -> None:
        with self._write(job) as tx:
            if secure.post_reveal(tx, self._secure_round(tx.s, job, number), silo, reveal):
                tx.on_commit(self.wakeup.set)

    # ---- round transitions ----------------------------------------------------------

    def _close_round(self, tx: Tx, row: JobRow, rnd: RoundRow) -> None:
        """Aggregate the round's committed updates into the next global adapter."""
        live = self._live_for(tx.s, row, with_acc=True)
        assert live.global_state is not None
        started = time.perf_counter()
        server_state: State = from_bytes(self.blobs.get(row.server_state_sha)) if row.server_state_sha else {}
        tx.dirty = True  # aggregate may consume the accumulator
        acc = live.acc
        if isinstance(acc, MaskedSum):  # remove the masks: the aggregator learns the sum, nothing else
            assert acc.ring is not None and live.schema is not None
            lay = secure.layout(live.schema, live.strategy.client_config())
            total = unflatten(secagg.decode(secure.unmask(tx.s, rnd, acc.ring)), lay)
            acc = WeightedSum(total=total, weight=acc.weight, count=acc.count)
        dp = live.job.spec.privacy.dp
        if isinstance(acc, WeightedSum) and dp is None:  # DP: a rescale would raise the sensitivity past C
            contributions = self._rank_contributions(tx.s, row, rnd, live)
            strategies.rescale_components(acc.total, contributions, live.job.spec.peft.r)
        if dp is not None and rnd.secagg is None:  # central DP: the aggregator adds the noise
            noise = privacy_dp.gaussian(acc.total, privacy_dp.central_std(dp.noise_multiplier, dp.clip_norm))
            for name, tensor in noise.items():
                acc.total[name].add_(tensor)
        result = live.strategy.aggregate(live.global_state, acc, server_state)
        data = to_bytes(result.state)
        digest = self.blobs.put(data)
        if result.server_state:
            row.server_state_sha = self.blobs.put(to_bytes(result.server_state))
        seconds = time.perf_counter() - started
        tx.s.add(VersionRow(job=row.name, version=rnd.number, sha256=digest, n_bytes=len(data), created_at=tx.now))
        rnd.state, rnd.closed_at, rnd.aggregation_seconds = RoundState.CLOSED, tx.now, seconds
        rnd.metrics = {**(rnd.metrics or {}), **{k: float(v) for k, v in result.metrics.items()}}
        if rnd.secagg is not None:
            rnd.secagg = {**rnd.secagg, "stage": "closed"}
        spent = budget.spend(tx, row, rnd, dp) if dp is not None else None
        row.version = rnd.number
        updates = list(
            tx.s.scalars(select(UpdateRow.sha256).where(UpdateRow.job == row.name, UpdateRow.round == rnd.number))
        )
        if rnd.number >= row.rounds:
            row.phase, row.finished_at = Phase.SUCCEEDED, tx.now
        elif dp is not None and budget.exhausted(tx, row, rnd, dp):
            pass  # stopped inside the privacy budget: `exhausted` finished the job and said why
        else:
            transitions.open_round(tx, row, rnd.number + 1, self.metrics)
        name, number, opened = row.name, rnd.number, aware(rnd.opened_at)

        def installed() -> None:
            if live is self._live.get(name):
                live.global_state, live.version, live.acc = result.state, number, None
            self.metrics.aggregation_duration.labels(name).observe(seconds)
            self.metrics.round_duration.labels(name).observe((tx.now - opened).total_seconds())  # type: ignore[operator]
            if spent is not None:
                self.metrics.privacy_epsilon.labels(name).set(spent)
            if "lora_truncation_error" in result.metrics:
                self.metrics.lora_truncation_error.labels(name).set(result.metrics["lora_truncation_error"])
            log.debug("job %s: round %d closed -> version %d (%.3fs aggregation)", name, number, number, seconds)

        tx.on_commit(installed)
        tx.on_commit(lambda: self._collect(updates))

    @staticmethod
    def _rank_contributions(s: Session, row: JobRow, rnd: RoundRow, live: Live) -> list[tuple[int, float]]:
        """(LoRA rank, fold weight) of every update folded into this round's sum."""
        spec = live.job.spec
        ranks = {silo.name: silo.rank or spec.peft.r for silo in spec.silos}
        out = []
        for u in s.scalars(select(UpdateRow).where(UpdateRow.job == row.name, UpdateRow.round == rnd.number)):
            if rnd.secagg is not None:
                weight = secure_weight(u.n_examples, live.job)
            else:
                staleness = rnd.number - 1 - (u.base_version if u.base_version is not None else rnd.number - 1)
                weight = update_weight(u.n_examples, staleness, spec.aggregation)
            out.append((ranks.get(u.silo, spec.peft.r), weight))
        return out

    @staticmethod
    def _needed(s: Session) -> set[str]:
        """Blobs a committed row still needs: versions, server state, updates of unclosed rounds.

        Update rows of closed rounds stay as history, but their files are no longer needed.
        """
        open_updates = select(UpdateRow.sha256).join(
            RoundRow, (RoundRow.job == UpdateRow.job) & (RoundRow.number == UpdateRow.round)
        )
        needed = set(s.scalars(open_updates.where(RoundRow.state != RoundState.CLOSED)))
        needed |= set(s.scalars(select(VersionRow.sha256)))
        needed |= {d for d in s.scalars(select(JobRow.server_state_sha)) if d}
        return needed

    def _collect(self, digests: list[str]) -> None:
        """After a round's close committed: delete its update files nothing else needs."""
        with self.sessions() as s:
            needed = self._needed(s)
        for digest in set(digests) - needed:
            self.blobs.delete(digest)

    def sweep(self, min_age_seconds: float = 600.0) -> int:
        """Remove blob files no committed row needs (orphans of failed transactions or crashes)."""
        with self.sessions() as s:
            needed = self._needed(s)
        removed = self.blobs.sweep(needed, min_age_seconds)
        if removed:
            log.info("swept %d unneeded blob file(s)", removed)
        return removed

    def tick(self) -> None:
        """Close ready rounds, enforce deadlines and start conditions; each job on its own."""
        for name in self.job_names():
            try:
                self._tick_job(name)
                self._fenced_logged.discard(name)
            except Fenced as exc:
                if name not in self._fenced_logged:
                    log.warning("%s", exc.detail)
                    self._fenced_logged.add(name)
            except Exception:
                log.exception("job %s: tick failed (other jobs go on)", name)

    def _due(self, name: str) -> bool:
        """A read-only look: does this job need a write now?"""
        with self.sessions() as s:
            row = self._job(s, name)
            if row.phase == Phase.PENDING:
                return row.version >= 0
            if row.phase != Phase.RUNNING:
                return False
            rnd = s.get(RoundRow, (name, row.current_round))
            if rnd is not None and rnd.secagg is not None:
                return rnd.state == RoundState.AGGREGATING or secure.due(rnd, self.clock())
            return rnd is not None and (
                rnd.state == RoundState.AGGREGATING
                or (rnd.state == RoundState.OPEN and self.clock() >= aware(rnd.deadline))  # type: ignore[operator]
            )

    def _tick_job(self, name: str) -> None:
        if not self._due(name):
            return
        with self._write(name) as tx:
            row = self._job(tx.s, name, lock=True)
            if row.phase == Phase.PENDING:
                transitions.maybe_start(tx, row, self.metrics)
            if row.phase != Phase.RUNNING:
                return
            rnd = tx.s.get(RoundRow, (name, row.current_round))
            if rnd is None or rnd.state == RoundState.CLOSED:
                return
            if rnd.state == RoundState.OPEN and rnd.secagg is not None:
                if not secure.due(rnd, tx.now):
                    return
                secure.expire(tx, row, rnd, specs.job_of(row).spec.aggregation.min_silos)
            elif rnd.state == RoundState.OPEN:
                if tx.now < aware(rnd.deadline):  # type: ignore[operator]
                    return
                transitions.deadline_passed(tx, row, rnd)
            if rnd.state == RoundState.AGGREGATING:
                self._close_round(tx, row, rnd)

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
            if silo_row is not None and silo_row.state == "evaluating":
                silo_row.state = "joined"
            s.flush()
            summary = reads.version_summary(s, job, report.version)
            latest = report.version == reads.latest_evaluated(s, job)
            tx.on_commit(lambda: self._publish_metrics(job, silo, report, summary if latest else None))

    def _publish_metrics(self, job: str, silo: str, report: m.MetricsReport, summary: dict[str, Any] | None) -> None:
        if self.metrics.per_silo:
            self.metrics.silo_loss.labels(job, silo, report.split).set(report.loss)
            if report.accuracy is not None:
                self.metrics.silo_accuracy.labels(job, silo, report.split).set(report.accuracy)
        if summary:
            self.metrics.global_loss.labels(job, summary["split"]).set(summary["loss"])
            if summary["accuracy"] is not None:
                self.metrics.global_accuracy.labels(job, summary["split"]).set(summary["accuracy"])

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
