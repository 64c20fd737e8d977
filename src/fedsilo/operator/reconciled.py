"""Pure: what a pass over a job's children means for its status and its Events.

`reconciled_patch` turns an `Outcome` (children created, repaired, failed; the external
silos' endpoint) into the status fields to patch (conditions `ChildrenReady` and
`ExternalSilosReady`, `externalSilos`, initial `Unknown` conditions) and the Events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedsilo.operator import naming
from fedsilo.operator.drift import ExternalEndpoint
from fedsilo.operator.status import AGGREGATOR_READY, SILOS_READY, Event, condition, merged_conditions
from fedsilo.spec import FederatedJob

CHILDREN_READY = "ChildrenReady"
EXTERNAL_SILOS_READY = "ExternalSilosReady"


@dataclass(frozen=True)
class Failure:
    """A child that could not be applied: `reason` (CamelCase) and what to do about it."""

    child: str  # Kind namespace/name
    reason: str
    message: str
    namespace: str | None = None


@dataclass
class Outcome:
    """What one reconcile pass did."""

    applied: int = 0
    created: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # existed, but had drifted or was deleted
    pruned: int = 0
    failures: list[Failure] = field(default_factory=list)
    endpoint: ExternalEndpoint | None = None


def external_silos(job: FederatedJob, url: str | None) -> list[dict[str, str]]:
    """What each external silo's administrator needs to join (no URL while none is published)."""
    return [
        {
            "name": s.name,
            **({"aggregatorUrl": url} if url else {}),
            "tokenSecret": naming.silo_token_secret_name(job, s),
        }
        for s in job.spec.silos
        if s.external
    ]


def _initial(previous: list[dict[str, Any]], generation: int, now: datetime) -> list[dict[str, Any]]:
    """`Unknown` conditions for what only the aggregator can tell, until it answers."""
    present = {c.get("type") for c in previous}
    out = []
    if AGGREGATOR_READY not in present:
        message = "waiting for the aggregator to answer (pod scheduled, image pulled, /v1 up)"
        out.append(condition(previous, AGGREGATOR_READY, None, "Starting", message, generation, now))
    if SILOS_READY not in present:
        message = "no silo has joined yet"
        out.append(condition(previous, SILOS_READY, None, "AwaitingAggregator", message, generation, now))
    return out


def reconciled_patch(
    job: FederatedJob, outcome: Outcome, previous: dict[str, Any], generation: int, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """Status fields and Events for one reconcile pass.

    Events: Normal `Created` (children created), Normal `Repaired` (children recreated or
    restored), Warning with each failure's reason when `ChildrenReady` turns False or its
    message changes, Warning `ExternalUrlMissing`/`InsecureExternalUrl` likewise.
    """
    conditions = list(previous.get("conditions") or [])
    old = {c.get("type"): c for c in conditions}
    events: list[Event] = []
    updates = _initial(conditions, generation, now)
    if outcome.failures:
        message = "; ".join(f"{f.child}: {f.message}" for f in outcome.failures)
        reason = outcome.failures[0].reason
        updates.append(condition(conditions, CHILDREN_READY, False, reason, message, generation, now))
        before = old.get(CHILDREN_READY) or {}
        if before.get("status") != "False" or before.get("message") != message:
            events += [Event("Warning", f.reason, f"{f.child}: {f.message}") for f in outcome.failures]
    else:
        message = f"{outcome.applied} children applied"
        updates.append(condition(conditions, CHILDREN_READY, True, "Applied", message, generation, now))
    if outcome.created:
        events.append(Event("Normal", "Created", f"created {', '.join(outcome.created)}"))
    if outcome.repaired:
        events.append(Event("Normal", "Repaired", f"restored {', '.join(outcome.repaired)}"))
    fields: dict[str, Any] = {}
    endpoint = outcome.endpoint
    if endpoint is not None and endpoint.ready is not None:
        ready, reason = endpoint.ready, endpoint.reason
        updates.append(condition(conditions, EXTERNAL_SILOS_READY, ready, reason, endpoint.message, generation, now))
        before = old.get(EXTERNAL_SILOS_READY) or {}
        changed = before.get("status") != ("True" if ready else "False") or before.get("reason") != reason
        if not endpoint.ready and changed:
            events.append(Event("Warning", endpoint.reason, endpoint.message))
        elif endpoint.ready and before.get("message") != endpoint.message:
            events.append(Event("Normal", "ExternalUrlPublished", endpoint.message))
        fields["externalSilos"] = external_silos(job, endpoint.url)
    fields["conditions"] = merged_conditions(conditions, updates)
    return fields, events


def status_defaults(job: FederatedJob) -> dict[str, Any]:
    """Status fields shown until the aggregator reports its own (Phase, Round, Rounds columns).

    Writers set them only where the freshest status lacks them: a reconcile that read an
    older status must not put a Running job back to Pending or round 0.
    """
    return {"phase": "Pending", "round": 0, "rounds": job.spec.training.rounds}
