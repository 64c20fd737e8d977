"""The operator process's settings: the only place it reads the environment."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    """Read from `FEDSILO_*` environment variables (or passed directly in tests)."""

    model_config = SettingsConfigDict(env_prefix="FEDSILO_", extra="ignore")

    image: str = Field(
        default="ghcr.io/fedsilo/fedsilo:0.1.0",
        description="Image of the aggregator and silo-agent pods (spec.aggregator.image wins).",
    )
    image_pull_policy: str = Field(default="IfNotPresent", description="Pull policy of child pods.")
    watch_namespaces: str = Field(
        default="",
        description="Comma-separated namespaces (globs allowed) to watch; empty: all.",
    )
    poll_seconds: float = Field(default=10.0, gt=0, description="Aggregator status poll interval.")
    resync_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Safety-net resync: every job's children are re-applied this often (watches repair at once).",
    )
    aggregator_cpu_request: str = Field(
        default="250m", description="CPU request of the aggregator when spec.aggregator.resources sets none."
    )
    aggregator_memory_request: str = Field(
        default="512Mi", description="Memory request of the aggregator when spec.aggregator.resources sets none."
    )
    log_level: str = Field(default="INFO", description="Log level of the operator (httpx and urllib3 stay at WARNING).")
    aggregator_port: int = Field(default=8080, ge=1, le=65535, description="Aggregator HTTP port.")
    aggregator_metrics_port: int = Field(
        default=9090,
        ge=1,
        le=65535,
        description="Aggregator's separate /metrics port (plain HTTP, no token; only the metrics namespace "
        "may reach it).",
    )
    per_silo_metrics: bool = Field(
        default=True, description="Aggregators export per-silo series (false: aggregate series only)."
    )
    silo_metrics_port: int = Field(default=9090, ge=1, le=65535, description="Silo agent /metrics port.")
    cluster_domain: str = Field(default="cluster.local", description="Cluster DNS domain.")
    metrics_namespace: str = Field(
        default="monitoring",
        description="Namespace of Prometheus: NetworkPolicies admit metrics scrapes from it.",
    )
    ingress_namespace: str = Field(
        default="ingress-nginx",
        description="Namespace of the ingress controller that forwards external silos' traffic.",
    )
    operator_namespace: str = Field(
        default="fedsilo-system",
        description="Namespace of this operator: NetworkPolicies admit its status polls.",
    )
    # --- Tenancy: what a FederatedJob may ask of the cluster (checked by operator/tenancy.py).
    silo_namespaces: str = Field(
        default="",
        description="Comma-separated namespaces (globs allowed) where any job's silos may run, besides the "
        "job's own namespace; empty: only the job's own (and labelled ones, see silo_namespace_label).",
    )
    silo_namespace_label: str = Field(
        default="",
        description="Label (`key=value`, or `key` for any value) by which a namespace opts in to host any "
        "job's silos, e.g. fedsilo.io/silos=allowed; empty: no opt-in by label.",
    )
    allow_host_path: bool = Field(default=False, description="Allow hostPath data volumes in silos.")
    allow_writable_data: bool = Field(
        default=False, description="Allow silo data volumes (PVC, hostPath) mounted read-write."
    )
    aggregator_images: str = Field(
        default="",
        description="Comma-separated globs of spec.aggregator.image values allowed besides the operator's "
        "own image repository (any tag or digest of it is always allowed).",
    )
    # --- end of tenancy
    ca_secret: str = Field(
        default="fedsilo-ca",
        description="Secret (in operator_namespace) holding the CA that issues the jobs' certificates; created once.",
    )
    token_grace_seconds: float = Field(
        default=600.0,
        ge=0,
        le=7 * 86400,
        description="When silo tokens are rotated (annotation fedsilo.io/rotate-tokens), how long the "
        "aggregator still accepts the previous ones: the time silo agents have to pick up their new Secret.",
    )
    finalizer: str = Field(default="fedsilo.io/cleanup", description="Finalizer on FederatedJobs.")
    peering: bool = Field(default=False, description="Use kopf peering (several replicas); standalone when false.")

    def namespaces(self) -> list[str]:
        """The namespaces to watch; empty means cluster-wide."""
        return [ns.strip() for ns in self.watch_namespaces.split(",") if ns.strip()]
