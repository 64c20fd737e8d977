"""The aggregator process's settings: the only place it reads the environment."""

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AggregatorSettings(BaseSettings):
    """Read from `FEDSILO_*` environment variables (or passed directly in tests)."""

    model_config = SettingsConfigDict(env_prefix="FEDSILO_", extra="ignore")

    admin_token: str = Field(min_length=16, description="Bearer token for creating and administering jobs.")
    database_url: str = Field(
        default="sqlite:///fedsilo.db", description="SQLAlchemy URL: SQLite file or postgresql+psycopg://..."
    )
    checkpoint_dir: Path = Field(default=Path("checkpoints"), description="Content-addressed adapter files.")
    host: str = Field(default="0.0.0.0", description="Bind address.")
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port (0: pick a free one).")
    job_file: Path | None = Field(default=None, description="FederatedJob YAML/JSON created (or resumed) at start-up.")
    silo_tokens_file: Path | None = Field(default=None, description="JSON {silo: token} for the job in job_file.")
    tick_seconds: float = Field(default=1.0, gt=0, description="How often round deadlines are checked.")
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A job's writer lease: a second aggregator on the same database waits this long after the "
        "first one stops renewing it (crash) before taking over.",
    )
    log_level: str = Field(default="info")
    metrics_token: str | None = Field(
        default=None,
        min_length=16,
        description="Bearer token of the metrics reader (Prometheus); the admin token works too.",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Also serve /metrics, without a token, on this separate plain-HTTP port (0: off); expose it "
        "only to Prometheus (the operator's NetworkPolicy admits only the metrics namespace to it).",
    )
    per_silo_metrics: bool = Field(
        default=True,
        description="Export per-silo series (loss, accuracy, examples, train time); false: aggregates only.",
    )
    tls_cert_file: Path | None = Field(default=None, description="PEM server certificate (chain) served over HTTPS.")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="Mutual TLS: CA bundle that signs the silos' client certificates. Silo routes then require a "
        "certificate naming the URL's job and silo (admin routes keep the bearer token).",
    )
    insecure_http: bool = Field(
        default=False,
        description="Serve plain HTTP without TLS (tokens and adapters travel in clear): only behind a TLS-terminating "
        "proxy or in tests. Without it the aggregator refuses to start without tls_cert_file and tls_key_file.",
    )
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="A request body that stalls this long is refused with 408."
    )
    ingest_slots: int = Field(
        default_factory=lambda: os.cpu_count() or 2,
        ge=1,
        le=1024,
        description="Uploads parsed, checked and folded at once (default: the CPU count). Bodies stream to disk "
        "whatever their number; only this many hold their tensors in memory, so the peak memory of a round does "
        "not grow with the silo count.",
    )
    torch_threads: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Intra-op threads of torch's math in the aggregator. Uploads are checked and folded in parallel "
        "(ingest_slots), so one thread per operation is fastest, and on a busy machine several are much slower; more "
        "help only the aggregation of few, large lora-exact layers.",
    )

    def tls_problem(self) -> str | None:
        """Why these settings cannot serve (None when they can): HTTPS is the default, plain HTTP opt-in."""
        if self.insecure_http:
            return "FEDSILO_INSECURE_HTTP with TLS files set: choose one" if self.tls_cert_file else None
        if self.tls_cert_file is None or self.tls_key_file is None:
            return (
                "the aggregator serves HTTPS only: set FEDSILO_TLS_CERT_FILE and FEDSILO_TLS_KEY_FILE "
                "(or FEDSILO_INSECURE_HTTP=true for plain HTTP behind a TLS-terminating proxy)"
            )
        return None
