"""Local training and evaluation of the adapter with plain torch.

The model is loaded once per process and the data tokenised once; a round only swaps
adapter tensors in, trains, and takes the delta out.

A round's training is a pure function of (job seed, silo, round, starting adapter): its data
order and dropout come from a seed derived from those alone, and its optimizer is fresh. A
silo agent killed mid-round and restarted therefore uploads the bit-identical update.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsilo.adapters import State, sha256, to_bytes
from fedsilo.silo_agent.data import Encoded, batches
from fedsilo.silo_agent.distill import kd_divergence
from fedsilo.silo_agent.model import adapter_state, load_adapter_state
from fedsilo.silo_agent.objectives import adjusted_cross_entropy, log_prior
from fedsilo.spec import DistillationSpec, TrainingSpec


@dataclass
class TrainResult:
    steps: int
    examples_seen: int
    seconds: float
    loss: float


@dataclass
class EvalResult:
    loss: float
    accuracy: float | None
    n_examples: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    generations: dict[str, str] = field(default_factory=dict)


Batcher = Callable[..., list[dict[str, torch.Tensor]]]
StepFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]


def round_seed(seed: int, silo: str, round_: int | None, adapter_sha256: str, stream: str = "data") -> int:
    """A seed of one round's local training: a stable hash (not Python's salted `hash`).

    `stream` names what draws from it ("data" order, "dropout"), so the two are independent.
    """
    key = f"fedsilo/{stream}/{seed}/{silo}/{'' if round_ is None else round_}/{adapter_sha256}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1  # < 2**63: fits manual_seed


class Trainer:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        training: TrainingSpec,
        train: Encoded,
        evaluation: Encoded,
        *,
        classification: bool = True,
        batcher: Batcher = batches,
        distillation: DistillationSpec | None = None,
    ) -> None:
        self.model, self.tokenizer, self.training = model, tokenizer, training
        self.distillation = distillation  # FedKDLoRA: batches carry the teacher's logits
        self.train_data, self.eval_data = train, evaluation
        self.classification = classification
        self.batcher = batcher  # (data, batch_size, tokenizer, order) -> padded batches
        self.device = next(model.parameters()).device
        self._log_prior: torch.Tensor | None = None  # logit adjustment: made at the first step (needs K)
        self._eval_batches = (
            [self._on_device(b) for b in batcher(evaluation, training.eval_batch_size, tokenizer)]
            if len(evaluation)
            else []
        )

    def state(self) -> State:
        return adapter_state(self.model)

    def load(self, state: State) -> None:
        load_adapter_state(self.model, state)

    def steps_per_round(self, local_steps: int | None = None) -> int:
        per_epoch = math.ceil(len(self.train_data) / self.training.batch_size)
        if local_steps or self.training.local_steps:
            return int(local_steps or self.training.local_steps)  # type: ignore[arg-type]
        return max(1, round(per_epoch * (self.training.local_epochs or 1.0)))

    def _train_batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """An endless stream of shuffled batches, a new permutation per epoch, all drawn from `seed`.

        Each batch is padded as it is drawn: a 25-step round on a 10,000-example silo pads 25
        batches, not the whole epoch's 625 before its first step.
        """
        gen = torch.Generator().manual_seed(seed)
        size = self.training.batch_size
        while True:
            order = torch.randperm(len(self.train_data), generator=gen).tolist()
            for start in range(0, len(order), size):
                (batch,) = self.batcher(self.train_data, size, self.tokenizer, order[start : start + size])
                yield self._on_device(batch)

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch if self.device.type == "cpu" else {k: v.to(self.device) for k, v in batch.items()}

    def train(
        self,
        local_steps: int | None = None,
        extra_loss: Any = None,
        step_fn: StepFn | None = None,
        *,
        round_: int | None = None,
        silo: str = "",
    ) -> TrainResult:
        """Run the round's optimizer steps; `extra_loss(model)` adds e.g. FedProx's proximal term.

        `step_fn(model, batch)` replaces the default `model(**batch).loss` (e.g. FedKD's distillation).
        Data order and dropout are seeded from (training.seed, `silo`, `round_`, the adapter as
        loaded now), the optimizer starts fresh, and the process's global RNG is left as it was:
        the same inputs give the bit-identical adapter in any process.
        """
        if not len(self.train_data):
            raise ValueError("this silo has no training examples")
        start = sha256(to_bytes(self.state()))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # dropout, and anything else that draws from the global RNG
            torch.manual_seed(round_seed(self.training.seed, silo, round_, start, "dropout"))
            data_seed = round_seed(self.training.seed, silo, round_, start, "data")
            return self._train(self.steps_per_round(local_steps), data_seed, extra_loss, step_fn)

    def _train(self, steps: int, data_seed: int, extra_loss: Any, step_fn: StepFn | None) -> TrainResult:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fresh every round: moments carried over from an earlier round would differ after a restart
        optimizer = torch.optim.AdamW(params, lr=self.training.learning_rate, weight_decay=self.training.weight_decay)
        self.model.train()
        # the loss is summed on the device: reading it every step would make a GPU wait for each step
        started, seen = time.perf_counter(), 0
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        stream = self._train_batches(data_seed)
        # fp16 gradients underflow without loss scaling; for fp32/bf16 the scaler is a no-op
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.training.precision == "fp16")
        for _ in range(steps):
            batch = next(stream)
            loss = step_fn(self.model, batch) if step_fn is not None else self._task_loss(batch)
            if extra_loss is not None:
                loss = loss + extra_loss(self.model)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            total_loss += loss.detach().double()
            seen += int(batch["labels"].shape[0])
        mean_loss = float(total_loss) / steps  # waits for the device's last step: before the clock is read
        return TrainResult(steps, seen, time.perf_counter() - started, mean_loss)

    def _task_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own loss, logit-adjusted (`training.logitAdjustment`), plus the teacher's
        KD term when the batch carries its logits (`distillation`)."""
        batch = dict(batch)
        teacher = batch.pop("teacher_logits", None)
        tau = self.training.logit_adjustment or 0.0  # unset outside a job document: plain cross-entropy
        if not (self.classification and (tau > 0 or teacher is not None)):
            return self.model(**batch).loss
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if tau > 0:
            if self._log_prior is None:
                self._log_prior = log_prior(self.train_data.labels, logits.shape[-1])
            loss = adjusted_cross_entropy(logits, batch["labels"], self._log_prior, tau)
        else:
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        if teacher is None or self.distillation is None:
            return loss
        kd = kd_divergence(logits, teacher.to(logits.device), self.distillation.temperature)
        return loss + self.distillation.alpha * kd

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Mean loss (and accuracy for classification) over the evaluation split.

        Language modelling averages over answer tokens and adds extra["perplexity"].
        """
        self.model.eval()
        started = time.perf_counter()
        loss_sum, correct, count, tokens = 0.0, 0, 0, 0
        for batch in self._eval_batches:
            out = self.model(**batch)
            n = int(batch["labels"].shape[0])
            if self.classification:
                loss_sum += float(torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="sum"))
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            else:
                scored = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
                loss_sum += float(out.loss) * scored
                tokens += scored
            count += n
        if count == 0:
            raise ValueError("this silo has no evaluation examples")
        if self.classification:
            return EvalResult(loss_sum / count, correct / count, count, time.perf_counter() - started)
        loss = loss_sum / max(tokens, 1)
        return EvalResult(
            loss, None, count, time.perf_counter() - started, extra={"perplexity": math.exp(min(loss, 50.0))}
        )
