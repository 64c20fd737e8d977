"""What the handlers write back: status fields (merged into the freshest status) and Events.

`write_status` is the one status writer: it merges conditions by type, writes `DEFAULTS` only
where the status lacks them and never undoes what another writer changed since the handler
read the status; `post`/`post_on` post Events.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import kopf

from fedsilo.operator import naming
from fedsilo.operator.aggregator_client import AggregatorError
from fedsilo.operator.changes import admin_client
from fedsilo.operator.children import JobRef, Key, describe
from fedsilo.operator.kube import KubeClient, KubeError
from fedsilo.operator.objects import job_from_body
from fedsilo.operator.reconciled import Outcome, reconciled_patch, status_defaults
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.status import Event, job_status_patch, merged_conditions, unreachable_patch
from fedsilo.operator.tokens import tokens_from_secret
from fedsilo.spec import API_GROUP, API_VERSION, KIND

JOB_API = (f"{API_GROUP}/{API_VERSION}", KIND)
DEFAULTS = "defaults"  # key of `fields`: status fields written only where the status lacks them


def reconcile_fields(
    body: Mapping[str, Any], outcome: Outcome, settings: OperatorSettings, now: datetime
) -> tuple[dict[str, Any], list[Event]]:
    """Status fields and Events of one reconcile pass over the job in `body`."""
    job = job_from_body(body)
    meta = body.get("metadata", {})
    generation = int(meta.get("generation") or 1)
    previous = dict(body.get("status") or {})
    fields, events = reconciled_patch(job, outcome, previous, generation, now)
    fields["aggregatorUrl"] = naming.aggregator_url(job, settings.aggregator_port, settings.cluster_domain)
    fields["adminSecret"] = naming.tokens_secret_name(job)
    fields["observedGeneration"] = generation
    fields[DEFAULTS] = status_defaults(job)
    return fields, events


def failures_error(outcome: Outcome) -> kopf.TemporaryError | None:
    """A retry (15 s) while some children could not be applied; the status says which."""
    if not outcome.failures:
        return None
    return kopf.TemporaryError("; ".join(f"{f.child}: {f.message}" for f in outcome.failures), delay=15)


def snapshot(body: kopf.Body) -> dict[str, Any]:
    """A deep copy of a timer's `body`, which kopf keeps live: it changes under an `await` as new
    events arrive, and status fields computed from it must be written against what they saw."""
    return copy.deepcopy(dict(body))


async def write_status(
    kube: KubeClient, ref: JobRef, fields: Mapping[str, Any], seen: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Merge `fields` into the job's freshest status with an optimistic lock: written now, retried
    on a conflict, skipped when nothing changes.

    Not kopf's own status patch: kopf defers a patch refused for a stale resourceVersion to the
    object's next event, which may never come, and then applies it on top of newer writes.
    `seen`: the status `fields` were computed from; conditions merely carried over from it are
    not written, and nothing another writer changed since is overwritten (`not_overtaken`).
    Returns the job, or None when it is gone.
    """
    namespace, name = ref
    for _ in range(5):
        job = await kube.get(*JOB_API, namespace, name)
        if job is None:
            return None
        current = job.get("status") or {}
        status = merged_status(current, fields, seen)
        if status == current:
            return job  # nothing new: no write, no watch event
        patch = {"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]}, "status": status}
        try:
            return await kube.patch(*JOB_API, namespace, name, patch, subresource="status")
        except KubeError as exc:
            if exc.status != 409:
                raise
    raise kopf.TemporaryError(f"status of {namespace}/{name} kept changing", delay=1)


async def poll_status(
    kube: KubeClient,
    body: Mapping[str, Any],
    settings: OperatorSettings,
    transport: httpx.AsyncBaseTransport | None = None,
    now: datetime | None = None,
) -> tuple[dict[str, Any], list[Event]]:
    """Ask the aggregator for the job's status; returns the status patch and Events."""
    job = job_from_body(body)
    meta = body.get("metadata", {})
    previous = dict(body.get("status") or {})
    generation = int(meta.get("generation", 1))
    moment = now or datetime.now(UTC)
    secret = await kube.get("v1", "Secret", naming.job_namespace(job), naming.tokens_secret_name(job))
    tokens = tokens_from_secret(secret)
    if tokens is None:
        return unreachable_patch("tokens Secret not created yet", previous, generation, moment)
    try:
        client = await admin_client(kube, job, tokens, settings, transport)
        status = await client.job_status(job.metadata.name)
    except AggregatorError as exc:
        return unreachable_patch(str(exc), previous, generation, moment)
    return job_status_patch(status, previous, generation, moment)


def without_carried(fields: Mapping[str, Any], seen: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` less the conditions merely carried over from `seen` (unchanged there)."""
    fields = dict(fields)
    if "conditions" in fields:
        carried = seen.get("conditions") or []
        fields["conditions"] = [c for c in fields["conditions"] if c not in carried]
    return fields


def merged_status(
    current: Mapping[str, Any], fields: Mapping[str, Any], seen: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`current` with `fields` written: conditions merged by type, `DEFAULTS` only where missing;
    with `seen` (the status `fields` were computed from), only what changed since `seen` and is
    `not_overtaken`."""
    if seen is not None:
        fields = not_overtaken(without_carried(fields, seen), seen, current)
    status = dict(current)
    for name, value in fields.items():
        if name == DEFAULTS:
            for default, setting in value.items():
                status.setdefault(default, setting)
        elif name == "conditions":
            status[name] = merged_conditions(status.get("conditions") or [], value)
        else:
            status[name] = value
    return status


def not_overtaken(fields: Mapping[str, Any], seen: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` (computed from the status `seen`) less what another writer changed in `current` since.

    kopf re-applies a status patch that a newer resourceVersion refused on a later body, maybe
    many writes later: a value computed from `seen` must not undo a newer one there (a create
    handler's "no external URL yet" after the URL was published; a generation-1 ConfigApplied
    after generation 2's). A condition of a newer generation than the one it replaced still wins.
    """
    out: dict[str, Any] = {}
    before = {c.get("type"): c for c in seen.get("conditions") or []}
    now = {c.get("type"): c for c in current.get("conditions") or []}
    for name, value in fields.items():
        if name == "conditions":
            out[name] = [c for c in value if not _overtaken(c, before.get(c.get("type")), now.get(c.get("type")))]
        elif name == DEFAULTS or current.get(name) == seen.get(name):
            out[name] = value
    return out


def _overtaken(ours: Mapping[str, Any], before: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> bool:
    generation = int(ours.get("observedGeneration") or 0)
    return now is not None and now != before and int(now.get("observedGeneration") or 0) >= generation


def post(body: kopf.Body, events: list[Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def repair_events(item: Key, why: str, events: list[Event], outcome: Outcome) -> list[Event]:
    """The Events of a repair started by a watch: what was restored and why (a lost tokens
    Secret needs a hand); other children restored on the way keep the generic Event."""
    out = [e for e in events if e.reason != "Repaired"]
    others = [r for r in outcome.repaired if r != describe(item)]
    if others:
        out.append(Event("Normal", "Repaired", f"restored {', '.join(others)}"))
    if describe(item) not in outcome.repaired:
        return out
    if item[0] == "Secret" and item[2].endswith("-tokens"):
        message = (
            f"{describe(item)} was {why}: new admin and silo tokens were generated; restart the aggregator "
            "(kubectl rollout restart deployment) and the silo agents so that they use them"
        )
        return [*out, Event("Warning", "TokensRegenerated", message)]
    return [*out, Event("Normal", "Repaired", f"{describe(item)} was {why}: restored")]


def post_on(job: Mapping[str, Any], events: list[Event]) -> None:
    """Post Events on a job read through the client (handlers running on a child)."""
    for event in events:
        body = kopf.Body(cast(kopf.RawBody, dict(job)))
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
