"""Thin kopf handlers: parse the FederatedJob, call the pure builders, apply the result.

`build_registry()` returns a kopf registry holding every handler, configured by one
`OperatorSettings`; tests pass a login function (kmock or a test cluster) and an httpx
transport for the aggregator.

Handlers on FederatedJobs: `reconcile` (children in place), `spec` (every later change of
`spec` sent to the aggregator as a whole document), `status` (timer: the aggregator's
status), `resync` (timer: children re-applied, the safety net), `external-url` (the
annotation's changes), `resume-request` (timer: the `fedsilo.io/resume` annotation),
`rotate-tokens` (timer: the `fedsilo.io/rotate-tokens` annotation, see `rotation.py`),
`cleanup` (children of a deleted job). A job the tenancy policy refuses (`tenancy.py`: silo
namespaces, hostPath, writable data, aggregator image) gets no new children and no spec or
resume sent; the condition `Admitted` says why. Handlers on the children (`repair-<kind>`, watched by
label): a child deleted or changed away from what was applied is restored within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf

from fedsilo.operator import naming, rotation
from fedsilo.operator.aggregator_client import retry_delay
from fedsilo.operator.changes import RESUME_ANNOTATION, admin_client, resume_job, send_spec
from fedsilo.operator.children import Desired, JobRef, Key, delete_children, describe, key, reconcile
from fedsilo.operator.crd import PLURAL
from fedsilo.operator.drift import EXTERNAL_URL_ANNOTATION, external_endpoint
from fedsilo.operator.kube import CHILD_KINDS, KINDS, KubeClient
from fedsilo.operator.objects import job_from_body, rotate_silo_tokens
from fedsilo.operator.reconciled import EXTERNAL_SILOS_READY, Outcome
from fedsilo.operator.reporting import (
    JOB_API,
    failures_error,
    poll_status,
    post,
    post_on,
    reconcile_fields,
    repair_events,
    snapshot,
    write_status,
)
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.status import Event, SpecOutcome, merged_conditions, spec_applied_patch
from fedsilo.operator.tenancy import TenancyPolicy, admission_patch, never_admitted, working_namespaces
from fedsilo.spec import API_GROUP, API_VERSION, FederatedJob, SpecError

LoginFn = Callable[..., kopf.ConnectionInfo | None]
POLL_EVENTS_MEMO = "fedsilo_poll_events"  # kopf memo key: Events the status poll posted lately
CHILD_SELECTOR = f"{naming.LABEL_JOB},app.kubernetes.io/managed-by={naming.MANAGED_BY}"
log = logging.getLogger(__name__)

__all__ = ["EXTERNAL_URL_ANNOTATION", "build_registry"]


def job_ref(body: kopf.Body) -> JobRef:
    """(namespace, name) of the FederatedJob a handler was called for."""
    return body.meta.namespace or "", body.meta.name or ""


class Connection:
    """kopf's login result, shared with the operator's own Kubernetes client."""

    def __init__(self, namespaces: tuple[str, ...] = ()) -> None:
        self.info: kopf.ConnectionInfo | None = None
        self._namespaces = namespaces  # lists "in every namespace" stay in these (namespaced RBAC)
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
            self._client = KubeClient.from_connection(self.info, namespaces=self._namespaces)
        return self._client

    async def aclose(self) -> None:
        for client in [*self._old, *([self._client] if self._client else [])]:
            await client.aclose()
        self._old, self._client = [], None


def build_registry(
    settings: OperatorSettings,
    *,
    login: LoginFn | None = None,
    aggregator_transport: httpx.AsyncBaseTransport | None = None,
) -> kopf.OperatorRegistry:
    """A kopf registry with every FederatedJob and child handler, bound to `settings`."""
    registry = kopf.OperatorRegistry()
    connection = Connection(working_namespaces(settings))
    desired = Desired()
    locks: dict[JobRef, asyncio.Lock] = {}
    warned: dict[JobRef, set[tuple[str, str]]] = {}  # Warnings posted while the problem lasts
    awaiting_namespace: dict[str, set[JobRef]] = {}  # jobs with a child in a missing namespace
    awaiting_label: dict[str, set[JobRef]] = {}  # refused jobs with a silo in a namespace not opted in
    policy = TenancyPolicy.from_settings(settings)
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

    async def refusals(job: FederatedJob) -> list[str]:
        """What the tenancy policy refuses in `job` (namespace labels read where they decide)."""
        labels: dict[str, Mapping[str, str] | None] = {}
        for namespace in policy.labels_needed(job):
            found = await connection.client().get("v1", "Namespace", None, namespace)
            labels[namespace] = None if found is None else (found.get("metadata") or {}).get("labels") or {}
        return policy.check(job, labels)

    def once(ref: JobRef, events: list[Event], resolved: bool) -> list[Event]:
        """Each Warning once while its problem lasts, however many handlers meet it."""
        seen = warned.setdefault(ref, set())
        current = {(e.reason, e.message) for e in events if e.type == "Warning"}
        events = [e for e in events if e.type != "Warning" or (e.reason, e.message) not in seen]
        if resolved:
            seen.clear()
        seen.update(current)
        return events

    async def reconcile_into(
        body: Mapping[str, Any], repairing: tuple[Key, ...] = ()
    ) -> tuple[dict[str, Any], list[Event], Outcome]:
        """Reconcile the job in `body` (nothing is applied when the tenancy policy refuses it);
        its status fields, Events and the outcome."""
        job = job_from_body(body)
        ref = (naming.job_namespace(job), job.metadata.name)
        generation, now = int(body.get("metadata", {}).get("generation") or 1), datetime.now(UTC)
        problems = await refusals(job)
        admitted, admitted_events = admission_patch(problems, body.get("status") or {}, generation, now)
        for waiting in awaiting_label.values():
            waiting.discard(ref)
        if problems:
            for namespace in policy.labels_needed(job):
                awaiting_label.setdefault(namespace, set()).add(ref)
            return admitted, once(ref, admitted_events, resolved=False), Outcome()
        job, outcome = await reconcile(connection.client(), body, settings, desired, repairing)
        fields, events = reconcile_fields(body, outcome, settings, now)
        fields["conditions"] = merged_conditions(fields["conditions"], admitted.pop("conditions"))
        fields.update(admitted)
        for waiting in awaiting_namespace.values():
            waiting.discard(ref)
        for problem in outcome.failures:
            if problem.reason == "NamespaceNotFound" and problem.namespace:
                awaiting_namespace.setdefault(problem.namespace, set()).add(ref)
        resolved = not outcome.failures and (outcome.endpoint is None or outcome.endpoint.ready is not False)
        return fields, once(ref, [*admitted_events, *events], resolved), outcome

    @kopf.on.resume(**resource, id="reconcile")
    @kopf.on.create(**resource, id="reconcile")
    @kopf.on.update(**resource, id="reconcile", field="spec")
    async def reconcile_job(body: kopf.Body, **_: Any) -> None:
        ref = job_ref(body)
        async with lock(ref):
            try:
                fields, events, outcome = await reconcile_into(body)
            except SpecError as exc:
                kopf.event(body, type="Warning", reason="InvalidSpec", message=str(exc))
                await write_status(connection.client(), ref, {"phase": "Failed", "message": f"invalid spec: {exc}"})
                return
            await write_status(connection.client(), ref, fields, body.get("status") or {})
        post(body, events)
        error = failures_error(outcome)
        if error is not None:
            raise error

    @kopf.timer(**resource, id="resync", interval=settings.resync_seconds, initial_delay=settings.resync_seconds)
    async def resync(body: kopf.Body, **_: Any) -> None:
        """The safety net: whatever a watch missed is re-applied (and its status refreshed)."""
        ref = job_ref(body)
        async with lock(ref):
            fresh = await connection.client().get(*JOB_API, *ref)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            try:
                fields, events, _outcome = await reconcile_into(fresh)
            except SpecError:
                return
            await write_status(connection.client(), ref, fields, fresh.get("status") or {})
        post(body, events)

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
        ref = job_ref(body)
        async with lock(ref):
            fresh = await connection.client().get(*JOB_API, *ref)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            fields, events, _outcome = await reconcile_into(fresh)
            await write_status(connection.client(), ref, fields)
        post_on(fresh, events)

    @kopf.on.event("", "v1", "namespaces", registry=registry, id="namespace-created",
                   when=lambda type, body, **_: type in ("ADDED", None) and body.meta.name in awaiting_namespace)
    async def namespace_created(body: kopf.Body, **_: Any) -> None:
        """A silo namespace a job was waiting for exists now: its children follow at once."""
        await reconcile_jobs(awaiting_namespace.pop(body.meta.name or "", set()))

    async def reconcile_jobs(refs: set[JobRef]) -> None:
        """Reconcile these jobs now, each as it is now (a deleted one is skipped)."""
        for ref in sorted(refs):
            async with lock(ref):
                fresh = await connection.client().get(*JOB_API, *ref)
                if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                    continue
                fields, events, _outcome = await reconcile_into(fresh)
                await write_status(connection.client(), ref, fields)
            post_on(fresh, events)

    def opted_in(type: str | None, body: kopf.Body, **_: Any) -> bool:
        return type in ("ADDED", "MODIFIED", None) and body.meta.name in awaiting_label and policy.opted_in(
            body.meta.labels
        )

    @kopf.on.event("", "v1", "namespaces", registry=registry, id="namespace-opted-in", when=opted_in)
    async def namespace_opted_in(body: kopf.Body, **_: Any) -> None:
        """A namespace a refused job wants for a silo now carries the opt-in label: admitted at once."""
        await reconcile_jobs(awaiting_label.pop(body.meta.name or "", set()))

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
            post_on(fresh, repair_events(item, why, events, outcome))
            error = failures_error(outcome)
            if error is not None:
                raise error

    for api_version, kind in CHILD_KINDS:
        register_repair(api_version, kind)

    @kopf.on.update(**resource, id="spec", field="spec", retries=None, backoff=settings.poll_seconds)
    async def spec_changed(body: kopf.Body, status: kopf.Status, retry: int, **_: Any) -> None:
        ref = job_ref(body)
        generation = int(body.meta.get("generation") or 1)
        try:
            refused = await refusals(job_from_body(body))
        except SpecError:
            refused = []  # send_spec reports it
        if refused:  # the aggregator never runs a spec the operator refused
            message = f"generation {generation} was not sent to the aggregator: not admitted (condition Admitted)"
            fields, _events = spec_applied_patch(
                SpecOutcome(False, "NotAdmitted", message), dict(status), generation, datetime.now(UTC)
            )
            await write_status(connection.client(), ref, fields, dict(status))
            raise kopf.TemporaryError(message, delay=settings.resync_seconds)  # sent once admitted
        outcome = await send_spec(connection.client(), body, settings, aggregator_transport)
        fields, events = spec_applied_patch(outcome, dict(status), generation, datetime.now(UTC))
        await write_status(connection.client(), ref, fields, dict(status))
        post(body, events)
        if outcome.applied is None:  # retried forever, with backoff; the condition says Unknown
            # capped at 6 polls (a minute by default): a change reaches an aggregator soon after it is back
            delay = retry_delay(retry, settings.poll_seconds, cap=6 * settings.poll_seconds)
            raise kopf.TemporaryError(outcome.message, delay=delay)

    @kopf.timer(**resource, id="status", interval=settings.poll_seconds, initial_delay=min(settings.poll_seconds, 5.0))
    async def poll(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        job = snapshot(body)
        try:
            job_from_body(job)
        except SpecError:
            return
        if never_admitted(job.get("status")):
            return  # no aggregator to ask
        fields, events = await poll_status(connection.client(), job, settings, aggregator_transport)
        ref = job_ref(body)
        await write_status(connection.client(), ref, fields, job.get("status") or {})
        # The next tick may still see the status before this write: each transition posted once.
        recent: list[tuple[str, str]] = memo.setdefault(POLL_EVENTS_MEMO, [])
        fresh = [e for e in events if (e.reason, e.message) not in recent]
        recent[:] = [*recent, *((e.reason, e.message) for e in fresh)][-20:]
        post(body, fresh)

    @kopf.timer(
        **resource,
        id="resume-request",
        annotations={RESUME_ANNOTATION: kopf.PRESENT},
        interval=settings.poll_seconds,
        initial_delay=min(settings.poll_seconds, 5.0),
    )
    async def resume_requested(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        current = snapshot(body)
        status = current.get("status") or {}
        value = (current["metadata"].get("annotations") or {}).get(RESUME_ANNOTATION)
        if not value or value == (status.get("resumeRequest") or {}).get("value"):
            return  # handled already (also across operator restarts)
        try:
            job = job_from_body(current)
        except SpecError:
            return
        if await refusals(job):
            return  # restarting silo Jobs would create what the policy refuses; acted on once admitted
        fields, events = await resume_job(connection.client(), current, settings, memo, aggregator_transport)
        ref = job_ref(body)
        await write_status(connection.client(), ref, fields, status)  # a late record would resume twice
        post(body, events)

    @kopf.timer(
        **resource, id="rotate-tokens", interval=settings.poll_seconds, initial_delay=min(settings.poll_seconds, 5.0)
    )
    async def rotate_tokens(body: kopf.Body, status: kopf.Status, **kwargs: Any) -> None:
        """A new `fedsilo.io/rotate-tokens` value (or a rotation left pending): silo tokens rotated.

        Judged on the job as it is now (the timer's body may predate this handler's last status
        write), and the status written at once, so the next tick never redoes a finished step.
        """
        if rotation.settled(rotation.requested(body.meta.annotations), status) or never_admitted(dict(status)):
            return  # nothing asked, or handled: no request at all
        ref = job_ref(body)
        client = connection.client()
        async with lock(ref):
            fresh = await client.get(*JOB_API, *ref)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            annotations = fresh["metadata"].get("annotations")
            if rotation.settled(rotation.requested(annotations), fresh.get("status") or {}):
                return
            try:
                job = job_from_body(fresh)
            except SpecError:
                return

            async def reapply() -> None:
                """The silos' token Secrets follow the tokens Secret (a reconcile: no repair undoes it)."""
                current = await client.get(*JOB_API, *ref)
                if current is not None:
                    fields, events, _outcome = await reconcile_into(current)
                    await write_status(client, ref, fields)
                    post_on(current, events)

            fields, events, error = await rotate_silo_tokens(
                client,
                fresh,
                settings,
                lambda tokens: admin_client(client, job, tokens, settings, aggregator_transport),
                reapply,
                lambda fields: write_status(client, ref, fields),
                int(kwargs.get("retry") or 0),
            )
            if fields:
                await write_status(client, ref, fields)
        post_on(fresh, events if error is None else once(ref, events, resolved=False))
        if error is not None:
            raise error

    @kopf.on.delete(**resource, id="cleanup", backoff=5)
    async def delete_job(body: kopf.Body, **_: Any) -> None:
        ref = job_ref(body)
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
