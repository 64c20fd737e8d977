"""Thin kopf handlers: parse the FederatedJob, call the pure builders, apply the result.

`build_registry()` returns a kopf registry holding every handler, configured by one
`OperatorSettings`; tests pass a login function (kmock or a test cluster) and an httpx
transport for the aggregator.

Handlers on FederatedJobs: `reconcile` (children in place), `spec` (every later change of
`spec` sent to the aggregator as a whole document), `status` (timer: the aggregator's
status), `resync` (timer: children re-applied, the safety net), `external-url` (the
annotation's changes), `resume-request` (timer: the `fedsilo.io/resume` annotation),
`cleanup` (children of a deleted job). Handlers on the children (`repair-<kind>`, watched by
label): a child deleted or changed away from what was applied is restored within seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import kopf

from fedsilo.operator import naming
from fedsilo.operator.aggregator_client import AggregatorError, retry_delay
from fedsilo.operator.changes import RESUME_ANNOTATION, admin_client, resume_job, send_spec
from fedsilo.operator.children import Desired, JobRef, Key, delete_children, describe, key, reconcile
from fedsilo.operator.crd import PLURAL
from fedsilo.operator.drift import EXTERNAL_URL_ANNOTATION, external_endpoint
from fedsilo.operator.kube import CHILD_KINDS, KINDS, KubeClient, KubeError
from fedsilo.operator.objects import job_from_body
from fedsilo.operator.reconciled import EXTERNAL_SILOS_READY, Outcome, reconciled_patch, status_defaults
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.status import (
    Event,
    job_status_patch,
    merged_conditions,
    spec_applied_patch,
    unreachable_patch,
)
from fedsilo.operator.tokens import tokens_from_secret
from fedsilo.spec import API_GROUP, API_VERSION, KIND, SpecError

LoginFn = Callable[..., kopf.ConnectionInfo | None]
JOB_API = (f"{API_GROUP}/{API_VERSION}", KIND)
POLL_EVENTS_MEMO = "fedsilo_poll_events"  # kopf memo key: Events the status poll posted lately
DEFAULTS = "defaults"  # key of `fields`: status fields written only where the status lacks them
CHILD_SELECTOR = f"{naming.LABEL_JOB},app.kubernetes.io/managed-by={naming.MANAGED_BY}"
log = logging.getLogger(__name__)

__all__ = ["EXTERNAL_URL_ANNOTATION", "build_registry", "poll_status"]


class Connection:
    """kopf's login result, shared with the operator's own Kubernetes client."""

    def __init__(self) -> None:
        self.info: kopf.ConnectionInfo | None = None
        self._client: KubeClient | None = None
        self._old: list[KubeClient] = []

    def set(self, info: kopf.ConnectionInfo | None) -> None:
        self.info = info
        if self._client is not None:
            self._old.append(self._client)  # closed at cleanup: a request may still use it
        self._client = None

    def client(self) -> KubeClient:
        """The client for the current credentials."""
        if self.info is None:
            raise kopf.TemporaryError("not logged in to Kubernetes yet", delay=1)
        if self._client is None:
            self._client = KubeClient.from_connection(self.info)
        return self._client

    async def aclose(self) -> None:
        for client in [*self._old, *([self._client] if self._client else [])]:
            await client.aclose()
        self._old, self._client = [], None


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


async def write_status(kube: KubeClient, ref: JobRef, fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """Merge `fields` into the job's status (conditions merged by type) with an optimistic lock.

    For handlers that run on another object (a child's watch); returns the job, or None
    when it is gone.
    """
    namespace, name = ref
    for _ in range(5):
        job = await kube.get(*JOB_API, namespace, name)
        if job is None:
            return None
        status = merged_status(job.get("status") or {}, fields)
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
        status = await admin_client(job, tokens, settings, transport).job_status(job.metadata.name)
    except AggregatorError as exc:
        return unreachable_patch(str(exc), previous, generation, moment)
    return job_status_patch(status, previous, generation, moment)


def _set_status(patch: kopf.Patch, fields: Mapping[str, Any]) -> None:
    """Write status `fields` as one JSON patch against the freshest body (resourceVersion-checked).

    `conditions` are merged by type into the conditions found there, so the status poll and
    the spec handler never drop each other's; fields that did not change cause no write.
    """
    patch.fns.append(functools.partial(_write_status, dict(fields)))


def merged_status(current: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """`current` with `fields` written: conditions merged by type, `DEFAULTS` only where missing."""
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


def _write_status(fields: dict[str, Any], raw: Any) -> None:
    raw["status"] = merged_status(raw.get("status") or {}, fields)


def _post(body: kopf.Body, events: list[Event]) -> None:
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


def _post_on(job: Mapping[str, Any], events: list[Event]) -> None:
    """Post Events on a job read through the client (handlers running on a child)."""
    for event in events:
        body = kopf.Body(cast(kopf.RawBody, dict(job)))
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def build_registry(
    settings: OperatorSettings,
    *,
    login: LoginFn | None = None,
    aggregator_transport: httpx.AsyncBaseTransport | None = None,
) -> kopf.OperatorRegistry:
    """A kopf registry with every FederatedJob and child handler, bound to `settings`."""
    registry = kopf.OperatorRegistry()
    connection = Connection()
    desired = Desired()
    locks: dict[JobRef, asyncio.Lock] = {}
    warned: dict[JobRef, set[tuple[str, str]]] = {}  # Warnings posted while the problem lasts
    awaiting_namespace: dict[str, set[JobRef]] = {}  # jobs with a child in a missing namespace
    resource: dict[str, Any] = {"group": API_GROUP, "version": API_VERSION, "plural": PLURAL, "registry": registry}
    login_fn: LoginFn = login or kopf.login_via_client
    operator_settings = settings

    def lock(ref: JobRef) -> asyncio.Lock:
        """One reconcile at a time per job in this process (handlers, timers and repairs)."""
        return locks.setdefault(ref, asyncio.Lock())

    @kopf.on.startup(registry=registry, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = operator_settings.finalizer
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=API_GROUP, key="last-handled-configuration"
        )
        # kopf's own log lines become Events from WARNING up (a handler's failure); the
        # operator posts its Normal and Warning Events itself with kopf.event.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = naming.MANAGED_BY  # `From` in kubectl describe
        settings.posting.reporting_instance = socket.gethostname()  # the operator's pod
        settings.posting.event_name_prefix = "fedsilo-"
        # A deleted job keeps its finalizer until its timers have stopped; a timer caught
        # mid-tick is checked again after this (kopf's default, 60 s, delays every deletion).
        settings.background.cancellation_polling = min(60.0, operator_settings.poll_seconds)
        # Children are watched by label, filtered by the API server (not every Secret in the cluster).
        for api_version, kind in CHILD_KINDS:
            group, _slash, version = api_version.rpartition("/")
            selector = ".".join(part for part in (KINDS[kind][0], version, group) if part)  # deployments.v1.apps
            settings.watching.label_selectors[selector] = CHILD_SELECTOR

    @kopf.on.login(registry=registry, id="login")
    def authenticate(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = login_fn(**kwargs)
        connection.set(info)
        return info

    @kopf.on.cleanup(registry=registry, id="close")
    async def close(**_: Any) -> None:
        await connection.aclose()

    async def reconcile_into(
        body: Mapping[str, Any], repairing: tuple[Key, ...] = ()
    ) -> tuple[dict[str, Any], list[Event], Outcome]:
        """Reconcile the job in `body`; its status fields, Events (each Warning once while its
        problem lasts, however many handlers meet it) and the outcome."""
        job, outcome = await reconcile(connection.client(), body, settings, desired, repairing)
        fields, events = reconcile_fields(body, outcome, settings, datetime.now(UTC))
        ref = (naming.job_namespace(job), job.metadata.name)
        for waiting in awaiting_namespace.values():
            waiting.discard(ref)
        for problem in outcome.failures:
            if problem.reason == "NamespaceNotFound" and problem.namespace:
                awaiting_namespace.setdefault(problem.namespace, set()).add(ref)
        seen = warned.setdefault(ref, set())
        current = {(e.reason, e.message) for e in events if e.type == "Warning"}
        events = [e for e in events if e.type != "Warning" or (e.reason, e.message) not in seen]
        if not outcome.failures and (outcome.endpoint is None or outcome.endpoint.ready is not False):
            seen.clear()
        seen.update(current)
        return fields, events, outcome

    @kopf.on.resume(**resource, id="reconcile")
    @kopf.on.create(**resource, id="reconcile")
    @kopf.on.update(**resource, id="reconcile", field="spec")
    async def reconcile_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        async with lock((body.meta.namespace or "", body.meta.name or "")):
            try:
                fields, events, outcome = await reconcile_into(body)
            except SpecError as exc:
                kopf.event(body, type="Warning", reason="InvalidSpec", message=str(exc))
                _set_status(patch, {"phase": "Failed", "message": f"invalid spec: {exc}"})
                return
        _set_status(patch, fields)
        _post(body, events)
        error = failures_error(outcome)
        if error is not None:
            raise error

    @kopf.timer(**resource, id="resync", interval=settings.resync_seconds, initial_delay=settings.resync_seconds)
    async def resync(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        """The safety net: whatever a watch missed is re-applied (and its status refreshed)."""
        ref = (body.meta.namespace or "", body.meta.name or "")
        async with lock(ref):
            fresh = await connection.client().get(*JOB_API, *ref)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            try:
                fields, events, _outcome = await reconcile_into(fresh)
            except SpecError:
                return
        _set_status(patch, fields)
        _post(body, events)

    def external_url_changed(body: kopf.Body, **_: Any) -> bool:
        """The published URL (or its absence) differs from what the job wants: the annotation changed."""
        if body.meta.get("deletionTimestamp"):
            return False
        try:
            endpoint = external_endpoint(job_from_body(body), body.meta.annotations)
        except SpecError:
            return False
        if endpoint.ready is None:
            return False
        status = body.get("status") or {}
        published = {s.get("aggregatorUrl") for s in status.get("externalSilos") or []}
        current = next((c for c in status.get("conditions") or [] if c.get("type") == EXTERNAL_SILOS_READY), None)
        if current is None:
            return False  # not reconciled yet: the create handler publishes it
        return published != {endpoint.url} or current.get("reason") != endpoint.reason

    @kopf.on.event(**resource, id="external-url", when=external_url_changed)
    async def external_url(body: kopf.Body, **_: Any) -> None:
        """`fedsilo.io/external-url` set or changed after creation: published now, no restart."""
        ref = (body.meta.namespace or "", body.meta.name or "")
        async with lock(ref):
            fresh = await connection.client().get(*JOB_API, *ref)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            fields, events, _outcome = await reconcile_into(fresh)
            await write_status(connection.client(), ref, fields)
        _post_on(fresh, events)

    @kopf.on.event("", "v1", "namespaces", registry=registry, id="namespace-created",
                   when=lambda type, body, **_: type in ("ADDED", None) and body.meta.name in awaiting_namespace)
    async def namespace_created(body: kopf.Body, **_: Any) -> None:
        """A silo namespace a job was waiting for exists now: its children follow at once."""
        for ref in sorted(awaiting_namespace.pop(body.meta.name or "", set())):
            async with lock(ref):
                fresh = await connection.client().get(*JOB_API, *ref)
                if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                    continue
                fields, events, _outcome = await reconcile_into(fresh)
                await write_status(connection.client(), ref, fields)
            _post_on(fresh, events)

    def register_repair(api_version: str, kind: str) -> None:
        group, _slash, version = api_version.rpartition("/")

        async def still_needed(type: str | None, body: kopf.Body) -> bool:
            """Watch events queue up: judge the child as it is now, not as the event saw it."""
            live = await connection.client().get(api_version, kind, body.meta.namespace, body.meta.name or "")
            if type == "DELETED":
                return live is None
            return live is not None and desired.needs_repair("MODIFIED", {**live, "kind": kind})

        def wanted(type: str | None, body: kopf.Body, **_: Any) -> bool:
            return desired.needs_repair(type, body)

        @kopf.on.event(
            group,
            version,
            KINDS[kind][0],
            registry=registry,
            id=f"repair-{kind.lower()}",
            labels={naming.LABEL_JOB: kopf.PRESENT},
            when=wanted,
        )
        async def repair(type: str | None, body: kopf.Body, **_: Any) -> None:
            item = key({**body, "kind": kind})
            ref = desired.owner(item)
            if ref is None:
                return
            why = "deleted" if type == "DELETED" else f"changed ({', '.join(desired.drifted(body)[:5])})"
            async with lock(ref):
                if not await still_needed(type, body):
                    return  # an earlier event's repair (or someone) fixed it already
                fresh = await connection.client().get(*JOB_API, *ref)
                if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                    desired.forget(ref)
                    return
                log.info("%s was %s: restoring it", describe(item), why)
                try:
                    fields, events, outcome = await reconcile_into(fresh, (item,))
                except SpecError:
                    return
                await write_status(connection.client(), ref, fields)
            _post_on(fresh, repair_events(item, why, events, outcome))
            error = failures_error(outcome)
            if error is not None:
                raise error

    for api_version, kind in CHILD_KINDS:
        register_repair(api_version, kind)

    @kopf.on.update(**resource, id="spec", field="spec", retries=None, backoff=settings.poll_seconds)
    async def spec_changed(body: kopf.Body, patch: kopf.Patch, status: kopf.Status, retry: int, **_: Any) -> None:
        outcome = await send_spec(connection.client(), body, settings, aggregator_transport)
        generation = int(body.meta.get("generation") or 1)
        fields, events = spec_applied_patch(outcome, dict(status), generation, datetime.now(UTC))
        _set_status(patch, fields)
        _post(body, events)
        if outcome.applied is None:  # retried forever, with backoff; the condition says Unknown
            delay = retry_delay(retry, settings.poll_seconds)
            raise kopf.TemporaryError(outcome.message, delay=delay)

    @kopf.timer(**resource, id="status", interval=settings.poll_seconds, initial_delay=min(settings.poll_seconds, 5.0))
    async def poll(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        try:
            job_from_body(body)
        except SpecError:
            return
        fields, events = await poll_status(connection.client(), body, settings, aggregator_transport)
        _set_status(patch, fields)
        # The next tick may still see the status before this write: each transition posted once.
        recent: list[tuple[str, str]] = memo.setdefault(POLL_EVENTS_MEMO, [])
        fresh = [e for e in events if (e.reason, e.message) not in recent]
        recent[:] = [*recent, *((e.reason, e.message) for e in fresh)][-20:]
        _post(body, fresh)

    @kopf.timer(
        **resource,
        id="resume-request",
        annotations={RESUME_ANNOTATION: kopf.PRESENT},
        interval=settings.poll_seconds,
        initial_delay=min(settings.poll_seconds, 5.0),
    )
    async def resume_requested(
        body: kopf.Body, patch: kopf.Patch, status: kopf.Status, memo: kopf.Memo, **_: Any
    ) -> None:
        value = body.meta.annotations.get(RESUME_ANNOTATION)
        if not value or value == (status.get("resumeRequest") or {}).get("value"):
            return  # handled already (also across operator restarts)
        try:
            job_from_body(body)
        except SpecError:
            return
        fields, events = await resume_job(connection.client(), body, settings, memo, aggregator_transport)
        _set_status(patch, fields)
        _post(body, events)

    @kopf.on.delete(**resource, id="cleanup", backoff=5)
    async def delete_job(body: kopf.Body, **_: Any) -> None:
        ref = (body.meta.namespace or "", body.meta.name or "")
        desired.forget(ref)  # its children's deletions are not drift
        try:
            job = job_from_body(body)
        except SpecError:
            return
        async with lock(ref):
            deleted = await delete_children(connection.client(), job, keep=set())
        if deleted:
            kopf.event(body, type="Normal", reason="Deleted", message=f"{deleted} children deleted")
        locks.pop(ref, None)

    return registry
