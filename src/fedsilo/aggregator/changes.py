"""What an admin changes in a job (`PATCH /v1/jobs/{job}`), inside one write transaction.

Rounds, a resume of a Failed job, and a whole new job document: added silos are admitted
with their tokens, removed silos revoked at once, aggregation changes wait for the next
round (`JobRow.pending_document`) as silos' codec changes do, and what running silos loaded at
start cannot change.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from fedsilo import strategies
from fedsilo.aggregator import budget, identity, secure, specs
from fedsilo.aggregator.errors import Conflict, Invalid
from fedsilo.aggregator.lifecycle import Phase, RoundState, Tx, immutable_changes, round_complete, with_aggregation
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.store import JobRow, RoundRow, SiloRow
from fedsilo.aggregator.transitions import open_round, received, sample
from fedsilo.spec import FederatedJob, dump_job, parse_job

log = logging.getLogger("fedsilo.aggregator")


def check_tokens(tokens: dict[str, str], names: set[str]) -> None:
    unknown = sorted(set(tokens) - names)
    if unknown:
        raise Invalid(f"silo_tokens names silos not in the job: {unknown}", "invalid_spec")
    short = sorted(n for n, t in tokens.items() if len(t) < identity.MIN_TOKEN_LENGTH)
    if short:
        raise Invalid(f"silo tokens must have at least {identity.MIN_TOKEN_LENGTH} characters: {short}", "invalid_spec")


def set_rounds(tx: Tx, row: JobRow, rounds: int, metrics: Metrics) -> None:
    if rounds < row.current_round:
        raise Invalid(f"rounds={rounds} is below the current round {row.current_round}", "invalid")
    reopen = row.phase == Phase.SUCCEEDED and row.version < rounds
    dp = specs.job_of(row).spec.privacy.dp
    if reopen and dp is not None:
        budget.refuse_more_rounds(tx.s, row, dp)
    row.rounds = rounds
    if reopen:
        row.phase, row.finished_at = Phase.RUNNING, None
        open_round(tx, row, row.version + 1, metrics)
    name = row.name
    tx.on_commit(lambda: metrics.rounds_total_planned.labels(name).set(rounds))


def resume(tx: Tx, row: JobRow, metrics: Metrics) -> None:
    """Failed -> Running: the failed round reopens with a new deadline and a fresh sample,
    keeping the updates it had accepted."""
    if row.phase != Phase.FAILED:
        raise Conflict(f"job {row.name!r} is {row.phase}, not Failed: nothing to resume", "not_failed")
    spec = specs.job_of(row).spec
    rnd = tx.s.get(RoundRow, (row.name, row.current_round))
    row.phase, row.finished_at, row.message = Phase.RUNNING, None, ""
    if rnd is None or rnd.state == RoundState.CLOSED:
        open_round(tx, row, row.current_round + 1 if rnd is not None else 1, metrics)
        return
    rnd.deadline = tx.now + timedelta(seconds=spec.aggregation.round_timeout_seconds)
    if rnd.secagg is not None:
        rnd.participants = sample(tx.s, row, rnd.number)
        secure.restart(tx, rnd, spec.aggregation)
        tx.dirty = True  # the accumulator folded updates that are gone now
        log.info("job %s: resumed at secure round %d, which starts over", row.name, rnd.number)
        return
    got = received(tx.s, row.name, rnd.number)
    rnd.participants = sorted(set(got) | set(sample(tx.s, row, rnd.number)))
    log.info("job %s: resumed at round %d", row.name, rnd.number)


def change_spec(tx: Tx, row: JobRow, new: FederatedJob, tokens: dict[str, str]) -> bool:
    """Apply a new job document; returns whether the open round became complete (silos removed)."""
    if new.metadata.name != row.name:
        raise Invalid(f"the document names job {new.metadata.name!r}, not {row.name!r}", "invalid_spec")
    try:
        strategies.create(new.spec.aggregation.strategy, new.spec.aggregation.params)
    except ValueError as exc:
        raise Invalid(f"spec.aggregation: {exc}", "invalid_spec") from None
    current = parse_job(row.pending_document or row.document)
    problems = immutable_changes(current.spec, new.spec)
    if problems:
        raise Invalid(f"cannot change {', '.join(problems)} of a job that has started; create a new job", "immutable")
    old_names, new_names = {s.name for s in current.spec.silos}, {s.name for s in new.spec.silos}
    added, removed = new_names - old_names, old_names - new_names
    missing = sorted(added - set(tokens))
    if missing:
        raise Invalid(f"silo_tokens must carry a token for every added silo: {missing}", "invalid_spec")
    check_tokens({n: t for n, t in tokens.items() if n in added}, added)
    for silo in new.spec.silos:
        if silo.name not in added:
            continue
        existing = tx.s.get(SiloRow, (row.name, silo.name))
        if existing is None:
            token_hash = identity.token_hash(tokens[silo.name])
            tx.s.add(SiloRow(job=row.name, name=silo.name, role=silo.role, token_hash=token_hash))
        else:  # re-added after a removal: a new token, a clean record
            identity.readmit(existing, tokens[silo.name])
            existing.role, existing.joined_at = silo.role, None  # it joins (and declares its data) anew
    for name in removed:
        silo_row = tx.s.get(SiloRow, (row.name, name))
        if silo_row is not None:
            silo_row.revoked_at = tx.now
    new_document = dump_job(new)
    row.document = dump_job(with_aggregation(new, specs.job_of(row).spec))
    row.pending_document = new_document if new_document != row.document else None
    if row.phase != Phase.RUNNING and row.pending_document is not None:  # no round to finish first
        row.document, row.pending_document = row.pending_document, None
    tx.dirty = True
    log.info(
        "job %s: spec changed (added %s, removed %s, aggregation change pending: %s)",
        row.name,
        sorted(added),
        sorted(removed),
        row.pending_document is not None,
    )
    return bool(removed) and row.phase == Phase.RUNNING and _drop_from_round(tx, row, removed)


def _drop_from_round(tx: Tx, row: JobRow, removed: set[str]) -> bool:
    """The open round stops waiting for removed silos (their accepted updates stay)."""
    rnd = tx.s.get(RoundRow, (row.name, row.current_round))
    if rnd is None or rnd.state != RoundState.OPEN or rnd.secagg is not None:
        return False  # a secure round treats a removed silo as a dropout (its stages time out)
    got = received(tx.s, row.name, rnd.number)
    rnd.participants = [p for p in rnd.participants if p not in removed or p in got]
    aggregation = specs.job_of(row).spec.aggregation
    if got and round_complete(aggregation, list(rnd.participants), got):
        rnd.state = RoundState.AGGREGATING
        return True
    return False
