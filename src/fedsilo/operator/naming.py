"""Names, labels, owner references and URLs of a job's children (pure)."""

from __future__ import annotations

import hashlib
from typing import Any

from fedsilo.spec import API_GROUP, API_VERSION, KIND, FederatedJob, SiloSpec

MANAGED_BY = "fedsilo-operator"
LABEL_JOB = f"{API_GROUP}/job"
LABEL_JOB_NAMESPACE = f"{API_GROUP}/job-namespace"
LABEL_SILO = f"{API_GROUP}/silo"
LABEL_COMPONENT = "app.kubernetes.io/component"
AGGREGATOR = "aggregator"
SILO_AGENT = "silo-agent"


def child_name(*parts: str, limit: int = 63) -> str:
    """Join parts with '-'; names longer than `limit` are cut and suffixed with a hash."""
    name = "-".join(parts)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def job_namespace(job: FederatedJob) -> str:
    """The job's namespace (`default` when the document has none)."""
    return job.metadata.namespace or "default"


def silo_namespace(job: FederatedJob, silo: SiloSpec) -> str:
    """Namespace of a silo's pod and token Secret (external silos: the job's)."""
    if silo.external:
        return job_namespace(job)
    return silo.namespace or job_namespace(job)


def tokens_secret_name(job: FederatedJob) -> str:
    return child_name(job.metadata.name, "tokens")


def job_configmap_name(job: FederatedJob) -> str:
    return child_name(job.metadata.name, "job")


def aggregator_name(job: FederatedJob) -> str:
    return child_name(job.metadata.name, AGGREGATOR)


def checkpoints_claim_name(job: FederatedJob) -> str:
    return child_name(job.metadata.name, "checkpoints")


def silo_name(job: FederatedJob, silo: SiloSpec) -> str:
    return child_name(job.metadata.name, "silo", silo.name)


def silo_token_secret_name(job: FederatedJob, silo: SiloSpec) -> str:
    return child_name(job.metadata.name, "silo", silo.name, "token")


def aggregator_url(job: FederatedJob, port: int, cluster_domain: str = "cluster.local") -> str:
    """In-cluster URL of the aggregator Service: https unless the job asks for plain HTTP."""
    host = f"{aggregator_name(job)}.{job_namespace(job)}.svc.{cluster_domain}"
    scheme = "http" if job.spec.aggregator.tls.mode == "insecure" else "https"
    return f"{scheme}://{host}:{port}"


def job_labels(job: FederatedJob) -> dict[str, str]:
    """Labels every child carries; they find cross-namespace children on deletion."""
    return {
        "app.kubernetes.io/name": "fedsilo",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job.metadata.name,
        LABEL_JOB_NAMESPACE: job_namespace(job),
    }


def aggregator_selector(job: FederatedJob) -> dict[str, str]:
    return {LABEL_JOB: job.metadata.name, LABEL_COMPONENT: AGGREGATOR}


def silo_selector(job: FederatedJob, silo: SiloSpec) -> dict[str, str]:
    return {LABEL_JOB: job.metadata.name, LABEL_COMPONENT: SILO_AGENT, LABEL_SILO: silo.name}


def owner_reference(job: FederatedJob, uid: str) -> dict[str, Any]:
    """The ownerReference of a child in the job's own namespace."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    job: FederatedJob,
    uid: str,
    name: str,
    namespace: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """metadata of a child: job labels, plus an ownerReference when in the job's namespace."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**job_labels(job), **(labels or {})},
    }
    if annotations:
        meta["annotations"] = annotations
    if namespace == job_namespace(job):
        meta["ownerReferences"] = [owner_reference(job, uid)]
    return meta
