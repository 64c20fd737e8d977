"""Changes an admin makes to a running job, carried to its aggregator: a changed spec
(`send_spec`) and a resume of a Failed job (`resume_job`, with the silo Jobs that gave up
started again)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf

from fedsilo.operator import naming
from fedsilo.operator.aggregator_client import AggregatorClient, AggregatorError, AggregatorRefused
from fedsilo.operator.certificates import job_ca
from fedsilo.operator.kube import KubeClient, KubeError
from fedsilo.operator.manifests import job_document, silo_job, silo_jobs_to_restart
from fedsilo.operator.objects import ensure_tokens, job_from_body, where
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.status import (
    AGGREGATOR_UNREACHABLE,
    Event,
    ResumeOutcome,
    SpecOutcome,
    refusal_reason,
    resume_patch,
)
from fedsilo.operator.tokens import Tokens, added_silo_tokens, tokens_from_secret
from fedsilo.spec import API_GROUP, FederatedJob, SpecError

# Any new value asks to resume a Failed job. kopf hides `fedsilo.io/*` annotations from its
# change detection (its own storage prefix), so a timer compares it with status.resumeRequest.
RESUME_ANNOTATION = f"{API_GROUP}/resume"
RESUME_MEMO = "fedsilo_resume"  # kopf memo key: (value, outcome, message) already sent
RESUME_EVENT_MEMO = "fedsilo_resume_event"  # kopf memo key: the value whose Event was posted


async def admin_client(
    kube: KubeClient,
    job: FederatedJob,
    tokens: Tokens,
    settings: OperatorSettings,
    transport: httpx.AsyncBaseTransport | None,
) -> AggregatorClient:
    """The job's aggregator as its admin, verified against the job's CA (`<job>-tls`)."""
    url = naming.aggregator_url(job, settings.aggregator_port, settings.cluster_domain)
    return AggregatorClient(url, tokens.admin, transport=transport, ca=await job_ca(kube, job))


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
    client = await admin_client(kube, job, tokens, settings, transport)
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
    present = {where(i) for i in existing} - {where(i) for i in gave_up}
    for silo in job.spec.silos:
        if silo.external:
            continue
        manifest = silo_job(job, uid, silo, settings)
        if where(manifest) in present:
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
            await (await admin_client(kube, job, tokens, settings, transport)).resume(job.metadata.name)
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
    fields, events = resume_patch(value, outcome, message, restarted, now or datetime.now(UTC))
    # the timer may fire again before our status write is visible: one Event per value
    if memo.get(RESUME_EVENT_MEMO) == value:
        return fields, []
    memo[RESUME_EVENT_MEMO] = value
    return fields, events
