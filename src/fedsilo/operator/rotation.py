"""Rotation of a job's silo tokens, asked for through the FederatedJob (pure decisions).

Any new value of the annotation `fedsilo.io/rotate-tokens` rotates the token of every silo
the aggregator runs (`kubectl annotate fedjob NAME fedsilo.io/rotate-tokens=$(date +%s)
--overwrite`). The admin token is not rotated. A silo the aggregator does not run yet
keeps its token (the spec change that adds it sends that one).

The job's tokens Secret records the rotation, so every step can be retried and a crash
anywhere resumes where it stopped, never with a second set of tokens:

1. `pending_patch`: the new tokens are stored as *pending*, with the value they answer;
2. the aggregator is told each silo's new token (named, so a retry changes nothing) and
   keeps the previous one valid for a grace period;
3. `rotated_tokens` go into `silo-tokens.json` and the silos' token Secrets, then
   `finished_patch` clears the pending tokens and records the value as handled.

A pending rotation is finished before a newer value starts one: the aggregator already
holds some of its tokens, and only the silos' current tokens are valid during the grace.
The grace (`token_grace_seconds`) must cover the kubelet's refresh of the mounted Secret
(about a minute) before an agent reads its new token.

The job shows it: condition `TokensRotated` (Unknown while rotating, False with the reason
while it cannot go on and is retried, True when done), `status.tokenRotation` (the value
handled, when, which silos) and the Events `TokensRotated` (Normal) and `TokensNotRotated`
(Warning).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fedsilo.operator.status import Event, condition, merged_conditions, timestamp
from fedsilo.operator.tokens import Tokens, decode, encode, new_token
from fedsilo.spec import API_GROUP

ROTATE_ANNOTATION = f"{API_GROUP}/rotate-tokens"  # on the FederatedJob: any new value rotates
HANDLED_ANNOTATION = f"{API_GROUP}/tokens-rotated"  # on the tokens Secret: the last value handled
PENDING_ANNOTATION = f"{API_GROUP}/tokens-rotating"  # on the tokens Secret: the value being handled
PENDING_KEY = "pending-silo-tokens.json"  # in the tokens Secret: the new tokens of that rotation
TOKENS_ROTATED = "TokensRotated"  # condition type and Event reason
STATUS_FIELD = "tokenRotation"  # status.tokenRotation: the value handled, when, which silos

Step = Literal["none", "record", "start", "resume"]


@dataclass(frozen=True)
class RotationState:
    """What the job's tokens Secret records of rotations."""

    handled: str | None = None
    pending_value: str | None = None
    pending: dict[str, str] = field(default_factory=dict)


def requested(annotations: Mapping[str, str] | None) -> str | None:
    """The rotation the job asks for: its annotation's value (None when absent or blank)."""
    value = (annotations or {}).get(ROTATE_ANNOTATION, "").strip()
    return value or None


def rotation_state(secret: Mapping[str, Any] | None) -> RotationState:
    """The rotation record of the tokens Secret (empty when there is none)."""
    secret = secret or {}
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    data = secret.get("data") or {}
    pending = json.loads(decode(data[PENDING_KEY])) if PENDING_KEY in data else {}
    return RotationState(annotations.get(HANDLED_ANNOTATION), annotations.get(PENDING_ANNOTATION), pending)


def next_step(value: str | None, state: RotationState, reported: str | None) -> Step:
    """What to do for the requested `value` given the Secret's record.

    `resume`: a rotation is pending (this value's or an older one): finish it first.
    `start`: a new value. `record`: handled, but status (`reported`) does not say so yet.
    `none`: nothing asked, or handled and reported.
    """
    if state.pending_value is not None:
        return "resume"
    if value is None:
        return "none"
    if value != state.handled:
        return "start"
    return "none" if reported == value else "record"


def settled(value: str | None, status: Mapping[str, Any]) -> bool:
    """Whether status shows nothing left to do (no request to read the tokens Secret for):
    the requested value (or none) is the one reported, and `TokensRotated` is not pending or failing.
    """
    reported = (status.get(STATUS_FIELD) or {}).get("value")
    current = next((c for c in status.get("conditions") or [] if c.get("type") == TOKENS_ROTATED), None)
    return value in (None, reported) and (current is None or current.get("status") == "True")


def new_silo_tokens(current: Tokens) -> dict[str, str]:
    """A fresh token for every silo of the job."""
    return {silo: new_token() for silo in current.silos}


def pending_patch(value: str, tokens: Mapping[str, str], resource_version: str | None) -> dict[str, Any]:
    """Step 1: the merge patch storing `tokens` as pending for `value` (optimistically locked,
    so two writers never store two sets)."""
    metadata: dict[str, Any] = {"annotations": {PENDING_ANNOTATION: value}}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"metadata": metadata, "data": {PENDING_KEY: encode(json.dumps(dict(tokens), sort_keys=True))}}


def to_rotate(state: RotationState, current: Tokens, running: Collection[str]) -> dict[str, str]:
    """Step 2: the pending tokens to send, for silos that the job still has and the aggregator runs."""
    return {silo: token for silo, token in sorted(state.pending.items()) if silo in current.silos and silo in running}


def rotated_tokens(current: Tokens, accepted: Mapping[str, str]) -> Tokens:
    """Step 3: the job's tokens with the aggregator's `accepted` new tokens in place (silos
    added or removed meanwhile are left as they are)."""
    silos = {silo: accepted.get(silo, token) for silo, token in current.silos.items()}
    return Tokens(admin=current.admin, silos=silos)


def finished_patch(value: str) -> dict[str, Any]:
    """Step 3, last: the merge patch clearing the pending tokens and recording `value` as handled."""
    annotations = {PENDING_ANNOTATION: None, HANDLED_ANNOTATION: value}
    return {"metadata": {"annotations": annotations}, "data": {PENDING_KEY: None}}


@dataclass(frozen=True)
class Rotated:
    """A finished rotation: the value handled, the silos rotated and kept, the end of the grace."""

    value: str
    rotated: tuple[str, ...]
    kept: tuple[str, ...] = ()
    previous_valid_until: datetime | None = None


def done_patch(
    done: Rotated, previous: Mapping[str, Any], generation: int, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """Status after a rotation: `tokenRotation`, `TokensRotated=True` and a Normal Event."""
    message = f"silo tokens rotated ({ROTATE_ANNOTATION}={done.value}): {', '.join(done.rotated) or 'none'}"
    if done.previous_valid_until is not None:
        message += f"; the previous tokens work until {timestamp(done.previous_valid_until)}"
    if done.kept:
        message += f"; not at the aggregator yet, token kept: {', '.join(done.kept)}"
    conditions = list(previous.get("conditions") or [])
    new = condition(conditions, TOKENS_ROTATED, True, "Rotated", message, generation, now)
    record = {"value": done.value, "time": timestamp(now), "silos": list(done.rotated)}
    fields = {STATUS_FIELD: record, "conditions": merged_conditions(conditions, [new])}
    return fields, [Event("Normal", TOKENS_ROTATED, message)]


def recorded_patch(value: str, previous: Mapping[str, Any], generation: int, now: datetime) -> dict[str, Any]:
    """Status of a rotation the Secret records as handled but status does not (a crash before
    the status write): `tokenRotation` and `TokensRotated=True`, no Event (it was posted)."""
    message = f"silo tokens rotated ({ROTATE_ANNOTATION}={value})"
    conditions = list(previous.get("conditions") or [])
    new = condition(conditions, TOKENS_ROTATED, True, "Rotated", message, generation, now)
    return {STATUS_FIELD: {"value": value, "time": timestamp(now)}, "conditions": merged_conditions(conditions, [new])}


def rotating_patch(value: str, previous: Mapping[str, Any], generation: int, now: datetime) -> dict[str, Any]:
    """Status once new tokens are pending: `TokensRotated=Unknown` (until the rotation is done,
    the job is looked at on every tick, whatever its annotation says by then)."""
    message = f"rotating the silo tokens ({ROTATE_ANNOTATION}={value})"
    conditions = list(previous.get("conditions") or [])
    new = condition(conditions, TOKENS_ROTATED, None, "Rotating", message, generation, now)
    return {"conditions": merged_conditions(conditions, [new])}


def failed_patch(
    reason: str, message: str, previous: Mapping[str, Any], generation: int, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """Status while a rotation cannot go on (retried): `TokensRotated=False` with `reason`, and
    a Warning Event (the handler posts each once while it lasts)."""
    conditions = list(previous.get("conditions") or [])
    new = condition(conditions, TOKENS_ROTATED, False, reason, message, generation, now)
    return {"conditions": merged_conditions(conditions, [new])}, [Event("Warning", "TokensNotRotated", message)]
