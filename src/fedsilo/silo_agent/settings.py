"""The silo agent process's settings: the only place it reads the environment."""

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SiloSettings(BaseSettings):
    """Read from `FEDSILO_*` environment variables (or passed directly in tests)."""

    model_config = SettingsConfigDict(env_prefix="FEDSILO_", extra="ignore")

    aggregator_url: str = Field(description="Base URL of the aggregator, e.g. https://fl.example.org")
    job: str = Field(description="FederatedJob name.")
    silo: str = Field(description="This silo's name in the job.")
    token: str | None = Field(default=None, min_length=16, description="This silo's bearer token.")
    token_file: Path | None = Field(
        default=None,
        description="File holding the token instead (a mounted Secret): re-read when the aggregator refuses the "
        "token, so a rotated Secret is picked up without a restart.",
    )
    data_root: Path = Field(default=Path("/data"), description="Relative data paths resolve against this folder.")
    model_path: str | None = Field(default=None, description="Overrides spec.baseModel.path inside this silo.")
    ca_bundle: Path | None = Field(default=None, description="CA bundle for the aggregator's TLS certificate.")
    client_cert: Path | None = Field(
        default=None, description="Mutual TLS: this silo's client certificate (PEM), naming its job and silo."
    )
    client_key: Path | None = Field(default=None, description="Mutual TLS: the private key of client_cert (PEM).")
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads (0: torch's default).")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Serve this agent's /metrics here (0: off).")
    state_dir: Path | None = Field(
        default=None,
        description="Folder this silo keeps across restarts (e.g. a volume); a lossy update codec's "
        "error-feedback residual is saved there (unset: kept in memory only).",
    )
    cache_dir: Path = Field(default=Path.home() / ".cache" / "fedsilo", description="Converted models and caches.")
    poll_seconds: float = Field(
        default=0.2, gt=0, description="Least pause between two task polls that the aggregator answered `wait`."
    )
    long_poll_seconds: float = Field(
        # the server's ceiling: an idle silo costs the aggregator one request per this many seconds
        default=30.0, ge=0, le=30, description="How long the aggregator may hold a `wait` answer (0: plain polling)."
    )
    request_retries: int | None = Field(
        default=None,
        ge=0,
        description="Retries per HTTP call before the agent gives up (unset: for ever, riding out any outage).",
    )
    backoff_cap_seconds: float = Field(
        default=30.0, gt=0, description="Longest pause between two retries (exponential backoff, full jitter)."
    )

    @model_validator(mode="after")
    def _cert_with_key(self) -> "SiloSettings":
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("FEDSILO_CLIENT_CERT and FEDSILO_CLIENT_KEY go together: set both or neither")
        if (self.token is None) == (self.token_file is None):
            raise ValueError("set exactly one of FEDSILO_TOKEN and FEDSILO_TOKEN_FILE")
        return self

    def read_token(self) -> str:
        """The current token: FEDSILO_TOKEN, or the file's content as it is now."""
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        token = self.token_file.read_text().strip()
        if len(token) < 16:
            raise ValueError(f"{self.token_file} does not hold a token (at least 16 characters)")
        return token

    def client_cert_pair(self) -> tuple[Path, Path] | None:
        """(certificate, key) for mutual TLS, or None without a client certificate."""
        return (self.client_cert, self.client_key) if self.client_cert and self.client_key else None
