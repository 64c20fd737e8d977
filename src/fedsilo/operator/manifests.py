"""Pure builders: a FederatedJob -> the Kubernetes manifests of its children.

Every function here is plain data in, plain dicts out; the handlers apply the result.
NetworkPolicies live in `policies.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from fedsilo.operator import naming
from fedsilo.operator.certificates import (
    CA_KEY,
    CERT_KEY,
    KEY_KEY,
    JobTls,
    aggregator_tls_mounts,
    certificates,
    default_tls,
    silo_tls_mounts,
    tls_secret,
)
from fedsilo.operator.policies import network_policies
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tokens import SILO_TOKENS_KEY, TOKEN_KEY, Tokens, encode
from fedsilo.spec import FederatedJob, Resources, SiloSpec, dump_job

Manifest = dict[str, Any]

STATE_DIR = "/var/lib/fedsilo"
JOB_DIR = "/etc/fedsilo/job"
TOKENS_DIR = "/etc/fedsilo/tokens"
SILO_TOKEN_DIR = "/etc/fedsilo/token"
TLS_ANNOTATION = "fedsilo.io/tls-certificate"  # the served certificate's digest: a new one restarts the pod
JOB_FILE_KEY = "job.yaml"
DATA_DIR = "/data"
CACHE_DIR = "/cache"
SILO_STATE_DIR = "/state"  # FEDSILO_STATE_DIR: a codec's error-feedback residual outlives a crashed agent
RUN_AS = 10001
SILO_BACKOFF_LIMIT = 6  # pod retries of a silo agent Job before it is Failed


def tokens_secret(job: FederatedJob, uid: str, tokens: Tokens) -> Manifest:
    """The job's Secret: admin token and the JSON map of silo tokens."""
    name = naming.tokens_secret_name(job)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": naming.metadata(job, uid, name, naming.job_namespace(job)),
        "type": "Opaque",
        "data": tokens.secret_data(),
    }


def silo_token_secret(
    job: FederatedJob, uid: str, silo: SiloSpec, token: str, url: str | None, job_tls: JobTls | None = None
) -> Manifest:
    """One silo's token (in the silo's namespace), with what the agent needs to join.

    `url` is the aggregator URL this silo connects to; None (an external silo while the job
    has no public URL) leaves the `aggregator-url` key out rather than handing out one the
    other organisation cannot reach. With TLS: the CA bundle `ca.crt` and, with mutual TLS
    issued by the operator, the silo's client certificate and key (`tls.crt`, `tls.key`).
    """
    namespace = naming.silo_namespace(job, silo)
    name = naming.silo_token_secret_name(job, silo)
    values = {TOKEN_KEY: token, "job": job.metadata.name, "silo": silo.name}
    if url:
        values["aggregator-url"] = url
    if job_tls is not None and job_tls.ca:
        values[CA_KEY] = job_tls.ca
    pair = job_tls.silo_pair(silo.name) if job_tls is not None else None
    if pair is not None:
        values[CERT_KEY], values[KEY_KEY] = pair
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": naming.metadata(job, uid, name, namespace, {naming.LABEL_SILO: silo.name}),
        "type": "Opaque",
        "data": {key: encode(value) for key, value in values.items()},
    }


def job_document(job: FederatedJob) -> dict[str, Any]:
    """The job document the aggregator runs: in the ConfigMap and in every spec change."""
    return dump_job(job)


def job_configmap(job: FederatedJob, uid: str) -> Manifest:
    """The job document the aggregator creates (or resumes) at start-up."""
    name = naming.job_configmap_name(job)
    text = yaml.safe_dump(job_document(job), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": naming.metadata(job, uid, name, naming.job_namespace(job)),
        "data": {JOB_FILE_KEY: text},
    }


def checkpoints_claim(job: FederatedJob, uid: str) -> Manifest:
    """The aggregator's checkpoint (and SQLite) volume."""
    name = naming.checkpoints_claim_name(job)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": naming.metadata(job, uid, name, naming.job_namespace(job)),
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": job.spec.aggregator.storage_size}},
        },
    }


def aggregator_service(
    job: FederatedJob, uid: str, settings: OperatorSettings, job_tls: JobTls | None = None
) -> Manifest:
    """ClusterIP Service of the aggregator, annotated for Prometheus scraping.

    The API port keeps its name `http` whatever the scheme; Prometheus scrapes the separate
    `metrics` port (plain HTTP, no token: the NetworkPolicy admits only the metrics namespace).
    """
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/scheme": "http",
        "prometheus.io/port": str(settings.aggregator_metrics_port),
        "prometheus.io/path": "/metrics",
    }
    meta = naming.metadata(
        job,
        uid,
        naming.aggregator_name(job),
        naming.job_namespace(job),
        {naming.LABEL_COMPONENT: naming.AGGREGATOR},
        annotations,
    )
    ports = [
        {"name": "http", "port": settings.aggregator_port, "targetPort": "http", "protocol": "TCP"},
        {"name": "metrics", "port": settings.aggregator_metrics_port, "targetPort": "metrics", "protocol": "TCP"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"type": "ClusterIP", "selector": naming.aggregator_selector(job), "ports": ports},
    }


def container_resources(
    resources: Resources, default_requests: dict[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Kubernetes `resources` (quantities as strings; GPUs such as nvidia.com/gpu included).

    `default_requests` fill in the requests the spec leaves out (so the pod is not BestEffort).
    """
    out: dict[str, dict[str, str]] = {}
    requests = {**(default_requests or {}), **{k: str(v) for k, v in (resources.requests or {}).items()}}
    if requests:
        out["requests"] = requests
    if resources.limits:
        out["limits"] = {k: str(v) for k, v in resources.limits.items()}
    return out


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _deployment(meta: Manifest, selector: dict[str, str], pod_labels: dict[str, str], pod: Manifest) -> Manifest:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


def aggregator_deployment(
    job: FederatedJob, uid: str, settings: OperatorSettings, job_tls: JobTls | None = None
) -> Manifest:
    """The aggregator: one replica (Recreate), checkpoint PVC, probes, admin token env, TLS."""
    job_tls = job_tls or default_tls(job)
    spec = job.spec.aggregator
    secret = naming.tokens_secret_name(job)
    database: dict[str, Any] = {
        "name": "FEDSILO_DATABASE_URL",
        "value": f"sqlite:///{STATE_DIR}/fedsilo.db",
    }
    if spec.database_secret:
        database = _secret_env("FEDSILO_DATABASE_URL", spec.database_secret, "url")
    env = [
        _secret_env("FEDSILO_ADMIN_TOKEN", secret, "admin-token"),
        database,
        {"name": "FEDSILO_CHECKPOINT_DIR", "value": f"{STATE_DIR}/checkpoints"},
        {"name": "FEDSILO_PORT", "value": str(settings.aggregator_port)},
        {"name": "FEDSILO_METRICS_PORT", "value": str(settings.aggregator_metrics_port)},
        {"name": "FEDSILO_PER_SILO_METRICS", "value": str(settings.per_silo_metrics).lower()},
        {"name": "FEDSILO_JOB_FILE", "value": f"{JOB_DIR}/{JOB_FILE_KEY}"},
        {"name": "FEDSILO_SILO_TOKENS_FILE", "value": f"{TOKENS_DIR}/{SILO_TOKENS_KEY}"},
    ]
    tls_env, tls_volume, tls_mount = aggregator_tls_mounts(job, job_tls)
    env += tls_env
    scheme = job_tls.scheme.upper()  # probes need no client certificate (the handshake does not require one)
    probe = {
        "httpGet": {"path": "/healthz", "port": "http", "scheme": scheme},
        "periodSeconds": 10,
        "failureThreshold": 6,
    }
    container = {
        "name": naming.AGGREGATOR,
        "image": spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["aggregator"],
        "env": env,
        "ports": [
            {"name": "http", "containerPort": settings.aggregator_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": settings.aggregator_metrics_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            **probe,
            "httpGet": {"path": "/readyz", "port": "http", "scheme": scheme},
            "periodSeconds": 5,
        },
        "livenessProbe": probe,
        "resources": container_resources(
            spec.resources, {"cpu": settings.aggregator_cpu_request, "memory": settings.aggregator_memory_request}
        ),
        "securityContext": _security_context(),
        "volumeMounts": [
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "job", "mountPath": JOB_DIR, "readOnly": True},
            {"name": "tokens", "mountPath": TOKENS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *([tls_mount] if tls_mount else []),
        ],
    }
    volumes = [
        {
            "name": "state",
            "persistentVolumeClaim": {"claimName": naming.checkpoints_claim_name(job)},
        },
        {"name": "job", "configMap": {"name": naming.job_configmap_name(job)}},
        {
            "name": "tokens",
            "secret": {
                "secretName": secret,
                "items": [{"key": SILO_TOKENS_KEY, "path": SILO_TOKENS_KEY}],
            },
        },
        {"name": "tmp", "emptyDir": {}},
    ]
    if tls_volume is not None:
        volumes.append(tls_volume)
    pod = {
        "securityContext": _pod_security(),
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
    }
    labels = {**naming.job_labels(job), naming.LABEL_COMPONENT: naming.AGGREGATOR}
    meta = naming.metadata(job, uid, naming.aggregator_name(job), naming.job_namespace(job), labels)
    deployment = _deployment(meta, naming.aggregator_selector(job), labels, pod)
    if job_tls.data:
        deployment["spec"]["template"]["metadata"]["annotations"] = {TLS_ANNOTATION: job_tls.server_digest()}
    return deployment


def data_volume(silo: SiloSpec) -> dict[str, Any] | None:
    """The volume mounted at /data: an existing PVC, a host folder or scratch space."""
    volume = silo.volume
    if volume is None:
        return None
    if volume.persistent_volume_claim is not None:
        claim = {"claimName": volume.persistent_volume_claim, "readOnly": volume.read_only}
        return {"name": "data", "persistentVolumeClaim": claim}
    if volume.host_path is not None:
        return {"name": "data", "hostPath": {"path": volume.host_path, "type": "Directory"}}
    return {"name": "data", "emptyDir": {}}


def silo_job(
    job: FederatedJob, uid: str, silo: SiloSpec, settings: OperatorSettings, job_tls: JobTls | None = None
) -> Manifest:
    """One in-cluster silo's agent as a batch/v1 Job, in the silo's namespace, data at /data.

    The agent exits 0 once the federated job is done, so it runs to completion (a
    Deployment would restart it forever); failures are retried up to `SILO_BACKOFF_LIMIT`.
    No ttlSecondsAfterFinished: the finished Job and its logs stay, and the operator does not
    re-create (and re-run) a Job that a TTL controller removed. The pod template is immutable:
    the handlers create this object and never patch it.
    """
    url = naming.aggregator_url(job, settings.aggregator_port, settings.cluster_domain)
    env = [
        {"name": "FEDSILO_AGGREGATOR_URL", "value": url},
        {"name": "FEDSILO_JOB", "value": job.metadata.name},
        {"name": "FEDSILO_SILO", "value": silo.name},
        # a file, not an env var: a rotated token reaches the running agent (kubelet refreshes the mount)
        {"name": "FEDSILO_TOKEN_FILE", "value": f"{SILO_TOKEN_DIR}/{TOKEN_KEY}"},
        {"name": "FEDSILO_DATA_ROOT", "value": DATA_DIR},
        {"name": "FEDSILO_METRICS_PORT", "value": str(settings.silo_metrics_port)},
        {"name": "FEDSILO_CACHE_DIR", "value": CACHE_DIR},
        {"name": "FEDSILO_STATE_DIR", "value": SILO_STATE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
    ]
    tls_env, tls_volumes, tls_mounts = silo_tls_mounts(job, silo, job_tls or default_tls(job))
    env += tls_env
    token_items = [{"key": TOKEN_KEY, "path": TOKEN_KEY}]
    mounts: list[dict[str, Any]] = [
        {"name": "token", "mountPath": SILO_TOKEN_DIR, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "state", "mountPath": SILO_STATE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        *tls_mounts,
    ]
    # `state` is an emptyDir: with restartPolicy OnFailure a crashed agent restarts in the same pod
    # and finds its residual; a new pod (node lost) starts the residual from zero, which costs only
    # the dropped remainder of one update, never a double count.
    volumes: list[dict[str, Any]] = [
        {"name": "token", "secret": {"secretName": naming.silo_token_secret_name(job, silo), "items": token_items}},
        {"name": "cache", "emptyDir": {}},
        {"name": "state", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        *tls_volumes,
    ]
    data = data_volume(silo)
    if data is not None:
        read_only = bool(silo.volume and silo.volume.read_only)
        mounts.insert(0, {"name": "data", "mountPath": DATA_DIR, "readOnly": read_only})
        volumes.insert(0, data)
    container = {
        "name": naming.SILO_AGENT,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["silo-agent"],
        "env": env,
        "ports": [{"name": "metrics", "containerPort": settings.silo_metrics_port, "protocol": "TCP"}],
        "resources": container_resources(silo.resources),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "securityContext": _pod_security(),
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
    }
    if silo.node_selector:
        pod["nodeSelector"] = dict(silo.node_selector)
    if silo.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in silo.tolerations]
    # The pods carry the silo selector: the NetworkPolicies select them by it.
    labels = {**naming.job_labels(job), **naming.silo_selector(job, silo)}
    namespace = naming.silo_namespace(job, silo)
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.silo_metrics_port),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": naming.metadata(job, uid, naming.silo_name(job, silo), namespace, labels),
        "spec": {
            "backoffLimit": SILO_BACKOFF_LIMIT,
            "template": {
                "metadata": {"labels": dict(labels), "annotations": annotations},
                "spec": pod,
            },
        },
    }


def _failed(job: Manifest) -> bool:
    """Whether a batch Job has given up (condition `Failed`: its pods exhausted `backoffLimit`)."""
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Failed" and c.get("status") == "True" for c in conditions)


def silo_jobs_to_restart(jobs: Iterable[Manifest]) -> list[Manifest]:
    """The silo Jobs to delete and create again when a Failed federated job is resumed.

    Those that gave up (`Failed`) while the job was Failed. A `Complete` one is left alone: its
    agent exits 0 only once the job has Succeeded (a Failed job tells its agents to wait).
    """
    return [j for j in jobs if (j.get("metadata", {}).get("labels") or {}).get(naming.LABEL_SILO) and _failed(j)]


def job_children(
    job: FederatedJob,
    uid: str,
    tokens: Tokens,
    settings: OperatorSettings,
    external_url: str | None = None,
    job_tls: JobTls | None = None,
) -> list[Manifest]:
    """Every child of a job, in apply order (Secrets and config before the pods using them).

    `external_url` is the aggregator's public URL, written into external silos' token Secrets.
    `job_tls`: the job's certificates (`certificates.read_job_tls`).
    """
    job_tls = job_tls or default_tls(job)
    url = naming.aggregator_url(job, settings.aggregator_port, settings.cluster_domain)
    children = [tokens_secret(job, uid, tokens)]
    if job_tls.mode == "operator" and job_tls.data:
        children.append(tls_secret(job, uid, job_tls))
    elif job_tls.mode == "certManager":
        children.extend(certificates(job, uid, settings))
    children += [
        job_configmap(job, uid),
        checkpoints_claim(job, uid),
        aggregator_service(job, uid, settings, job_tls),
        aggregator_deployment(job, uid, settings, job_tls),
    ]
    for silo in job.spec.silos:
        silo_url = external_url if silo.external else url
        children.append(silo_token_secret(job, uid, silo, tokens.silos[silo.name], silo_url, job_tls))
    children.extend(network_policies(job, uid, settings))
    for silo in job.spec.silos:
        if not silo.external:
            children.append(silo_job(job, uid, silo, settings, job_tls))
    return children
