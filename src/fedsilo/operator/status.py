"""Pure translation of the aggregator's JobStatus into the FederatedJob's `status`.

`job_status_patch` returns the status fields to patch and the Kubernetes Events that the
transition deserves; the handler applies both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fedsilo.api.models import JobStatus

AGGREGATOR_READY = "AggregatorReady"
SILOS_READY = "SilosReady"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
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
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    """One condition; lastTransitionTime is kept while its status does not change."""
    value = "True" if status else "False"
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


def _silos_condition(
    job: JobStatus, previous: list[dict[str, Any]], generation: int, now: datetime
) -> dict[str, Any]:
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
        condition(
            conditions, SUCCEEDED, job.phase == "Succeeded", job.phase, job.message, generation, now
        ),
        condition(
            conditions, FAILED, job.phase == "Failed", job.phase, job.message, generation, now
        ),
    ]
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
        "conditions": new_conditions,
        "observedGeneration": generation,
    }
    if job.started_at is not None:
        patch["startTime"] = timestamp(job.started_at)
    if job.finished_at is not None:
        patch["completionTime"] = timestamp(job.finished_at)
    return patch, _events(job, previous)


def _events(job: JobStatus, previous: dict[str, Any]) -> list[Event]:
    events: list[Event] = []
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
    others = [c for c in conditions if c.get("type") != AGGREGATOR_READY]
    patch = {
        "phase": previous.get("phase") or "Pending",
        "conditions": [ready, *others],
        "observedGeneration": generation,
    }
    events = []
    old = next((c for c in conditions if c.get("type") == AGGREGATOR_READY), None)
    if old is not None and old.get("status") == "True":
        events.append(Event("Warning", "AggregatorUnreachable", message))
    return patch, events
