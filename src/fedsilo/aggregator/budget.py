"""The differential-privacy budget: epsilon after every closed round, and the stop before the target.

Each closed round records its noise multiplier and sampling rate (participants over the
trainers that could have been sampled) in its metrics, so epsilon is recomputed from what
really happened, by Opacus' accountant, never from what the spec planned.
"""

from __future__ import annotations

import logging
import math

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedsilo.aggregator.errors import Conflict, Invalid
from fedsilo.aggregator.lifecycle import Phase, RoundState, Tx
from fedsilo.aggregator.store import JobRow, RoundRow, SiloRow
from fedsilo.api import models as m
from fedsilo.privacy.dp import Round, epsilon
from fedsilo.spec import DPSpec, FederatedJobSpec

log = logging.getLogger("fedsilo.aggregator")


def _history(s: Session, job: str, before: int) -> list[Round]:
    query = select(RoundRow.metrics).where(
        RoundRow.job == job, RoundRow.number < before, RoundRow.state == RoundState.CLOSED
    )
    rows = s.scalars(query.order_by(RoundRow.number))
    return [(float(r["dp_noise_multiplier"]), float(r["dp_sample_rate"])) for r in rows if "dp_sample_rate" in r]


def _sample_rate(s: Session, row: JobRow, rnd: RoundRow) -> float:
    query = select(SiloRow.name).where(SiloRow.job == row.name, SiloRow.role == "trainer", SiloRow.revoked_at.is_(None))
    eligible = len(set(s.scalars(query)) | set(rnd.participants))
    return min(1.0, len(rnd.participants) / max(1, eligible))


def spend(tx: Tx, row: JobRow, rnd: RoundRow, dp: DPSpec) -> float:
    """Record round `rnd`'s privacy cost; returns epsilon at dp.delta after it."""
    q = _sample_rate(tx.s, row, rnd)
    spent = epsilon([*_history(tx.s, row.name, rnd.number), (dp.noise_multiplier, q)], dp.delta, dp.accountant)
    rnd.metrics = {**(rnd.metrics or {}), "dp_noise_multiplier": dp.noise_multiplier, "dp_sample_rate": q}
    rnd.metrics["epsilon"] = spent if math.isfinite(spent) else -1.0  # JSON has no infinity
    return spent


def exhausted(tx: Tx, row: JobRow, rnd: RoundRow, dp: DPSpec) -> bool:
    """Would one more round spend more than the target? `stop` finishes the job here; `warn` says so."""
    if dp.target_epsilon is None:
        return False
    history = [*_history(tx.s, row.name, rnd.number), (dp.noise_multiplier, _sample_rate(tx.s, row, rnd))]
    after_next = epsilon([*history, history[-1]], dp.delta, dp.accountant)
    if after_next <= dp.target_epsilon:
        return False
    spent = epsilon(history, dp.delta, dp.accountant)
    if dp.on_target == "stop":
        row.phase, row.finished_at = Phase.SUCCEEDED, tx.now
        row.message = (
            f"stopped after round {rnd.number} of {row.rounds}: privacy budget (epsilon {spent:.3g} spent; "
            f"round {rnd.number + 1} would reach {after_next:.3g} > targetEpsilon {dp.target_epsilon:g} "
            f"at delta {dp.delta:g})"
        )
        log.warning("job %s: %s", row.name, row.message)
        return True
    row.message = (
        f"privacy budget: round {rnd.number + 1} takes epsilon to {after_next:.3g} "
        f"> targetEpsilon {dp.target_epsilon:g} (onTarget: warn, so the job goes on)"
    )
    log.warning("job %s: %s", row.name, row.message)
    return False


def refuse_more_rounds(s: Session, row: JobRow, dp: DPSpec) -> None:
    """A job stopped at its privacy target stays stopped: more rounds would spend past it."""
    if dp.target_epsilon is None or dp.on_target != "stop":
        return
    history = _history(s, row.name, row.current_round + 1)
    if not history:
        return
    after_next = epsilon([*history, history[-1]], dp.delta, dp.accountant)
    if after_next > dp.target_epsilon:
        raise Conflict(
            f"one more round would take epsilon to {after_next:.3g} > targetEpsilon {dp.target_epsilon:g}: "
            "the privacy budget of this job is spent",
            "budget_exhausted",
        )


def check_first_round(spec: FederatedJobSpec) -> None:
    """Refuse a job whose very first round would exceed its privacy target."""
    dp = spec.privacy.dp
    if dp is None or dp.target_epsilon is None:
        return
    first = epsilon([(dp.noise_multiplier, spec.aggregation.fraction)], dp.delta, dp.accountant)
    if first > dp.target_epsilon:
        raise Invalid(
            f"privacy.dp: one round with noiseMultiplier {dp.noise_multiplier:g} (sampling rate "
            f"{spec.aggregation.fraction:g}) already spends epsilon {first:.3g} > targetEpsilon "
            f"{dp.target_epsilon:g}; raise noiseMultiplier or targetEpsilon",
            "invalid_spec",
        )


def status(s: Session, row: JobRow, spec: FederatedJobSpec) -> m.PrivacyStatus:
    dp = spec.privacy.dp
    out = m.PrivacyStatus(secure_aggregation=spec.aggregation.secure, dp=dp is not None)
    if dp is None:
        return out
    query = select(RoundRow.metrics).where(RoundRow.job == row.name, RoundRow.state == RoundState.CLOSED)
    last = s.scalars(query.order_by(RoundRow.number.desc()).limit(1)).first()
    spent = float(last.get("epsilon", 0.0)) if last else 0.0
    out.epsilon = spent if spent >= 0 else None  # -1 records "no noise": no finite epsilon
    out.delta, out.target_epsilon = dp.delta, dp.target_epsilon
    out.noise_multiplier, out.clip_norm = dp.noise_multiplier, dp.clip_norm
    return out
