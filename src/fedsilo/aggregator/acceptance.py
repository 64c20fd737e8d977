"""The upload-acceptance path: one silo's update for one round, exactly once.

`parse` runs outside the engine lock (checksum, safetensors, finiteness) on the body as it
was streamed to a file (`blobs.Staged`); `accept` runs inside the job's write transaction:
it decides duplicate / late / accepted, adopts the already fsynced file as the update's
blob (a rename: durable before its row), adds the row, and folds the delta into the
accumulator as the very last step, marking the transaction dirty so a failed commit drops
the fold. A refused upload's file is never adopted: it cannot leave a blob behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from fedsilo.adapters import AdapterError, Schema, check_schema
from fedsilo.aggregator import secure
from fedsilo.aggregator.blobs import Blobs, Staged
from fedsilo.aggregator.errors import Conflict, Forbidden, Invalid, TooLarge, Unavailable
from fedsilo.aggregator.lifecycle import (
    Live,
    MaskedSum,
    Phase,
    RoundState,
    Tx,
    fold,
    round_complete,
    secure_weight,
)
from fedsilo.aggregator.store import JobRow, RoundRow, SiloRow, UpdateRow
from fedsilo.aggregator.uploads import Delta, validate_update
from fedsilo.api import models as m
from fedsilo.codecs import PLAIN
from fedsilo.spec import CodecSpec
from fedsilo.strategies import ClientConfig


@dataclass(frozen=True)
class Incoming:
    """One silo's upload for one round, as it arrived (before any validation): the body is a staged file."""

    silo: str
    round: int
    body: Staged
    claimed_sha256: str
    n_examples: int
    train_seconds: float | None = None
    examples_seen: int | None = None


def refusal(exc: AdapterError) -> Invalid:
    return TooLarge(str(exc), exc.reason) if exc.reason == "too_large" else Invalid(str(exc), exc.reason)


def parse(
    up: Incoming, schema: Schema, max_bytes: int, codec: CodecSpec = PLAIN, hooks: ClientConfig | None = None
) -> Delta:
    """Every check that needs no job state: size, checksum, safetensors, names/shapes/dtypes, finite."""
    if up.n_examples < 1:
        raise Invalid("X-Fedsilo-Examples must be a positive integer", "bad_examples")
    try:
        return validate_update(up.body, up.claimed_sha256, schema, max_bytes, codec, hooks)
    except AdapterError as exc:
        raise refusal(exc) from None


def parse_masked(up: Incoming, size: int) -> np.ndarray:
    """A secure round's upload: exactly `size` little-endian uint64 ring elements, checksummed."""
    if up.n_examples < 1:
        raise Invalid("X-Fedsilo-Examples must be a positive integer", "bad_examples")
    if up.body.sha256 != up.claimed_sha256.lower():
        raise Invalid("the body does not match X-Fedsilo-Sha256", "checksum")
    if up.body.size != 8 * size:
        raise Invalid(f"a masked update has {8 * size} bytes ({size} ring elements), got {up.body.size}", "bad_masked")
    return np.fromfile(up.body.path, dtype="<u8").astype(np.uint64)


def _previous(tx: Tx, job: str, up: Incoming) -> UpdateRow | None:
    """The update this silo already sent for this round (sync) or from this base version (async)."""
    found = tx.s.get(UpdateRow, (job, up.round, up.silo))
    if found is None:
        query = select(UpdateRow).where(
            UpdateRow.job == job, UpdateRow.silo == up.silo, UpdateRow.base_version == up.round - 1
        )
        found = tx.s.scalars(query).first()
    return found


def accept(
    tx: Tx, row: JobRow, live: Live, up: Incoming, delta: Delta | np.ndarray, blobs: Blobs
) -> tuple[m.UpdateAccepted, bool]:
    """Accept `delta` (a masked vector in a secure round) into the job's open round.

    Returns the answer and whether the round is now complete (ready to aggregate).
    """
    previous = _previous(tx, row.name, up)
    if previous is not None:
        if previous.sha256 == up.claimed_sha256.lower():
            return m.UpdateAccepted(round=previous.round, sha256=previous.sha256, duplicate=True), False
        raise Conflict(f"silo {up.silo!r} already sent a different update for round {up.round}", "duplicate")
    aggregation = live.job.spec.aggregation
    rnd = tx.s.get(RoundRow, (row.name, row.current_round))
    if aggregation.mode == "async" and rnd is not None and rnd.state == RoundState.AGGREGATING:
        # the buffer is full and closing: in a moment this update fits the next one
        raise Unavailable(f"buffer {rnd.number} is being aggregated; send again in a moment", "aggregating")
    if row.phase != Phase.RUNNING or rnd is None or rnd.state != RoundState.OPEN:
        raise Conflict(f"round {up.round} is not open (current round {row.current_round}, {row.phase})", "wrong_round")
    staleness = row.current_round - up.round
    if (aggregation.mode == "sync" and staleness != 0) or staleness < 0:
        raise Conflict(f"round {up.round} is not open (current round {row.current_round})", "wrong_round")
    if staleness > aggregation.max_staleness:
        raise Conflict(
            f"update trained from version {up.round - 1} is {staleness} versions stale "
            f"(aggregation.maxStaleness is {aggregation.max_staleness})",
            "stale",
        )
    if up.silo not in rnd.participants:
        raise Forbidden(f"silo {up.silo!r} is not sampled for round {rnd.number}", "not_participant")
    silo_row = tx.s.get(SiloRow, (row.name, up.silo))
    assert silo_row is not None
    if up.n_examples > silo_row.n_train_examples:  # the weight of an update is capped by the declaration
        raise Invalid(
            f"X-Fedsilo-Examples={up.n_examples} exceeds the {silo_row.n_train_examples} training examples "
            f"silo {up.silo!r} declared when it joined",
            "examples_exceed_declared",
        )
    assert live.schema is not None and live.acc is not None
    masked = rnd.secagg is not None
    if masked:
        secure.check_upload(rnd, up.silo)
        if not isinstance(delta, np.ndarray) or not isinstance(live.acc, MaskedSum):
            raise Conflict(f"round {rnd.number} is secure: send a masked update", "wrong_stage")
    elif isinstance(delta, np.ndarray):
        raise Conflict(f"round {rnd.number} is not secure: send a plain update", "wrong_stage")
    else:
        try:
            check_schema(delta.state, live.schema)  # the schema the parse saw may predate a takeover
        except AdapterError as exc:
            raise refusal(exc) from None
    digest = blobs.adopt(up.body)  # fsynced before the lock: here only the rename and the folder's fsync
    tx.s.add(
        UpdateRow(
            job=row.name,
            round=rnd.number,
            silo=up.silo,
            sha256=digest,
            n_examples=up.n_examples,
            n_bytes=up.body.size,
            train_seconds=up.train_seconds,
            received_at=tx.now,
            base_version=up.round - 1,
        )
    )
    silo_row.state, silo_row.rounds_completed = "uploaded", silo_row.rounds_completed + 1
    if up.train_seconds and up.examples_seen:
        silo_row.throughput = up.examples_seen / up.train_seconds
    tx.s.flush()
    received = tx.s.scalars(select(UpdateRow.silo).where(UpdateRow.job == row.name, UpdateRow.round == rnd.number))
    if masked:
        secure.uploaded(tx, rnd, list(received))
        complete = False  # a secure round aggregates after its unmasking stage
    else:
        complete = round_complete(aggregation, list(rnd.participants), list(received))
        if complete:
            rnd.state = RoundState.AGGREGATING
    tx.dirty = True  # from here on the accumulator holds an uncommitted fold
    try:
        if isinstance(delta, np.ndarray):
            live.acc.add(delta, secure_weight(up.n_examples, live.job))
        else:
            fold(live, live.acc, delta.to_fold(blobs.path(digest)), up.n_examples, staleness)
    except AdapterError as exc:
        raise refusal(exc) from None
    except ValueError as exc:
        raise Invalid(str(exc), "rejected_by_strategy") from None
    return m.UpdateAccepted(round=rnd.number, sha256=digest, duplicate=False), complete
