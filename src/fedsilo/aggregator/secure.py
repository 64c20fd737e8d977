"""Secure rounds: the SecAgg stages inside an open round, as transitions over committed rows.

A secure round goes keys -> shares -> masking -> unmasking -> aggregating:
- keys: each participant posts its round's public keys; the roster U1 closes when every
  participant posted, or at the stage deadline with at least t of them.
- shares: each U1 silo posts one encrypted share bundle per U1 silo; U2 = those who did.
- masking: each U2 silo uploads its masked update (the normal upload path); U3 = those
  whose upload was accepted by the time all U2 uploaded or the round deadline passed.
- unmasking: each U3 silo reveals, per U2 silo, a share of its self-mask seed (U3) or of
  its mask key (dropped); t reveals let the aggregator remove every mask from the sum.
The aggregator stores public keys, ciphertexts it cannot open, masked updates, and the
reveals; none of them shows one silo's update (see the README's Privacy section).
Each stage is one transaction: a crash anywhere resumes at the committed stage.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fedsilo.adapters import Schema
from fedsilo.aggregator.errors import Conflict, Forbidden, Invalid
from fedsilo.aggregator.lifecycle import Phase, RoundState, Tx
from fedsilo.aggregator.store import (
    JobRow,
    RoundRow,
    SecAggKeyRow,
    SecAggRevealRow,
    SecAggShareRow,
    UpdateRow,
    aware,
)
from fedsilo.api import models as m
from fedsilo.logfmt import event
from fedsilo.privacy import secagg, vectors
from fedsilo.privacy.vectors import Layout
from fedsilo.spec import AggregationSpec
from fedsilo.strategies import ClientConfig
from fedsilo.strategies.ffa_lora import zero_by_contract

log = logging.getLogger("fedsilo.aggregator")
MAX_CIPHERTEXT = 1024  # bytes of one share bundle (two 66-byte shares, nonce, tag, framing)


def layout(schema: Schema, hooks: ClientConfig) -> Layout:
    """The masked vector's layout: the adapter's tensors, less those the strategy keeps at zero."""
    return vectors.layout(schema, zero_by_contract(hooks))


def start(tx: Tx, rnd: RoundRow, aggregation: AggregationSpec) -> None:
    """Make a freshly opened round secure: the key stage begins."""
    threshold = secagg.threshold_for(len(rnd.participants), aggregation.secure_threshold)
    seconds = aggregation.secure_stage_timeout_seconds
    rnd.secagg = {"stage": "keys", "threshold": threshold, "seconds": seconds, "until": _until(tx.now, seconds)}


def restart(tx: Tx, rnd: RoundRow, aggregation: AggregationSpec) -> None:
    """A resumed secure round starts over: masked updates are useless without their round's keys."""
    for table in (SecAggKeyRow, SecAggShareRow, SecAggRevealRow, UpdateRow):
        tx.s.execute(delete(table).where(table.job == rnd.job, table.round == rnd.number))
    start(tx, rnd, aggregation)


def _until(now: datetime, seconds: float) -> str:
    return (now + timedelta(seconds=seconds)).isoformat()


def _set(rnd: RoundRow, **changes: Any) -> None:
    rnd.secagg = {**(rnd.secagg or {}), **changes}  # a new dict: JSON columns track assignment only


def stage(rnd: RoundRow) -> str:
    return str((rnd.secagg or {}).get("stage", ""))


def members(rnd: RoundRow, name: str) -> list[str]:
    return list((rnd.secagg or {}).get(name, []))


def context(rnd: RoundRow) -> bytes:
    return secagg.context_for(rnd.job, rnd.number)


def _posted(s: Session, table: Any, rnd: RoundRow, column: Any) -> list[str]:
    return sorted(set(s.scalars(select(column).where(table.job == rnd.job, table.round == rnd.number))))


def _require(rnd: RoundRow, wanted: str, silo: str, among: list[str], what: str) -> None:
    if stage(rnd) != wanted:
        raise Conflict(f"round {rnd.number} is at stage {stage(rnd)!r}, not {wanted!r}", "wrong_stage")
    if silo not in among:
        raise Forbidden(f"silo {silo!r} is not among the round's {what}", "not_participant")


def post_keys(tx: Tx, rnd: RoundRow, silo: str, keys: m.SecAggKeys) -> None:
    """Record `silo`'s public keys; the roster closes when every participant has posted."""
    document = keys.model_dump()
    existing = tx.s.get(SecAggKeyRow, (rnd.job, rnd.number, silo))
    if existing is not None:
        if existing.public == document:
            return  # a retry
        raise Conflict(f"silo {silo!r} already posted other keys for round {rnd.number}", "keys_conflict")
    _require(rnd, "keys", silo, list(rnd.participants), "participants")
    try:
        secagg.PublicKeys.from_wire(document)
    except secagg.SecAggError as exc:
        raise Invalid(f"public keys: {exc}", "bad_keys") from None
    tx.s.add(SecAggKeyRow(job=rnd.job, round=rnd.number, silo=silo, public=document))
    tx.s.flush()
    posted = _posted(tx.s, SecAggKeyRow, rnd, SecAggKeyRow.silo)
    if set(rnd.participants) <= set(posted):
        _advance(tx, rnd, "shares", "u1", posted)


def post_shares(tx: Tx, rnd: RoundRow, silo: str, shares: m.SecAggShares) -> None:
    """Record `silo`'s encrypted bundles, one per roster silo; U2 closes when all of U1 posted."""
    u1 = members(rnd, "u1")
    query = select(SecAggShareRow).where(
        SecAggShareRow.job == rnd.job, SecAggShareRow.round == rnd.number, SecAggShareRow.sender == silo
    )
    existing = {r.recipient: r.ciphertext for r in tx.s.scalars(query)}
    if existing:
        if existing == shares.ciphertexts:
            return
        raise Conflict(f"silo {silo!r} already posted other shares for round {rnd.number}", "shares_conflict")
    _require(rnd, "shares", silo, u1, "key roster")
    if set(shares.ciphertexts) != set(u1):
        raise Invalid(f"shares must go to exactly the key roster {u1}, got {sorted(shares.ciphertexts)}", "bad_shares")
    for recipient, text in shares.ciphertexts.items():
        _check_b64(text, f"share for {recipient!r}")
        tx.s.add(SecAggShareRow(job=rnd.job, round=rnd.number, sender=silo, recipient=recipient, ciphertext=text))
    tx.s.flush()
    posted = _posted(tx.s, SecAggShareRow, rnd, SecAggShareRow.sender)
    if set(u1) <= set(posted):
        _advance(tx, rnd, "masking", "u2", posted)


def _check_b64(text: str, what: str) -> None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(f"{what}: not base64", "bad_shares") from None
    if not 0 < len(raw) <= MAX_CIPHERTEXT:
        raise Invalid(f"{what}: {len(raw)} bytes (at most {MAX_CIPHERTEXT})", "bad_shares")


def check_upload(rnd: RoundRow, silo: str) -> None:
    """A masked update is accepted only in the masking stage, from a silo whose shares are held."""
    _require(rnd, "masking", silo, members(rnd, "u2"), "silos that shared their keys")


def uploaded(tx: Tx, rnd: RoundRow, received: list[str]) -> None:
    """After an accepted masked update: U3 closes once every U2 silo has uploaded."""
    if set(members(rnd, "u2")) <= set(received):
        _advance(tx, rnd, "unmasking", "u3", sorted(received))


def post_reveal(tx: Tx, rnd: RoundRow, silo: str, reveal: m.SecAggReveal) -> bool:
    """Record `silo`'s reveal; returns True when t reveals make the round ready to aggregate."""
    document = {k: v.model_dump() for k, v in reveal.shares.items()}
    existing = tx.s.get(SecAggRevealRow, (rnd.job, rnd.number, silo))
    if existing is not None:
        if existing.shares == document:
            return False
        raise Conflict(f"silo {silo!r} already revealed other shares for round {rnd.number}", "reveal_conflict")
    u2, u3 = members(rnd, "u2"), members(rnd, "u3")
    _require(rnd, "unmasking", silo, u3, "silos whose masked update counts")
    try:
        parsed = secagg.reveals_from_wire(document)
    except secagg.SecAggError as exc:
        raise Invalid(f"reveal: {exc}", "bad_reveal") from None
    if set(parsed) != set(u2):
        raise Invalid(f"a reveal must cover exactly the share roster {u2}", "bad_reveal")
    wrong = sorted(v for v, (kind, _) in parsed.items() if kind != ("b" if v in u3 else "s"))
    if wrong:  # both kinds for one silo would unmask its update
        raise Invalid(f"reveal: wrong share kind for {wrong} (b for U3, s for dropped silos)", "bad_reveal")
    tx.s.add(SecAggRevealRow(job=rnd.job, round=rnd.number, silo=silo, shares=document))
    tx.s.flush()
    if len(_posted(tx.s, SecAggRevealRow, rnd, SecAggRevealRow.silo)) >= int(rnd.secagg["threshold"]):  # type: ignore[index]
        _set(rnd, stage="aggregating")
        rnd.state = RoundState.AGGREGATING
        return True
    return False


def _advance(tx: Tx, rnd: RoundRow, to: str, roster: str, names: list[str]) -> None:
    _set(rnd, stage=to, **{roster: names}, until=_until(tx.now, float(rnd.secagg["seconds"])))  # type: ignore[index]
    event(log, "secagg_stage", job=rnd.job, round=rnd.number, stage=to, silos=len(names))


def due(rnd: RoundRow, now: datetime) -> bool:
    """Has the current stage's deadline passed (masking follows the round deadline)?"""
    if rnd.secagg is None or rnd.state != RoundState.OPEN:
        return False
    if stage(rnd) == "masking":
        return now >= aware(rnd.deadline)  # type: ignore[operator]
    return now >= datetime.fromisoformat(str(rnd.secagg["until"]))


def expire(tx: Tx, row: JobRow, rnd: RoundRow, min_silos: int) -> None:
    """A stage deadline passed: go on with the silos that answered if there are enough, else fail."""
    t = int(rnd.secagg["threshold"])  # type: ignore[index]
    need = max(t, min_silos)
    current = stage(rnd)
    if current == "keys":
        posted = _posted(tx.s, SecAggKeyRow, rnd, SecAggKeyRow.silo)
        if len(posted) >= need:
            return _advance(tx, rnd, "shares", "u1", posted)
        why = f"{len(posted)} of {len(rnd.participants)} silos posted keys"
    elif current == "shares":
        posted = [p for p in _posted(tx.s, SecAggShareRow, rnd, SecAggShareRow.sender) if p in members(rnd, "u1")]
        if len(posted) >= need:
            return _advance(tx, rnd, "masking", "u2", posted)
        why = f"{len(posted)} of {len(members(rnd, 'u1'))} silos posted their shares"
    elif current == "masking":
        got = _posted(tx.s, UpdateRow, rnd, UpdateRow.silo)
        if len(got) >= need:
            return _advance(tx, rnd, "unmasking", "u3", got)
        why = f"{len(got)} masked update(s) by the round deadline"
    else:
        got = _posted(tx.s, SecAggRevealRow, rnd, SecAggRevealRow.silo)
        why = f"{len(got)} of {len(members(rnd, 'u3'))} silos revealed their shares"
    _set(rnd, stage="failed")
    row.phase, row.finished_at = Phase.FAILED, tx.now
    row.message = (
        f"secure round {rnd.number}: {why}; {need} are needed (secure threshold {t}, minSilos {min_silos}); "
        'resume with PATCH {"resume": true} (the round starts over with fresh keys)'
    )
    log.error("job %s: %s", row.name, row.message)


def view(s: Session, rnd: RoundRow, silo: str) -> m.SecAggView:
    """What `silo` may see of a secure round: public keys, its own inbox, the rosters."""
    info = rnd.secagg or {}
    current = "closed" if rnd.state == RoundState.CLOSED else stage(rnd)
    out = m.SecAggView(round=rnd.number, stage=current, threshold=int(info.get("threshold", 0)))  # type: ignore[arg-type]
    u1, u2 = members(rnd, "u1"), members(rnd, "u2")
    if u1:
        rows = s.scalars(select(SecAggKeyRow).where(SecAggKeyRow.job == rnd.job, SecAggKeyRow.round == rnd.number))
        out.roster = {r.silo: m.SecAggKeys.model_validate(r.public) for r in rows if r.silo in u1}
    if u2 and silo in u2:
        query = select(SecAggShareRow).where(
            SecAggShareRow.job == rnd.job, SecAggShareRow.round == rnd.number, SecAggShareRow.recipient == silo
        )
        out.inbox = {r.sender: r.ciphertext for r in s.scalars(query) if r.sender in u2}
    out.shared, out.masked = u2, members(rnd, "u3")
    return out


def unmask(s: Session, rnd: RoundRow, masked_sum: np.ndarray) -> np.ndarray:
    """The round's plain sum (ring elements) from the masked sum and the stored reveals."""
    u2, u3 = members(rnd, "u2"), members(rnd, "u3")
    keys = s.scalars(select(SecAggKeyRow).where(SecAggKeyRow.job == rnd.job, SecAggKeyRow.round == rnd.number))
    roster = {r.silo: secagg.PublicKeys.from_wire(r.public) for r in keys if r.silo in u2}
    query = select(SecAggRevealRow).where(SecAggRevealRow.job == rnd.job, SecAggRevealRow.round == rnd.number)
    reveals = [secagg.reveals_from_wire(r.shares) for r in s.scalars(query.order_by(SecAggRevealRow.silo))]
    return secagg.unmask(masked_sum, roster, u3, reveals, int(rnd.secagg["threshold"]), context(rnd))  # type: ignore[index]
