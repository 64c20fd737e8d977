"""Pure translation of the aggregator's answers into the FederatedJob's `status`.

`job_status_patch` (a JobStatus), `spec_applied_patch` (a spec change sent) and
`resume_patch` (a resume request handled) return the status fields to patch and the
Kubernetes Events that the transition deserves; the handlers apply both. The conditions
the operator itself decides (children, external silos) are in `reconciled.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fedsilo.api.models import JobStatus

AGGREGATOR_READY = "AggregatorReady"
SILOS_READY = "SilosReady"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
CONFIG_APPLIED = "ConfigApplied"
PRIVACY_BUDGET = "PrivacyBudgetAvailable"
AGGREGATOR_UNREACHABLE = "AggregatorUnreachable"
TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the FederatedJob."""

    type: str  # Normal or Warning
    reason: str
    message: str


def timestamp(moment: datetime | None) -> str | None:
    """RFC 3339 UTC with a Z, as Kubernetes writes times."""
    if moment is None:
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    previous: list[dict[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    """One condition (status None: `Unknown`); lastTransitionTime is kept while its status holds."""
    value = "Unknown" if status is None else "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": timestamp(now) if changed else old["lastTransitionTime"],  # type: ignore[index]
        "observedGeneration": generation,
    }


def merged_conditions(previous: Sequence[dict[str, Any]], updates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`previous` with each condition of `updates` replacing the one of its type (or added).

    A replaced condition whose status is unchanged keeps its lastTransitionTime, so the
    result is right even when `updates` were built from an older copy of the conditions.
    """
    by_type = {c.get("type"): c for c in updates}
    merged: list[dict[str, Any]] = []
    for old in previous:
        new = by_type.pop(old.get("type"), None)
        if new is None:
            merged.append(old)
        elif new.get("status") == old.get("status") and old.get("lastTransitionTime"):
            merged.append({**new, "lastTransitionTime": old["lastTransitionTime"]})
        else:
            merged.append(new)
    return merged + list(by_type.values())


def _silos_condition(job: JobStatus, previous: list[dict[str, Any]], generation: int, now: datetime) -> dict[str, Any]:
    waiting = [s.name for s in job.silos if not s.joined]
    joined = len(job.silos) - len(waiting)
    if waiting:
        message = f"{joined}/{len(job.silos)} silos joined; waiting for {', '.join(waiting)}"
        return condition(previous, SILOS_READY, False, "SilosJoining", message, generation, now)
    message = f"{joined}/{len(job.silos)} silos joined"
    return condition(previous, SILOS_READY, True, "AllJoined", message, generation, now)


def job_status_patch(
    job: JobStatus, previous: dict[str, Any], generation: int, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """The status patch and the Events for a fresh JobStatus from the aggregator."""
    conditions = list(previous.get("conditions") or [])
    new_conditions = [
        condition(
            conditions,
            AGGREGATOR_READY,
            True,
            "Responding",
            "aggregator answers /v1",
            generation,
            now,
        ),
        _silos_condition(job, conditions, generation, now),
        condition(conditions, SUCCEEDED, job.phase == "Succeeded", job.phase, job.message, generation, now),
        condition(conditions, FAILED, job.phase == "Failed", job.phase, job.message, generation, now),
    ]
    if not any(c.get("type") == CONFIG_APPLIED for c in conditions) and generation == 1:
        # the first spec reached the aggregator with its job file; later ones through send_spec
        message = "generation 1 is the aggregator's starting document"
        new_conditions.append(condition(conditions, CONFIG_APPLIED, True, "Created", message, generation, now))
    budget = _privacy_condition(job, conditions, generation, now)
    if budget is not None:
        new_conditions.append(budget)
    patch: dict[str, Any] = {
        "phase": job.phase,
        "message": job.message,
        "round": job.round,
        "rounds": job.rounds,
        "version": job.version,
        "accuracy": job.accuracy,
        "loss": job.loss,
        "silos": [
            {
                "name": s.name,
                "role": s.role,
                "state": s.state,
                "joined": s.joined,
                "roundsCompleted": s.rounds_completed,
                "lastSeen": timestamp(s.last_seen),
            }
            for s in job.silos
        ],
        "conditions": merged_conditions(conditions, new_conditions),
        "observedGeneration": generation,
        "privacy": privacy_status(job),
    }
    if job.started_at is not None:
        patch["startTime"] = timestamp(job.started_at)
    if job.finished_at is not None:
        patch["completionTime"] = timestamp(job.finished_at)
    return patch, _events(job, previous)


def privacy_status(job: JobStatus) -> dict[str, Any]:
    """`status.privacy`: what protects the silos' updates and the DP budget spent so far."""
    privacy = job.privacy
    out: dict[str, Any] = {"secureAggregation": privacy.secure_aggregation, "dp": privacy.dp}
    optional = {"epsilon": privacy.epsilon, "delta": privacy.delta, "targetEpsilon": privacy.target_epsilon}
    out.update({key: value for key, value in optional.items() if value is not None})
    return out


def budget_reached(job: JobStatus) -> bool:
    """Whether the DP budget spent has reached the job's target epsilon."""
    privacy = job.privacy
    return bool(privacy.dp and privacy.target_epsilon and (privacy.epsilon or 0.0) >= privacy.target_epsilon)


def _privacy_condition(
    job: JobStatus, previous: list[dict[str, Any]], generation: int, now: datetime
) -> dict[str, Any] | None:
    """`PrivacyBudgetAvailable` for a DP job with a target epsilon (None otherwise)."""
    privacy = job.privacy
    if not privacy.dp or not privacy.target_epsilon:
        return None
    spent = f"epsilon {privacy.epsilon or 0.0:.3g} of target {privacy.target_epsilon:.3g} spent (delta {privacy.delta})"
    if budget_reached(job):
        return condition(previous, PRIVACY_BUDGET, False, "TargetEpsilonReached", spent, generation, now)
    return condition(previous, PRIVACY_BUDGET, True, "WithinBudget", spent, generation, now)


def _events(job: JobStatus, previous: dict[str, Any]) -> list[Event]:
    events: list[Event] = []
    old_budget = next((c for c in previous.get("conditions") or [] if c.get("type") == PRIVACY_BUDGET), None)
    if budget_reached(job) and (old_budget is None or old_budget.get("status") != "False"):
        privacy = job.privacy
        message = (
            f"epsilon {privacy.epsilon or 0.0:.3g} reached the target {privacy.target_epsilon or 0.0:.3g} "
            f"(delta {privacy.delta}); the aggregator stops or warns as the job's privacy settings say"
        )
        events.append(Event("Warning", "PrivacyBudgetReached", message))
    old_phase = previous.get("phase")
    if old_phase != job.phase:
        kind = "Warning" if job.phase == "Failed" else "Normal"
        detail = f": {job.message}" if job.message else ""
        events.append(Event(kind, job.phase, f"phase {old_phase or 'None'} -> {job.phase}{detail}"))
    old_round = previous.get("round")
    if job.phase == "Running" and old_round is not None and job.round > old_round:
        accuracy = f", accuracy {job.accuracy:.4f}" if job.accuracy is not None else ""
        events.append(Event("Normal", "Round", f"round {job.round}/{job.rounds}{accuracy}"))
    return events


def unreachable_patch(
    message: str, previous: dict[str, Any], generation: int, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """Status when the aggregator does not answer: AggregatorReady=False, phase kept."""
    conditions = list(previous.get("conditions") or [])
    ready = condition(conditions, AGGREGATOR_READY, False, "Unreachable", message, generation, now)
    patch = {
        "phase": previous.get("phase") or "Pending",
        "conditions": merged_conditions(conditions, [ready]),
        "observedGeneration": generation,
    }
    events = []
    old = next((c for c in conditions if c.get("type") == AGGREGATOR_READY), None)
    if old is not None and old.get("status") == "True":
        events.append(Event("Warning", "AggregatorUnreachable", message))
    return patch, events


@dataclass(frozen=True)
class SpecOutcome:
    """What became of a spec change sent to the aggregator.

    applied: True (accepted), False (refused: `reason` says why, e.g. `Immutable`) or
    None (not known yet: the aggregator could not take it now; it is retried).
    """

    applied: bool | None
    reason: str
    message: str


def refusal_reason(reason: str | None) -> str:
    """The aggregator's snake_case reason as a condition reason: `immutable` -> `Immutable`."""
    if not reason:
        return "Refused"
    return "".join(part.capitalize() for part in reason.split("_"))


def spec_applied_patch(
    outcome: SpecOutcome, previous: dict[str, Any], generation: int, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """The `ConfigApplied` condition for generation `generation`, and the Event it deserves.

    Accepted: a Normal Event; refused: a Warning Event with the aggregator's reason; not
    known yet: a Warning Event only when the condition turns Unknown (not on every retry).
    """
    conditions = list(previous.get("conditions") or [])
    new = condition(conditions, CONFIG_APPLIED, outcome.applied, outcome.reason, outcome.message, generation, now)
    old = next((c for c in conditions if c.get("type") == CONFIG_APPLIED), None)
    if outcome.applied is True:
        return {"conditions": merged_conditions(conditions, [new])}, [Event("Normal", CONFIG_APPLIED, outcome.message)]
    retrying = outcome.applied is None and old is not None and old.get("status") == "Unknown"
    repeated = retrying and old is not None and old.get("observedGeneration") == generation
    events = [] if repeated else [Event("Warning", outcome.reason, outcome.message)]
    return {"conditions": merged_conditions(conditions, [new])}, events


ResumeOutcome = Literal["Resumed", "NotFailed", "Refused"]


def resume_patch(
    value: str, outcome: ResumeOutcome, message: str, restarted: Sequence[str], now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """`status.resumeRequest` (the handled annotation value, so it is acted on once) and the Event.

    Resumed: Normal `Resumed`, naming the silo Jobs started again; NotFailed (the job was not
    Failed): Normal `NotResumed`; Refused (any other refusal): Warning `ResumeRefused`.
    """
    request = {"value": value, "outcome": outcome, "message": message, "time": timestamp(now)}
    if outcome == "Resumed":
        detail = f"; silo Jobs started again: {', '.join(restarted)}" if restarted else ""
        event = Event("Normal", "Resumed", f"resumed (fedsilo.io/resume={value}){detail}")
    elif outcome == "NotFailed":
        event = Event("Normal", "NotResumed", f"not resumed, the job is not Failed: {message}")
    else:
        event = Event("Warning", "ResumeRefused", f"the aggregator refused to resume: {message}")
    return {"resumeRequest": request}, [event]
