"""FedKD's mutual distillation on a silo: a private teacher adapter and the shared student.

After Wu et al., "Communication-efficient federated learning via knowledge distillation"
(Nature Communications 2022), adapted to PEFT: the silo adds a second LoRA adapter named
"teacher" (rank `teacher_rank`, with its own copy of the classification head) to the same
base model. Every step forwards the batch through both adapters, and each learns its task
loss plus alpha * T^2 * KL(other || self) on temperature-softened predictions, the other's
logits detached. The teacher is created once, kept across rounds and never uploaded; the
student ("default") is the adapter the aggregator averages.

The teacher is the one piece of a silo's training that outlives a round, so a restarted
agent only retrains a round bit-identically if it restores the teacher (weights, AdamW
moments, loss scale) as it was before that round: `Distiller.state_dict()` /
`load_state_dict()` give it as flat tensors for a silo-local safetensors file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig

from fedsilo.silo_agent.model import ModelError
from fedsilo.spec import TrainingSpec

STUDENT = "default"
TEACHER = "teacher"


@dataclass(frozen=True)
class DistillConfig:
    """The silo-side FedKD settings, as sent by the `fedkd` strategy."""

    temperature: float
    alpha: float
    teacher_rank: int

    @classmethod
    def from_client_config(cls, config: Mapping[str, float | bool]) -> DistillConfig:
        """Read `distill_temperature`, `distill_alpha` and `teacher_rank`; bad values raise ValueError."""
        temperature = float(config.get("distill_temperature", 2.0))
        alpha = float(config.get("distill_alpha", 0.5))
        rank = float(config.get("teacher_rank", 16))
        if not temperature > 0:
            raise ValueError(f"client_config.distill_temperature must be > 0, got {temperature}")
        if not alpha >= 0:
            raise ValueError(f"client_config.distill_alpha must be >= 0, got {alpha}")
        if not (rank >= 1 and rank == int(rank)):
            raise ValueError(f"client_config.teacher_rank must be a whole number >= 1, got {rank}")
        return cls(temperature, alpha, int(rank))


def kd_divergence(
    logits: torch.Tensor, target_logits: torch.Tensor, temperature: float, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * KL(softmax(target/T) || softmax(logits/T)), averaged over predictions.

    The target side is detached: gradients reach only `logits`. Classification logits are
    (batch, classes); language-model logits (batch, tokens, vocab) are compared only where
    the model is scored, i.e. position t where labels[t + 1] != -100 (the model shifts by one).
    """
    target = target_logits.detach()
    if logits.dim() == 3:
        if labels is None:
            raise ValueError("token-level distillation needs the batch's labels")
        scored = labels[:, 1:] != -100
        logits, target = logits[:, :-1][scored], target[:, :-1][scored]
    if logits.shape != target.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits.shape)} vs {tuple(target.shape)}")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(target.float() / temperature, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(
    task_loss: torch.Tensor,
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    config: DistillConfig,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """task_loss + alpha * T^2 * KL(target || self): one side of the mutual distillation."""
    if config.alpha == 0:
        return task_loss
    return task_loss + config.alpha * kd_divergence(logits, target_logits, config.temperature, labels)


def teacher_config(student: PeftConfig, rank: int) -> LoraConfig:
    """The teacher's recipe: the student's LoRA recipe at `rank`, with the same alpha/r scale."""
    if not isinstance(student, LoraConfig):
        raise ModelError(f"fedkd needs a LoRA or DoRA adapter (peft.method), not {student.peft_type}")
    config = copy.deepcopy(student)
    config.lora_alpha = student.lora_alpha * rank / student.r  # type: ignore[assignment]  # float is fine
    config.r = rank
    config.inference_mode = False
    return config


class Distiller:
    """Owns the private teacher adapter and its optimizer; `step` is a Trainer step function."""

    def __init__(self, model: Any, config: DistillConfig, training: TrainingSpec) -> None:
        if TEACHER in model.peft_config:
            raise ModelError(f"the model already has an adapter named {TEACHER!r}")
        self.model, self.config = model, config
        # set_adapter() flips requires_grad; remember the student's flags to restore them
        self._student_flags = [(p, p.requires_grad) for n, p in model.named_parameters() if f".{STUDENT}." in n]
        with torch.random.fork_rng():
            torch.manual_seed(training.seed)
            model.add_adapter(TEACHER, teacher_config(model.peft_config[STUDENT], config.teacher_rank))
        self.teacher_params = {n: p for n, p in model.named_parameters() if f".{TEACHER}." in n}
        if not self.teacher_params:
            raise ModelError("the teacher adapter has no parameters")
        self.optimizer = torch.optim.AdamW(
            list(self.teacher_params.values()), lr=training.learning_rate, weight_decay=training.weight_decay
        )
        device = next(model.parameters()).device.type
        self.scaler = torch.amp.GradScaler(device, enabled=training.precision == "fp16")
        self.teacher_loss = float("nan")  # of the latest step
        self._use(STUDENT, teacher_trainable=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's whole training state as flat CPU tensors (never uploaded: silo-local files only)."""
        out = {f"param.{n}": p.detach().to("cpu", copy=True) for n, p in self.teacher_params.items()}
        index = {id(p): i for i, p in enumerate(self.teacher_params.values())}
        for param, moments in self.optimizer.state.items():
            for key, value in moments.items():
                out[f"optim.{index[id(param)]}.{key}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
        if self.scaler.is_enabled():
            scaler = self.scaler.state_dict()
            out["scaler.scale"] = torch.tensor(float(scaler.get("scale", 1.0)))
            out["scaler.growth_tracker"] = torch.tensor(int(scaler.get("_growth_tracker", 0)))
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (a teacher of the same rank on the same model)."""
        params = list(self.teacher_params.items())
        with torch.no_grad():
            for name, param in params:
                param.copy_(state[f"param.{name}"])
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                moments.setdefault(int(i), {})[name] = value
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": moments, "param_groups": groups})
        if self.scaler.is_enabled() and "scaler.scale" in state:
            scaler = self.scaler.state_dict()
            scaler.update(scale=float(state["scaler.scale"]), _growth_tracker=int(state["scaler.growth_tracker"]))
            self.scaler.load_state_dict(scaler)

    def _use(self, adapter: str, teacher_trainable: bool) -> None:
        self.model.set_adapter(adapter)
        for param, flag in self._student_flags:
            param.requires_grad_(flag)
        for param in self.teacher_params.values():
            param.requires_grad_(teacher_trainable)

    def step(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Update the teacher, return the student's loss (the Trainer backpropagates and steps it).

        Leaves the student active and the teacher frozen, so evaluation, the adapter state
        and the Trainer's optimizer only ever see the student.
        """
        labels = batch.get("labels")
        try:
            self._use(TEACHER, teacher_trainable=True)
            teacher = model(**batch)
            self._use(STUDENT, teacher_trainable=True)
            student = model(**batch)
            teacher_loss = kd_loss(teacher.loss, teacher.logits, student.logits, self.config, labels)
            self.scaler.scale(teacher_loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self._use(STUDENT, teacher_trainable=False)
        self.teacher_loss = float(teacher_loss.detach())
        return kd_loss(student.loss, student.logits, teacher.logits, self.config, labels)
