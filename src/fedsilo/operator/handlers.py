"""Thin kopf handlers: parse the FederatedJob, call the pure builders, apply the result.

`build_registry()` returns a kopf registry holding every handler, configured by one
`OperatorSettings`; tests pass a login function (kmock or a test cluster) and an httpx
transport for the aggregator.

Handlers: `reconcile` (children in place), `spec` (every later change of `spec` sent to the
aggregator as a whole document), `status` (timer: the aggregator's status), `resume-request`
(timer: the `fedsilo.io/resume` annotation), `cleanup` (children of a deleted job).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf

from fedsilo.operator import naming
from fedsilo.operator.aggregator_client import (
    AggregatorError,
    retry_delay,
)
from fedsilo.operator.changes import RESUME_ANNOTATION, admin_client, resume_job, send_spec
from fedsilo.operator.crd import PLURAL
from fedsilo.operator.kube import CHILD_KINDS, KubeClient, KubeError
from fedsilo.operator.manifests import (
    job_children,
)
from fedsilo.operator.objects import ensure_tokens, job_from_body
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.status import (
    Event,
    job_status_patch,
    merged_conditions,
    spec_applied_patch,
    unreachable_patch,
)
from fedsilo.operator.tokens import tokens_from_secret
from fedsilo.spec import API_GROUP, API_VERSION, FederatedJob, SpecError

LoginFn = Callable[..., kopf.ConnectionInfo | None]
EXTERNAL_URL_ANNOTATION = f"{API_GROUP}/external-url"
# Children created once and never patched: a bound PVC's spec and a Job's pod template are
# immutable (a patch would be refused), and a finished silo Job must stay as it is.
CREATE_ONLY_KINDS = frozenset({"PersistentVolumeClaim", "Job"})


class Connection:
    """kopf's login result, shared with the operator's own Kubernetes client."""

    def __init__(self) -> None:
        self.info: kopf.ConnectionInfo | None = None
        self._client: KubeClient | None = None

    def set(self, info: kopf.ConnectionInfo | None) -> None:
        self.info = info
        self._client = None  # rebuilt on next use (old pool closed at cleanup)

    def client(self) -> KubeClient:
        """The client for the current credentials."""
        if self.info is None:
            raise kopf.TemporaryError("not logged in to Kubernetes yet", delay=1)
        if self._client is None:
            self._client = KubeClient.from_connection(self.info)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _key(manifest: Mapping[str, Any]) -> tuple[str, str | None, str]:
    meta = manifest["metadata"]
    return manifest["kind"], meta.get("namespace"), meta["name"]


async def job_objects(kube: KubeClient, job: FederatedJob) -> list[dict[str, Any]]:
    """Every labelled child of the job, in every namespace."""
    labels = {
        naming.LABEL_JOB: job.metadata.name,
        naming.LABEL_JOB_NAMESPACE: naming.job_namespace(job),
    }
    found: list[dict[str, Any]] = []
    for api_version, kind in CHILD_KINDS:
        for item in await kube.list(api_version, kind, None, labels):
            found.append({**item, "apiVersion": api_version, "kind": kind})
    return found


async def delete_children(kube: KubeClient, job: FederatedJob, keep: set[tuple[str, str | None, str]]) -> int:
    """Delete the job's labelled children not in `keep`; returns how many were deleted."""
    deleted = 0
    for item in await job_objects(kube, job):
        kind, namespace, name = _key(item)
        if (kind, namespace, name) not in keep:
            deleted += await kube.delete(item["apiVersion"], kind, namespace, name)
    return deleted


def external_silos(job: FederatedJob, url: str) -> list[dict[str, str]]:
    """What each external silo's administrator needs to join."""
    return [
        {"name": s.name, "aggregatorUrl": url, "tokenSecret": naming.silo_token_secret_name(job, s)}
        for s in job.spec.silos
        if s.external
    ]


async def reconcile(kube: KubeClient, body: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """Create or patch every child of the job; returns the status fields to set. Idempotent.

    Kinds in `CREATE_ONLY_KINDS` (the silo Jobs, the PVC) are created when missing and
    otherwise left as they are.
    """
    job = job_from_body(body)
    meta = body.get("metadata", {})
    uid = str(meta.get("uid") or "")
    tokens = await ensure_tokens(kube, job, uid)
    children = job_children(job, uid, tokens, settings)
    secret_key = ("Secret", naming.job_namespace(job), naming.tokens_secret_name(job))
    for child in children:
        if _key(child) == secret_key:
            continue
        try:
            await kube.apply(child, patch_existing=child["kind"] not in CREATE_ONLY_KINDS)
        except KubeError as exc:
            if exc.status == 404:
                raise kopf.TemporaryError(
                    f"cannot create {child['kind']} {'/'.join(str(part) for part in _key(child)[1:])}: {exc.message}",
                    delay=15,
                ) from exc
            raise
    await delete_children(kube, job, {_key(c) for c in children})
    internal = naming.aggregator_url(job, settings.aggregator_port, settings.cluster_domain)
    annotated = (meta.get("annotations") or {}).get(EXTERNAL_URL_ANNOTATION)
    external = job.spec.aggregator.external_url or annotated or internal
    return {
        "aggregatorUrl": internal,
        "adminSecret": naming.tokens_secret_name(job),
        "externalSilos": external_silos(job, external),
        "observedGeneration": meta.get("generation", 1),
    }


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


def _write_status(fields: dict[str, Any], raw: Any) -> None:
    status = dict(raw.get("status") or {})
    for key, value in fields.items():
        status[key] = merged_conditions(status.get("conditions") or [], value) if key == "conditions" else value
    raw["status"] = status


def _post(body: kopf.Body, events: list[Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def build_registry(
    settings: OperatorSettings,
    *,
    login: LoginFn | None = None,
    aggregator_transport: httpx.AsyncBaseTransport | None = None,
) -> kopf.OperatorRegistry:
    """A kopf registry with every FederatedJob handler, bound to `settings`."""
    registry = kopf.OperatorRegistry()
    connection = Connection()
    resource: dict[str, Any] = {"group": API_GROUP, "version": API_VERSION, "plural": PLURAL, "registry": registry}
    login_fn: LoginFn = login or kopf.login_via_client
    operator_settings = settings

    @kopf.on.startup(registry=registry, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = operator_settings.finalizer
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=API_GROUP, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING
        # A deleted job keeps its finalizer until its timers have stopped; a timer caught
        # mid-tick is checked again after this (kopf's default, 60 s, delays every deletion).
        settings.background.cancellation_polling = min(60.0, operator_settings.poll_seconds)

    @kopf.on.login(registry=registry, id="login")
    def authenticate(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = login_fn(**kwargs)
        connection.set(info)
        return info

    @kopf.on.cleanup(registry=registry, id="close")
    async def close(**_: Any) -> None:
        await connection.aclose()

    @kopf.on.resume(**resource, id="reconcile")
    @kopf.on.create(**resource, id="reconcile")
    @kopf.on.update(**resource, id="reconcile", field="spec")
    async def reconcile_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        try:
            fields = await reconcile(connection.client(), body, settings)
        except SpecError as exc:
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
            _set_status(patch, {"phase": "Failed", "message": f"invalid spec: {exc}"})
            return
        if not (body.get("status") or {}).get("phase"):
            fields["phase"] = "Pending"
        _set_status(patch, fields)
        kopf.info(body, reason="Reconciled", message=f"children of {body.meta.name} are in place")

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
    async def poll(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        try:
            job_from_body(body)
        except SpecError:
            return
        fields, events = await poll_status(connection.client(), body, settings, aggregator_transport)
        _set_status(patch, fields)
        _post(body, events)

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
        try:
            job = job_from_body(body)
        except SpecError:
            return
        deleted = await delete_children(connection.client(), job, keep=set())
        kopf.info(body, reason="Deleted", message=f"{deleted} children deleted")

    return registry
