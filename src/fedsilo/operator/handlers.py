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
    AggregatorClient,
    AggregatorError,
    AggregatorRefused,
    retry_delay,
)
from fedsilo.operator.crd import PLURAL
from fedsilo.operator.kube import CHILD_KINDS, KubeClient, KubeError
from fedsilo.operator.manifests import (
    job_children,
    job_document,
    silo_job,
    silo_jobs_to_restart,
    tokens_secret,
)
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.status import (
    AGGREGATOR_UNREACHABLE,
    Event,
    ResumeOutcome,
    SpecOutcome,
    job_status_patch,
    merged_conditions,
    refusal_reason,
    resume_patch,
    spec_applied_patch,
    unreachable_patch,
)
from fedsilo.operator.tokens import Tokens, added_silo_tokens, complete_tokens, tokens_from_secret
from fedsilo.spec import API_GROUP, API_VERSION, KIND, FederatedJob, SpecError, parse_job

LoginFn = Callable[..., kopf.ConnectionInfo | None]
EXTERNAL_URL_ANNOTATION = f"{API_GROUP}/external-url"
# Any new value asks to resume a Failed job. kopf hides `fedsilo.io/*` annotations from its
# change detection (its own storage prefix), so a timer compares it with status.resumeRequest.
RESUME_ANNOTATION = f"{API_GROUP}/resume"
RESUME_MEMO = "fedsilo_resume"  # kopf memo key: (value, outcome, message) already sent
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
    existing = tokens_from_secret(await kube.get("v1", "Secret", namespace, name))
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
        await kube.patch("v1", "Secret", namespace, name, {"data": tokens.secret_data()})
    return tokens


def _key(manifest: Mapping[str, Any]) -> tuple[str, str | None, str]:
    meta = manifest["metadata"]
    return manifest["kind"], meta.get("namespace"), meta["name"]


def _where(item: Mapping[str, Any]) -> tuple[str | None, str]:
    meta = item["metadata"]
    return meta.get("namespace"), meta["name"]


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
        status = await _admin_client(job, tokens, settings, transport).job_status(job.metadata.name)
    except AggregatorError as exc:
        return unreachable_patch(str(exc), previous, generation, moment)
    return job_status_patch(status, previous, generation, moment)


def _admin_client(
    job: FederatedJob,
    tokens: Tokens,
    settings: OperatorSettings,
    transport: httpx.AsyncBaseTransport | None,
) -> AggregatorClient:
    url = naming.aggregator_url(job, settings.aggregator_port, settings.cluster_domain)
    return AggregatorClient(url, tokens.admin, transport=transport)


async def send_spec(
    kube: KubeClient,
    body: Mapping[str, Any],
    settings: OperatorSettings,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SpecOutcome:
    """Send the job's whole document to its aggregator; tokens of added silos go with it.

    The tokens Secret gains the added silos' tokens first (and loses removed silos'), so the
    aggregator never admits a token the silo cannot read. "Added" is relative to the
    document the aggregator runs now (GET .../spec), not to the previous resource.
    """
    meta = body.get("metadata", {})
    generation = int(meta.get("generation", 1))
    try:
        job = job_from_body(body)
    except SpecError as exc:
        return SpecOutcome(False, "InvalidSpec", str(exc))
    tokens = await ensure_tokens(kube, job, str(meta.get("uid") or ""))
    client = _admin_client(job, tokens, settings, transport)
    try:
        running = await client.job_document(job.metadata.name)
        known = {str(s.get("name")) for s in (running.get("spec") or {}).get("silos") or []}
        added = added_silo_tokens(tokens, job.spec, known)
        await client.apply_spec(job.metadata.name, job_document(job), added)
    except AggregatorRefused as exc:
        return SpecOutcome(False, refusal_reason(exc.reason), exc.detail)
    except AggregatorError as exc:
        return SpecOutcome(None, AGGREGATOR_UNREACHABLE, str(exc))
    removed = sorted(known - {s.name for s in job.spec.silos})
    message = f"generation {generation} applied by the aggregator"
    message += f"; silos added: {', '.join(sorted(added))}" if added else ""
    message += f"; silos removed: {', '.join(removed)}" if removed else ""
    return SpecOutcome(True, "Applied", message)


async def restart_silo_jobs(kube: KubeClient, job: FederatedJob, uid: str, settings: OperatorSettings) -> list[str]:
    """Delete the silo Jobs that gave up (`silo_jobs_to_restart`) and create every missing one.

    Idempotent: a retry after a failure half-way creates what is still missing. Returns the
    names of the Jobs deleted (to be started again).
    """
    labels = {
        naming.LABEL_JOB: job.metadata.name,
        naming.LABEL_JOB_NAMESPACE: naming.job_namespace(job),
    }
    existing = await kube.list("batch/v1", "Job", None, labels)
    gave_up = silo_jobs_to_restart(existing)
    for item in gave_up:
        await kube.delete("batch/v1", "Job", item["metadata"].get("namespace"), item["metadata"]["name"])
    present = {_where(i) for i in existing} - {_where(i) for i in gave_up}
    for silo in job.spec.silos:
        if silo.external:
            continue
        manifest = silo_job(job, uid, silo, settings)
        if _where(manifest) in present:
            continue
        try:
            await kube.create(manifest)
        except KubeError as exc:
            if exc.status == 409:  # the old Job is still being deleted
                raise kopf.TemporaryError(
                    f"Job {manifest['metadata']['name']} is still being deleted", delay=2
                ) from exc
            raise
    return sorted(i["metadata"]["name"] for i in gave_up)


async def resume_job(
    kube: KubeClient,
    body: Mapping[str, Any],
    settings: OperatorSettings,
    memo: dict[str, Any],
    transport: httpx.AsyncBaseTransport | None = None,
    now: datetime | None = None,
) -> tuple[dict[str, Any], list[Event]]:
    """Act on a new `fedsilo.io/resume` value: PATCH {"resume": true}, then restart silo Jobs.

    Returns the status patch (`resumeRequest`) and the Event. Transient failures raise
    `kopf.TemporaryError`; the PATCH is sent once per value per process (`memo`), so a retry
    of the silo Job restart does not ask the (now Running) job to resume again.
    """
    meta = body.get("metadata", {})
    value = str((meta.get("annotations") or {}).get(RESUME_ANNOTATION))
    job = job_from_body(body)
    sent = memo.get(RESUME_MEMO)
    if sent is None or sent[0] != value:
        secret = await kube.get("v1", "Secret", naming.job_namespace(job), naming.tokens_secret_name(job))
        tokens = tokens_from_secret(secret)
        if tokens is None:
            raise kopf.TemporaryError("tokens Secret not created yet", delay=settings.poll_seconds)
        outcome: ResumeOutcome = "Resumed"
        message = ""
        try:
            await _admin_client(job, tokens, settings, transport).resume(job.metadata.name)
        except AggregatorRefused as exc:
            outcome = "NotFailed" if exc.reason == "not_failed" else "Refused"
            message = exc.detail
        except AggregatorError as exc:
            raise kopf.TemporaryError(str(exc), delay=settings.poll_seconds) from exc
        sent = memo[RESUME_MEMO] = (value, outcome, message)
    _, outcome, message = sent
    restarted: list[str] = []
    if outcome == "Resumed":
        restarted = await restart_silo_jobs(kube, job, str(meta.get("uid") or ""), settings)
    return resume_patch(value, outcome, message, restarted, now or datetime.now(UTC))


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
