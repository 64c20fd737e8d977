"""The `/v1` wire contract: request and response bodies shared by server and clients."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedsilo.spec import FederatedJob

API_PREFIX = "/v1"
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
RoundState = Literal["open", "aggregating", "closed"]

# Headers of an update upload (the body is the raw safetensors delta).
HEADER_EXAMPLES = "X-Fedsilo-Examples"
HEADER_SHA256 = "X-Fedsilo-Sha256"
HEADER_TRAIN_SECONDS = "X-Fedsilo-Train-Seconds"
SAFETENSORS_MEDIA_TYPE = "application/octet-stream"

# Bounds on every number a client sends. Rounds, versions and example counts land in SQL
# INTEGER columns, 32-bit on PostgreSQL: anything larger would fail in the database (a 500).
MAX_INT = 2**31 - 1
MAX_SECONDS = 10**8  # about three years: longer than any round, finite as a float
MAX_RATE = 1e12  # examples per second
Finite = Annotated[float, Field(allow_inf_nan=False)]  # JSON has no NaN/Infinity: they could never be answered


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Request(Wire):
    """A request body: strict types, so JSON `true` is no count and "1.5" no loss."""

    model_config = ConfigDict(extra="forbid", strict=True)


class CreateJob(Request):
    """Create a job. Tokens not given are generated and returned once."""

    job: FederatedJob
    silo_tokens: dict[str, str] = Field(default_factory=dict)


class JobCreated(Wire):
    name: str
    silo_tokens: dict[str, str]
    created: bool


class PatchJob(Request):
    """Change a job. Every field is optional; a patch is applied as one transaction.

    `job`: a new FederatedJob document for the same job. Silos it adds are admitted
    with their tokens from `silo_tokens` (required for each added silo), silos it
    removes are revoked at once, and changes to `aggregation`
    (strategy, params, minSilos, fraction, timeout, mode, codec) and to a silo's own
    `codec` apply from the next round.
    Changes the running silos could not pick up (model, task, PEFT recipe, local
    training) are refused with 422 `immutable`.
    `resume`: a Failed job runs again from the round it failed in, with a new deadline.
    """

    rounds: int | None = Field(default=None, ge=1, le=10_000)
    resume: bool = False
    job: FederatedJob | None = None
    silo_tokens: dict[str, str] = Field(default_factory=dict)


class RotateToken(Request):
    """Give a silo a new token (admin). The current one stays valid for `grace_seconds`.

    Name the token yourself to make the call retry-safe (the operator does): the same
    rotation sent again changes nothing. Without `token` one is generated and returned once.
    """

    token: str | None = Field(default=None, min_length=16, max_length=512)
    grace_seconds: float = Field(default=300.0, ge=0, le=7 * 86400, description="How long the old token still works.")
    expires_in_seconds: float | None = Field(
        default=None, gt=0, le=3 * 365 * 86400, description="The new token stops working this long from now."
    )


class TokenIssued(Wire):
    silo: str
    token: str
    previous_valid_until: datetime | None = Field(description="The old token works until then (None: not at all).")
    expires_at: datetime | None
    rotated: bool = Field(description="False when the token was already in force (a retried rotation).")


class JoinRequest(Request):
    """Sent once by a silo agent at start: what it is and what it can do."""

    n_train_examples: int = Field(ge=0, le=MAX_INT)
    n_eval_examples: int = Field(ge=0, le=MAX_INT)
    device: str = Field(default="cpu", max_length=200)
    throughput_examples_per_second: float | None = Field(default=None, ge=0, le=MAX_RATE)


class JoinResponse(Wire):
    job: FederatedJob
    role: Literal["trainer", "evaluator"]


class Task(Wire):
    """What a silo should do now.

    action: `init` (upload the initial adapter), `train` (round `round` from
    global `version`), `evaluate` (evaluate `version`), `wait`, or `done`.
    """

    action: Literal["init", "train", "evaluate", "wait", "done"]
    round: int = 0
    client_config: dict[str, float | bool] = Field(
        default_factory=dict, description="Strategy hooks for local training, e.g. proximal_mu, freeze_lora_a."
    )
    version: int = 0
    local_steps: int | None = None
    rank: int | None = None
    deadline: datetime | None = None
    secure: bool = Field(default=False, description="Secure aggregation: run the round's SecAgg stages.")
    dp: dict[str, float] = Field(
        default_factory=dict,
        description="Secure aggregation with DP: clip_norm and noise_std, the silo's share of the noise.",
    )


SecAggStage = Literal["keys", "shares", "masking", "unmasking", "aggregating", "closed", "failed"]
class SecAggKeys(Request):
    """A silo's public keys for one secure round (base64): channel key, mask key, seed commitment."""

    c_pk: str = Field(max_length=64)
    s_pk: str = Field(max_length=64)
    b_commit: str = Field(max_length=64)


class SecAggShares(Request):
    """Encrypted share bundles, one per silo of the round's key roster (itself included)."""

    ciphertexts: dict[str, str] = Field(description="recipient -> base64 AES-GCM ciphertext")


class RevealedShare(Request):
    kind: Literal["b", "s"]
    x: int = Field(ge=1, lt=2**32)
    y: str = Field(max_length=128)


class SecAggReveal(Request):
    """A surviving silo's shares for unmasking: of b for silos that uploaded, of s_sk for those that dropped."""

    shares: dict[str, RevealedShare]


class SecAggView(Wire):
    """Where a secure round stands, and what this silo needs from the others for its next step.

    roster: every silo's public keys once the key stage closed (U1); inbox: the share bundles
    addressed to this silo, once the share stage closed (from U2); masked: the silos whose
    masked update counts (U3), once the upload stage closed.
    """

    round: int
    stage: SecAggStage
    threshold: int
    roster: dict[str, SecAggKeys] = Field(default_factory=dict)
    inbox: dict[str, str] = Field(default_factory=dict)
    shared: list[str] = Field(default_factory=list)
    masked: list[str] = Field(default_factory=list)


class MetricsReport(Request):
    """A silo's evaluation of global adapter `version` on its local split."""

    version: int = Field(ge=0, le=MAX_INT)
    split: Literal["validation", "test"]
    loss: Finite
    accuracy: float | None = Field(default=None, ge=0, le=1)
    n_examples: int = Field(ge=1, le=MAX_INT)
    extra: dict[str, Finite] = Field(default_factory=dict)
    generations: dict[str, str] = Field(
        default_factory=dict, description="Causal LM: generation per spec.task.evalPrompts prompt."
    )


class UpdateAccepted(Wire):
    round: int
    sha256: str
    duplicate: bool


class SiloStatus(Wire):
    name: str
    role: str
    state: str
    joined: bool
    last_seen: datetime | None
    rounds_completed: int
    train_examples: int = Field(default=0, description="Declared at the first join: caps the weight of its updates.")
    eval_examples: int = Field(default=0, description="Declared at the first join: caps its evaluation reports.")


class RoundInfo(Wire):
    round: int
    state: RoundState
    participants: list[str]
    updates: int
    examples: int
    bytes_received: int
    opened_at: datetime
    closed_at: datetime | None
    duration_seconds: float | None
    aggregation_seconds: float | None
    max_train_seconds: float | None
    accuracy: float | None
    loss: float | None
    split: str | None
    metrics: dict[str, Any] = Field(default_factory=dict)


class PrivacyStatus(Wire):
    """The job's privacy settings and the differential-privacy budget spent so far."""

    secure_aggregation: bool = False
    dp: bool = False
    epsilon: float | None = Field(default=None, description="Spent at `delta` after the closed rounds (DP on).")
    delta: float | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float | None = None


class JobStatus(Wire):
    name: str
    phase: Phase
    message: str = ""
    round: int
    rounds: int
    version: int
    accuracy: float | None
    loss: float | None
    silos: list[SiloStatus]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    privacy: PrivacyStatus = Field(default_factory=PrivacyStatus)


class Problem(Wire):
    """Every 4xx/5xx body."""

    detail: str
    reason: str | None = None
