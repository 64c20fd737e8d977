"""A job's objects as the handlers read them: the resource as a spec model, its tokens
Secret (created once, extended and trimmed as silos come and go, its silo tokens rotated on
request), a child's identity."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from fedsilo.operator import naming, rotation
from fedsilo.operator.aggregator_client import AggregatorClient, AggregatorError, AggregatorRefused, retry_delay
from fedsilo.operator.kube import KubeClient, KubeError
from fedsilo.operator.manifests import tokens_secret
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.status import AGGREGATOR_UNREACHABLE, Event, refusal_reason
from fedsilo.operator.tokens import Tokens, complete_tokens, tokens_from_secret
from fedsilo.spec import API_GROUP, API_VERSION, KIND, FederatedJob, parse_job


def job_from_body(body: Mapping[str, Any]) -> FederatedJob:
    """The FederatedJob model of a kopf body (status and server metadata dropped)."""
    meta = body.get("metadata", {})
    document = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": dict(body.get("spec") or {}),
    }
    return parse_job(document)


async def ensure_tokens(kube: KubeClient, job: FederatedJob, uid: str) -> Tokens:
    """Create the tokens Secret once; later runs keep its tokens, add added silos' tokens and
    drop removed silos' tokens."""
    namespace, name = naming.job_namespace(job), naming.tokens_secret_name(job)
    secret = await kube.get("v1", "Secret", namespace, name)
    existing = tokens_from_secret(secret)
    tokens = complete_tokens(existing, job.spec)
    if existing is None:
        try:
            await kube.create(tokens_secret(job, uid, tokens))
        except KubeError as exc:
            if exc.status != 409:
                raise
            # Another run created it first: keep its tokens.
            return await ensure_tokens(kube, job, uid)
    elif tokens != existing:
        try:
            await write_tokens(kube, job, tokens, resource_version(secret))
        except KubeError as exc:
            if exc.status != 409:
                raise
            # Changed since read (a token rotation): complete the fresh tokens instead.
            return await ensure_tokens(kube, job, uid)
    return tokens


async def write_tokens(kube: KubeClient, job: FederatedJob, tokens: Tokens, version: str | None = None) -> None:
    """Write `tokens` into the job's tokens Secret; with `version`, only over that resourceVersion
    (KubeError 409 when the Secret changed since)."""
    patch: dict[str, Any] = {"data": tokens.secret_data()}
    if version:
        patch["metadata"] = {"resourceVersion": version}
    await kube.patch("v1", "Secret", naming.job_namespace(job), naming.tokens_secret_name(job), patch)


def resource_version(item: Mapping[str, Any] | None) -> str | None:
    """metadata.resourceVersion of an object read from the API (None when absent)."""
    return ((item or {}).get("metadata") or {}).get("resourceVersion")


def where(item: Mapping[str, Any]) -> tuple[str | None, str]:
    meta = item["metadata"]
    return meta.get("namespace"), meta["name"]


async def rotate_silo_tokens(
    kube: KubeClient,
    body: Mapping[str, Any],
    settings: OperatorSettings,
    aggregator: Callable[[Tokens], Awaitable[AggregatorClient]],
    reapply: Callable[[], Awaitable[None]],
    note: Callable[[dict[str, Any]], Awaitable[Any]],
    retry: int = 0,
) -> tuple[dict[str, Any], list[Event], kopf.TemporaryError | None]:
    """One pass of the rotation `rotation.py` describes: pending tokens stored (or found),
    sent to the aggregator (`aggregator`: its admin client), then written to the silos by
    `reapply` (a reconcile); `note` writes status fields at once. Returns the status fields, the
    Events and, when it must be tried again, the error to raise."""
    job = job_from_body(body)
    generation, now = int(body.get("metadata", {}).get("generation") or 1), datetime.now(UTC)
    previous = dict(body.get("status") or {})
    value = rotation.requested(body.get("metadata", {}).get("annotations"))
    secret_at = ("v1", "Secret", naming.job_namespace(job), naming.tokens_secret_name(job))
    secret = await kube.get(*secret_at)
    tokens, state = tokens_from_secret(secret), rotation.rotation_state(secret)
    if tokens is None:
        return {}, [], kopf.TemporaryError("tokens Secret not created yet", delay=settings.poll_seconds)
    step = rotation.next_step(value, state, (previous.get(rotation.STATUS_FIELD) or {}).get("value"))
    if step in ("none", "record"):
        handled = state.handled if step == "none" else value
        return (rotation.recorded_patch(handled, previous, generation, now) if handled else {}), [], None
    if step == "start" and value is not None:
        pending = rotation.new_silo_tokens(tokens)
        try:
            await kube.patch(*secret_at, rotation.pending_patch(value, pending, resource_version(secret)))
        except KubeError as exc:
            if exc.status != 409:
                raise
            return {}, [], kopf.TemporaryError("tokens Secret changed meanwhile", delay=1)
        state = rotation.RotationState(state.handled, value, pending)
        await note(rotation.rotating_patch(value, previous, generation, now))
    handling = str(state.pending_value)
    client = await aggregator(tokens)
    until: datetime | None = None
    try:
        running = await client.job_document(job.metadata.name)
        known = {str(s.get("name")) for s in (running.get("spec") or {}).get("silos") or []}
        sending = rotation.to_rotate(state, tokens, known)
        for silo, token in sending.items():
            issued = await client.rotate_token(job.metadata.name, silo, token, settings.token_grace_seconds)
            until = issued.previous_valid_until or until
    except AggregatorRefused as exc:
        fields, events = rotation.failed_patch(
            refusal_reason(exc.reason), f"the aggregator refused: {exc.detail}", previous, generation, now
        )
        return fields, events, kopf.TemporaryError(exc.detail, delay=settings.resync_seconds)
    except AggregatorError as exc:
        fields, events = rotation.failed_patch(AGGREGATOR_UNREACHABLE, str(exc), previous, generation, now)
        return (
            fields,
            events,
            kopf.TemporaryError(str(exc), delay=retry_delay(retry, settings.poll_seconds, settings.resync_seconds)),
        )
    secret = await kube.get(*secret_at)  # fresh: silos may have come or gone meanwhile
    current = tokens_from_secret(secret) or tokens
    rotated = rotation.rotated_tokens(current, sending)
    if rotated != current:
        try:
            await write_tokens(kube, job, rotated, resource_version(secret))
        except KubeError as exc:
            if exc.status != 409:
                raise
            return {}, [], kopf.TemporaryError("tokens Secret changed meanwhile", delay=1)
    await reapply()
    await kube.patch(*secret_at, rotation.finished_patch(handling))
    kept = tuple(sorted(set(current.silos) - set(sending)))
    done = rotation.Rotated(handling, tuple(sending), kept, until)
    fields, events = rotation.done_patch(done, previous, generation, now)
    return fields, events, None
