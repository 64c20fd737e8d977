"""The `FederatedJob` resource as pydantic models: the one source of truth.

The CRD (`crds/`), the local runner, the operator and the aggregator all read these
models. YAML uses Kubernetes' camelCase (`learningRate`); Python uses snake_case.
Unknown fields are rejected everywhere so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "fedsilo.io"
API_VERSION = "v1alpha1"
KIND = "FederatedJob"

MAX_TIMEOUT = 366 * 24 * 3600  # a year: a deadline must stay a date (datetime ends in year 9999)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 label (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )
    return value


DnsLabel = Annotated[str, StringConstraints(max_length=63, pattern=_DNS_LABEL.pattern), AfterValidator(_dns_label)]


# Strategies whose accumulator is a weighted sum of deltas: they stay correct when the deltas
# of one buffer were trained from different global versions (aggregation.mode async).
ASYNC_STRATEGIES = frozenset(
    {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "clipped-fedavg", "ffa-lora"}
)
# Strategies that need only the (weighted) sum of a round's deltas, never one silo's delta:
# they work under secure aggregation (the aggregator learns only the sum) and client-level DP.
SUM_STRATEGIES = ASYNC_STRATEGIES | {"fedkd"}


class Model(BaseModel):
    """Base of every spec model: camelCase in YAML, unknown fields rejected, numbers finite.

    (An infinite float would be stored as null, and an infinite timeout overflows the round's deadline.)
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
    )


class BaseModelSpec(Model):
    """The pretrained model every silo starts from. It is loaded offline, never downloaded."""

    path: str = Field(
        min_length=1, description="Local folder of a Hugging Face model, or a hub id already in the local cache."
    )
    revision: str | None = Field(default=None, description="Hub revision, when `path` is a hub id.")
    gguf_file: str | None = Field(default=None, description="GGUF file inside `path` to dequantise (causal LM only).")


class TaskSpec(Model):
    """What the model learns."""

    type: Literal["sequence-classification", "causal-lm"] = Field(
        default="sequence-classification", description="Task head and loss."
    )
    labels: list[str] = Field(
        default_factory=list,
        description="Class names in index order (sequence classification). Every silo maps its label column onto them.",
    )

    eval_prompts: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Fixed prompts (causal LM) whose generations are stored per round so users can read progress.",
    )
    max_new_tokens: int = Field(default=48, ge=1, le=1024, description="Tokens generated per eval prompt.")

    @model_validator(mode="after")
    def _labels_fit_task(self) -> TaskSpec:
        if self.type == "sequence-classification":
            if len(self.labels) < 2:
                raise ValueError("task.labels needs at least two class names for sequence-classification")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("task.labels has duplicate class names")
        return self


class PeftSpec(Model):
    """The parameter-efficient adapter that silos train and exchange."""

    method: Literal["lora", "dora", "ia3", "prompt-tuning"] = Field(default="lora", description="PEFT method.")
    r: int = Field(default=8, ge=1, le=1024, description="LoRA rank of the global adapter.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        description="Module names the adapter wraps (e.g. query/value for BERT, q_proj/v_proj for LLaMA).",
    )
    num_virtual_tokens: int = Field(default=16, ge=1, le=512, description="Prompt-tuning length.")
    feedforward_modules: list[str] = Field(
        default_factory=list,
        description="IA3: the targetModules that are feed-forward layers (scaled on their input, not output).",
    )
    prompt_init: Literal["random", "text"] = Field(
        default="random", description="Prompt tuning: random virtual tokens, or the embedding of promptInitText."
    )
    prompt_init_text: str | None = Field(
        default=None, description="Prompt tuning: text whose tokens initialise the prompt."
    )

    @model_validator(mode="after")
    def _method_fields(self) -> PeftSpec:
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise ValueError(f"peft.feedforwardModules {extra} must also be listed in peft.targetModules")
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise ValueError("peft.promptInitText is required when peft.promptInit is text")
        return self


class TrainingSpec(Model):
    """Rounds and each silo's local optimisation."""

    rounds: int = Field(default=3, ge=1, le=10_000, description="Federated rounds to run.")
    local_epochs: float | None = Field(default=1.0, gt=0, description="Passes over the local training split per round.")
    local_steps: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Optimizer steps per round; overrides localEpochs."
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per optimizer step.")
    learning_rate: float = Field(default=1e-3, gt=0, le=10, description="AdamW learning rate on the silo.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    logit_adjustment: float | None = Field(
        default=None,
        ge=0,
        le=10,
        description="Label-skew remedy for sequence classification (logit adjustment / balanced softmax, "
        "as in FedLC): each silo trains on logits + tau * log(its own label frequencies), so a silo that sees "
        "mostly one class stops pulling the shared model towards that class. 0 is plain cross-entropy. "
        "Unset: 1 for sequence classification (with a spec.distillation teacher too: measured better than KD "
        "alone), except under fedkd, whose private-teacher loss it is not combined with; else 0 "
        "(benchmarks/results/label-skew.md, benchmarks/results/fedkd_lora.md).",
    )
    max_length: int = Field(default=128, ge=8, le=32_768, description="Tokens per example after truncation.")
    seed: int = Field(
        default=0, ge=0, le=2**32 - 1, description="Seed for splits, adapter initialisation and sampling (< 2^32)."
    )
    eval_batch_size: int = Field(default=32, ge=1, description="Examples per forward pass when evaluating.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="Compute precision: bf16/fp16 load the base weights in that type and autocast forward passes "
        "(adapters stay fp32). fp16 needs CUDA; bf16 on CPU is allowed.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, ~30% more time."
    )
    load_in_4bit: bool = Field(
        default=False,
        alias="loadIn4bit",
        description="QLoRA: quantise the frozen base model to 4-bit NF4 (bitsandbytes, CUDA only).",
    )


class CodecSpec(Model):
    """How a silo encodes its update for the wire (the aggregator decodes it back to fp32 before anything else).

    The default is today's plain fp32 safetensors. Lossy choices (fp16, bf16, int8, topK) keep what they drop
    on the silo (errorFeedback) and add it to the next round's update, so nothing is lost for good.
    """

    dtype: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        default="fp32",
        description="Element type on the wire. int8: symmetric 8-bit quantisation with float32 scales.",
    )
    int8_scale: Literal["tensor", "channel"] | None = Field(
        default=None,
        alias="int8Scale",
        description="int8 only: one scale per tensor, or one per output row (channel) of each tensor of two or "
        "more dimensions. Default: channel; tensor with topK (the kept entries are the largest anyway, and a "
        "scale per row would cost as much as the entries).",
    )
    top_k: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Top-k sparsification: send only this fraction of each tensor's entries, those of largest "
        "magnitude (as indices and values); null sends every entry.",
    )
    error_feedback: bool = Field(
        default=True,
        description="Keep what the codec dropped (the residual) on the silo and add it to the next update; "
        "reset when the codec changes.",
    )
    zstd: bool = Field(default=False, description="Compress the encoded payload with zstd (lossless).")

    @model_validator(mode="after")
    def _int8_scale_needs_int8(self) -> CodecSpec:
        if self.int8_scale is not None and self.dtype != "int8":
            raise ValueError(f"codec.int8Scale applies to dtype int8 only, not {self.dtype}")
        return self

    @property
    def scale(self) -> Literal["tensor", "channel"]:
        """int8's scale granularity: as set, else channel (tensor with topK)."""
        return self.int8_scale or ("tensor" if self.top_k is not None else "channel")

    def is_plain(self) -> bool:
        """True for today's wire format: fp32, every entry, uncompressed."""
        return self.dtype == "fp32" and self.top_k is None and not self.zstd


class AggregationSpec(Model):
    """How the aggregator combines silo updates and paces rounds."""

    strategy: str = Field(default="fedavg", min_length=1, description="Registered strategy name, e.g. fedavg.")
    params: dict[str, float] = Field(
        default_factory=dict, description="Strategy parameters (server learning rate, betas, trim ratio ...)."
    )
    min_silos: int = Field(default=1, ge=1, description="Updates needed to close a round at its deadline.")
    fraction: float = Field(default=1.0, gt=0, le=1, description="Fraction of joined trainers sampled per round.")
    round_timeout_seconds: float = Field(
        default=3600, gt=0, le=MAX_TIMEOUT, description="Deadline of a round; late silos are skipped."
    )
    max_update_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, description="Largest accepted update upload.")
    balance_workload: bool = Field(
        default=False,
        description="After round 1, give each silo the local steps that fit a common round time (needs localSteps).",
    )
    mode: Literal["sync", "async"] = Field(
        default="sync",
        description="sync: rounds wait for the sampled silos (or the deadline). async: buffered asynchronous "
        "aggregation (FedBuff): a new global adapter every bufferSize updates, stale updates down-weighted.",
    )
    buffer_size: int | None = Field(
        default=None,
        ge=1,
        description="async: updates per aggregation (default: minSilos).",
    )
    max_staleness: int = Field(
        default=4,
        ge=0,
        description="async: updates trained from a global adapter more than this many versions old are refused.",
    )
    staleness_exponent: float = Field(
        default=0.5,
        ge=0,
        description="async: an update s versions stale is weighted by n_examples / (1 + s) ** stalenessExponent.",
    )
    secure: bool = Field(
        default=False,
        description="Secure aggregation (pairwise-masked updates, SecAgg): the aggregator learns only the sum "
        "of a round's updates. Needs mode sync, a weighted-sum strategy and minSilos >= 2.",
    )
    secure_threshold: float = Field(
        default=0.6,
        gt=0.5,
        le=1,
        description="secure: fraction of a round's participants whose shares unmask the sum (t = ceil(f * n), "
        "at least 2). Up to n - t silos may drop after masking; a coalition of the aggregator with fewer than t "
        "silos learns nothing beyond the sum.",
    )
    secure_stage_timeout_seconds: float = Field(
        default=60,
        gt=0,
        le=MAX_TIMEOUT,
        description="secure: how long the key and share exchanges and the unmasking wait for silos that are "
        "slow to answer before going on without them (at least t are needed).",
    )
    codec: CodecSpec = Field(
        default_factory=CodecSpec,
        description="How silos encode their updates (dtype, int8 scales, top-k, error feedback, zstd); "
        "a silo may override it. Default: plain fp32.",
    )


class DPSpec(Model):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): clip, then add Gaussian noise."""

    clip_norm: float = Field(gt=0, description="Each silo's update is scaled to at most this L2 norm (C).")
    noise_multiplier: float = Field(
        ge=0,
        description="sigma: the round's sum carries Gaussian noise of standard deviation sigma * C "
        "(added by the aggregator, or in shares by the silos under secure aggregation).",
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="The delta at which epsilon is reported.")
    target_epsilon: float | None = Field(
        default=None, gt=0, description="Privacy budget: no round starts that would spend more than this."
    )
    on_target: Literal["stop", "warn"] = Field(
        default="stop",
        description="stop: finish the job with the last adapter inside the budget. warn: go on, flagged.",
    )
    accountant: Literal["rdp", "prv"] = Field(default="rdp", description="Opacus accountant that computes epsilon.")


class PrivacySpec(Model):
    """Privacy guarantees of the job."""

    dp: DPSpec | None = Field(default=None, description="Client-level differential privacy; off when absent.")


class DataSpec(Model):
    """Where a silo's own examples live. Paths are read inside the silo, never sent."""

    path: str = Field(
        min_length=1,
        description="CSV, JSONL or Parquet file; relative paths resolve against the job file's folder (local) "
        "or /data (cluster).",
    )
    format: Literal["csv", "jsonl", "parquet"] | None = Field(
        default=None, description="File format; inferred from the suffix when omitted."
    )
    text_field: str = Field(default="text", min_length=1, description="Column with the input text.")
    text_pair_field: str | None = Field(default=None, description="Optional second text column (sentence pairs).")
    label_field: str = Field(default="label", min_length=1, description="Column with the class name.")
    instruction_field: str = Field(
        default="instruction", min_length=1, description="Causal LM: column with the instruction."
    )
    input_field: str = Field(
        default="input", min_length=1, description="Causal LM: optional column appended to the instruction."
    )
    output_field: str = Field(
        default="output", min_length=1, description="Causal LM: column with the answer (the only tokens with loss)."
    )
    messages_field: str = Field(
        default="messages",
        min_length=1,
        description="Causal LM: column of chat lists [{role, content}], used instead of instruction/output "
        "when present. Loss falls on assistant turns only.",
    )
    validation_split: float = Field(default=0.1, ge=0, lt=1, description="Fraction held out for validation (trainers).")
    max_examples: int | None = Field(default=None, ge=1, description="Use at most this many rows (quick trials).")

    def resolved_format(self) -> str:
        if self.format:
            return self.format
        suffix = Path(self.path).suffix.lower().lstrip(".")
        formats = {
            "csv": "csv",
            "jsonl": "jsonl",
            "json": "jsonl",
            "ndjson": "jsonl",
            "parquet": "parquet",
            "pq": "parquet",
        }
        if suffix not in formats:
            raise ValueError(f"cannot infer the format of {self.path!r}; set data.format to csv, jsonl or parquet")
        return formats[suffix]


class VolumeSpec(Model):
    """The Kubernetes volume that holds a silo's data (exactly one source)."""

    persistent_volume_claim: str | None = Field(
        default=None, description="Name of an existing PVC in the silo's namespace."
    )
    host_path: str | None = Field(default=None, description="Folder on the node.")
    empty_dir: bool = Field(default=False, description="Scratch volume (tests, demos).")
    read_only: bool = Field(default=True, description="Mount read-only.")

    @model_validator(mode="after")
    def _one_source(self) -> VolumeSpec:
        sources = [self.persistent_volume_claim is not None, self.host_path is not None, self.empty_dir]
        if sum(sources) != 1:
            raise ValueError("volume needs exactly one of persistentVolumeClaim, hostPath, emptyDir")
        return self


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Resources(Model):
    """Container resources, Kubernetes style (`nvidia.com/gpu` allowed in limits)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    requests: dict[str, str | int] = Field(default_factory=dict)
    limits: dict[str, str | int] = Field(default_factory=dict)


class SiloSpec(Model):
    """One organisation taking part."""

    name: DnsLabel = Field(description="Unique silo name (DNS label).")
    organisation: str = Field(default="", description="Human-readable owner, e.g. the hospital.")
    role: Literal["trainer", "evaluator"] = Field(
        default="trainer",
        description="trainer: fine-tunes and sends updates. evaluator: holds a held-out test set and only evaluates.",
    )
    data: DataSpec = Field(description="The silo's own examples.")
    rank: int | None = Field(default=None, ge=1, description="Smaller LoRA rank for a weak silo (heterogeneous ranks).")
    external: bool = Field(default=False, description="Runs outside this cluster (silo Helm chart); no pod is created.")
    namespace: DnsLabel | None = Field(default=None, description="Namespace of the silo pod (default: the job's).")
    volume: VolumeSpec | None = Field(default=None, description="Volume mounted at /data holding the silo's files.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the silo pod requires.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the silo pod tolerates.")
    resources: Resources = Field(default_factory=Resources, description="Silo pod resources, GPUs included.")
    codec: CodecSpec | None = Field(
        default=None, description="This silo's update codec (e.g. int8 on a slow link); default aggregation.codec."
    )


class IssuerRef(Model):
    """A cert-manager issuer."""

    name: str = Field(min_length=1, description="Name of the Issuer or ClusterIssuer.")
    kind: Literal["Issuer", "ClusterIssuer"] = Field(
        default="ClusterIssuer",
        description="An Issuer must exist in the job's namespace (and in each in-cluster "
        "silo's namespace with mutual TLS); a ClusterIssuer serves them all.",
    )
    group: str = Field(default="cert-manager.io", description="API group of the issuer.")


class TlsSpec(Model):
    """HTTPS between the aggregator and the silos (the cluster's side; `fedsilo run` always uses mutual TLS)."""

    mode: Literal["operator", "certManager", "insecure"] = Field(
        default="operator",
        description="operator: the operator issues the certificates from its own CA Secret. certManager: "
        "cert-manager Certificates from issuerRef. insecure: plain HTTP inside the cluster (tokens and adapters "
        "in clear).",
    )
    mutual: bool = Field(
        default=False,
        description="Mutual TLS: each silo presents a client certificate naming its job and silo "
        "(fedsilo://<job>/<silo>), checked against the silo of every request.",
    )
    issuer_ref: IssuerRef | None = Field(default=None, description="The cert-manager issuer (mode certManager).")

    @model_validator(mode="after")
    def _issuer_for_cert_manager(self) -> TlsSpec:
        if self.mode == "certManager" and self.issuer_ref is None:
            raise ValueError("tls.issuerRef is required with tls.mode certManager")
        if self.mode == "insecure" and self.mutual:
            raise ValueError("tls.mutual needs TLS: it cannot be combined with tls.mode insecure")
        return self


class AggregatorSpec(Model):
    """Cluster settings of the aggregator pod (ignored by the local runner)."""

    image: str | None = Field(default=None, description="Container image (default: the operator's own).")
    resources: Resources = Field(default_factory=Resources)
    database_secret: str | None = Field(
        default=None, description="Secret with key `url`: PostgreSQL URL. Default SQLite on the checkpoint volume."
    )
    storage_size: str = Field(default="1Gi", description="Checkpoint volume size.")
    external_url: str | None = Field(
        default=None,
        pattern=r"^https://[^/\s]+",
        description="https URL external silos (other clusters) use to reach the aggregator, e.g. behind an "
        "Ingress: their bearer tokens cross organisational networks, never in the clear.",
    )
    tls: TlsSpec = Field(default_factory=TlsSpec, description="HTTPS (and mutual TLS) inside the cluster.")


class TeacherSpec(Model):
    """A frozen teacher for FedKDLoRA: any sequence-classification model folder with its own tokenizer."""

    path: str = Field(
        min_length=1,
        description="Local folder of the teacher (its own architecture and tokenizer, a head for task.labels), "
        "e.g. all-mpnet-base-v2 fine-tuned on public data by `fedsilo teacher`. Every trainer silo needs it.",
    )
    revision: str | None = Field(default=None, description="Hub revision, when `path` is a hub id.")
    max_length: int | None = Field(
        default=None, ge=8, le=32_768, description="Teacher tokens per example (default training.maxLength)."
    )


class DistillationSpec(Model):
    """FedKDLoRA: every trainer silo distils a frozen public-data teacher into the federated LoRA student."""

    teacher: TeacherSpec = Field(description="The teacher model.")
    temperature: float = Field(default=2.0, gt=0, le=100, description="Softmax temperature T of the KD loss.")
    alpha: float = Field(
        default=0.5,
        ge=0,
        le=100,
        description="Weight of the KD term: loss = task loss + alpha * T^2 * KL(teacher || student).",
    )


class FederatedJobSpec(Model):
    """Everything one federated fine-tuning needs."""

    base_model: BaseModelSpec = Field(description="Model every silo starts from.")
    task: TaskSpec = Field(default_factory=TaskSpec)
    peft: PeftSpec = Field(default_factory=PeftSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    aggregator: AggregatorSpec = Field(default_factory=AggregatorSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    distillation: DistillationSpec | None = Field(
        default=None, description="FedKDLoRA: distil a frozen teacher into the student on every trainer silo."
    )
    silos: list[SiloSpec] = Field(min_length=1, description="Participating organisations.")

    @model_validator(mode="after")
    def _silos_consistent(self) -> FederatedJobSpec:
        names = [s.name for s in self.silos]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"silos: duplicate silo names {dupes}")
        trainers = [s for s in self.silos if s.role == "trainer"]
        if not trainers:
            raise ValueError("silos: at least one silo must have role trainer")
        if self.aggregation.min_silos > len(trainers):
            raise ValueError(
                f"aggregation.minSilos={self.aggregation.min_silos} exceeds the {len(trainers)} trainer silos"
            )
        strategy, method = self.aggregation.strategy, self.peft.method
        if self.aggregation.mode == "async" and strategy not in ASYNC_STRATEGIES:
            raise ValueError(
                f"aggregation.mode async needs a weighted-sum strategy ({', '.join(sorted(ASYNC_STRATEGIES))}); "
                f"{strategy} needs every update of a round trained from the same global adapter"
            )
        sums = ", ".join(sorted(SUM_STRATEGIES))
        if self.aggregation.secure:
            if self.aggregation.mode != "sync":
                raise ValueError("aggregation.secure needs mode sync: masks cancel only within one round's cohort")
            if strategy not in SUM_STRATEGIES:
                raise ValueError(
                    f"aggregation.secure needs a strategy that uses only the sum of the updates ({sums}); "
                    f"{strategy} needs each silo's update, which secure aggregation hides"
                )
            if self.aggregation.min_silos < 2:
                raise ValueError(
                    "aggregation.secure needs minSilos >= 2: the sum of one silo's update is that update"
                )
        if self.privacy.dp is not None and strategy not in SUM_STRATEGIES:
            raise ValueError(
                f"privacy.dp needs a strategy that uses only the sum of the updates ({sums}), not {strategy}"
            )
        if self.distillation is not None and self.task.type != "sequence-classification":
            raise ValueError("distillation (a teacher's class predictions) applies to sequence-classification only")
        if self.distillation is not None and strategy == "fedkd":
            raise ValueError("distillation names a public-data teacher; fedkd trains a private one: choose one")
        if (self.training.logit_adjustment or 0) > 0 and self.task.type != "sequence-classification":
            raise ValueError("training.logitAdjustment applies to sequence-classification only")
        if (self.training.logit_adjustment or 0) > 0 and strategy == "fedkd":
            raise ValueError("training.logitAdjustment is not combined with fedkd's distillation loss yet")
        if strategy in ("fedkd", "ffa-lora", "lora-exact") and method not in ("lora", "dora"):
            raise ValueError(f"aggregation.strategy {strategy} needs peft.method lora or dora, not {method}")
        if all(t.rank not in (None, self.peft.r) for t in trainers):
            raise ValueError(
                "silos: at least one trainer must train the global rank peft.r (it sends the first adapter)"
            )
        self._codecs_allowed()
        for silo in self.silos:
            if silo.rank is not None and silo.rank > self.peft.r:
                raise ValueError(f"silos[{silo.name}].rank={silo.rank} exceeds the global peft.r={self.peft.r}")
        return self

    def _codecs_allowed(self) -> None:
        if not self.aggregation.secure:
            return  # DP clips and noises the decoded delta on the aggregator; every strategy sees fp32
        for where, codec in [("aggregation.codec", self.aggregation.codec)] + [
            (f"silos[{s.name}].codec", s.codec) for s in self.silos if s.codec is not None
        ]:
            if not codec.is_plain():
                raise ValueError(
                    f"{where}: aggregation.secure sends masked ring elements, which no codec can shrink; "
                    "use the plain fp32 codec (dtype fp32, no topK, no zstd)"
                )

    def logit_adjustment(self) -> float:
        """training.logitAdjustment in force; unset: 1 for sequence classification, FedKDLoRA included
        (with the adjustment its student ends 0.15 higher at Dirichlet 0.5), except under fedkd; else 0."""
        tau = self.training.logit_adjustment
        if tau is not None:
            return tau
        return 1.0 if self.task.type == "sequence-classification" and self.aggregation.strategy != "fedkd" else 0.0

    def codec_for(self, silo: str) -> CodecSpec:
        """The codec in force for `silo`: its own override, else aggregation.codec."""
        own = next((s.codec for s in self.silos if s.name == silo), None)
        return own or self.aggregation.codec

    def trainers(self) -> list[SiloSpec]:
        return [s for s in self.silos if s.role == "trainer"]

    def silo(self, name: str) -> SiloSpec:
        for s in self.silos:
            if s.name == name:
                return s
        raise KeyError(f"no silo named {name!r} in this job")


class ObjectMeta(Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    name: DnsLabel
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FederatedJob(Model):
    """The whole resource as written in YAML or stored in Kubernetes."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    api_version: Literal["fedsilo.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FederatedJob"]
    metadata: ObjectMeta
    spec: FederatedJobSpec
    status: dict[str, Any] | None = Field(default=None, description="Written by the operator; ignored on input.")


class SpecError(ValueError):
    """A FederatedJob document that does not validate; the message names each bad field."""


def format_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(document)"
        lines.append(f"{where}: {err['msg']}")
    return "\n".join(lines)


def parse_job(document: dict[str, Any]) -> FederatedJob:
    """Validate a FederatedJob document; raise SpecError naming every bad field."""
    if not isinstance(document, dict):
        raise SpecError("a FederatedJob document must be a mapping")
    try:
        return FederatedJob.model_validate(document)
    except ValidationError as exc:
        raise SpecError(format_errors(exc)) from None


def parse_spec(spec: dict[str, Any]) -> FederatedJobSpec:
    """Validate only the `spec:` part (as the operator receives it)."""
    try:
        return FederatedJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError("\n".join("spec." + line for line in format_errors(exc).splitlines())) from None


def load_job(path: Path) -> FederatedJob:
    """Read and validate a FederatedJob YAML file."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_job(document)
    except SpecError as exc:
        raise SpecError(f"{path}:\n{exc}") from None


def document_digest(document: dict[str, Any]) -> str:
    """The SHA-256 of a job document's canonical JSON: equal digests, equal documents."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def dump_job(job: FederatedJob) -> dict[str, Any]:
    """The resource as a camelCase document (round-trips through parse_job)."""
    return job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
