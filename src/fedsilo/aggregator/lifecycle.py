"""The job and round state machine: states, the pure decisions between them, and `Live`.

Job phases: Pending -> Running -> Succeeded | Failed (and Failed -> Running on resume).
Round states: open -> aggregating -> closed. Round r trains from global version r-1 and
produces version r; version 0 is the initial adapter. A round becomes `aggregating` in
the transaction that accepts its last needed update (or at its deadline) and `closed` in
the transaction that stores the next global adapter, so a crash in between resumes with
the same updates and produces the same adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from fedsilo import strategies
from fedsilo.adapters import Schema, State
from fedsilo.privacy.dp import clip
from fedsilo.spec import AggregationSpec, FederatedJob, FederatedJobSpec


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class RoundState(StrEnum):
    OPEN = "open"
    AGGREGATING = "aggregating"
    CLOSED = "closed"


def buffer_size(aggregation: AggregationSpec) -> int:
    """Async mode: updates that trigger an aggregation."""
    return aggregation.buffer_size or aggregation.min_silos


def update_weight(n_examples: int, staleness: int, aggregation: AggregationSpec) -> float:
    """An update's weight: its example count, discounted by staleness in async mode (FedBuff)."""
    if staleness <= 0:
        return float(n_examples)
    return float(n_examples) / float(1 + staleness) ** aggregation.staleness_exponent


def secure_weight(n_examples: int, job: FederatedJob) -> float:
    """The weight a silo multiplies its secure update by: its examples, or 1 under DP (sensitivity C)."""
    return 1.0 if job.spec.privacy.dp is not None else float(n_examples)


def fold(live: Live, acc: Any, delta: State, n_examples: int, staleness: int) -> None:
    """Fold one plain update; under central DP it is clipped to C and weighted 1 (the sum's sensitivity is C)."""
    dp = live.job.spec.privacy.dp
    if dp is not None:
        live.strategy.add(acc, clip(delta, dp.clip_norm), 1.0)
    else:
        live.strategy.add(acc, delta, update_weight(n_examples, staleness, live.job.spec.aggregation))


@dataclass
class MaskedSum:
    """A secure round's accumulator: the ring sum (mod 2^64) of the masked updates so far."""

    ring: np.ndarray | None = None
    weight: float = 0.0
    count: int = 0

    def add(self, masked: np.ndarray, weight: float) -> None:
        self.ring = masked.copy() if self.ring is None else self.ring + masked
        self.weight += weight
        self.count += 1


def round_complete(aggregation: AggregationSpec, participants: list[str], received: list[str]) -> bool:
    """Sync: every sampled silo sent its update. Async: the buffer is full."""
    if aggregation.mode == "async":
        return len(received) >= buffer_size(aggregation)
    return set(participants) <= set(received)


def immutable_changes(old: FederatedJobSpec, new: FederatedJobSpec) -> list[str]:
    """Fields a running job cannot change: running silos loaded them at start.

    Mutable: training.rounds, the whole aggregation section (secure included) (from the next round), the
    aggregator's cluster settings, and the silo list (added silos are admitted, removed
    ones revoked); a silo's pod settings are the operator's business, not the engine's.
    """
    fixed = ("base_model", "task", "peft", "privacy")  # privacy: a budget is accounted under one mechanism
    problems = [f"spec.{name}" for name in fixed if getattr(old, name) != getattr(new, name)]
    if old.training.model_copy(update={"rounds": 0}) != new.training.model_copy(update={"rounds": 0}):
        problems.append("spec.training (only rounds may change)")
    before = {s.name: s for s in old.silos}
    for silo in new.silos:
        was = before.get(silo.name)
        if was is not None and (was.role, was.rank) != (silo.role, silo.rank):
            problems.append(f"spec.silos[{silo.name}].role/rank")
    return problems


def with_aggregation(job: FederatedJob, in_force: FederatedJobSpec) -> FederatedJob:
    """`job` with the aggregation section and the silos' codecs of `in_force` (the ones in force
    until the next round: this round's tasks named them, and its stored updates are decoded with them)."""
    codecs = {s.name: s.codec for s in in_force.silos}
    silos = [s.model_copy(update={"codec": codecs[s.name]}) if s.name in codecs else s for s in job.spec.silos]
    spec = job.spec.model_copy(update={"aggregation": in_force.aggregation, "silos": silos})
    return job.model_copy(update={"spec": spec})


@dataclass
class Live:
    """A job's in-memory state, derived only from committed rows and dropped on any doubt.

    `revision` is the digest of the job document it was built from; `version` the global version
    `global_state` holds; `acc` folds exactly the committed updates of round `acc_round`.
    """

    revision: str
    job: FederatedJob
    strategy: strategies.Strategy[Any]
    version: int = -1
    global_state: State | None = None
    schema: Schema | None = None
    acc: Any = None
    acc_round: int = 0


@dataclass
class Tx:
    """One write transaction: the session, its time, and what to do once it has committed."""

    s: Session
    now: datetime
    after: list[Callable[[], None]] = field(default_factory=list)
    dirty: bool = False  # in-memory state was changed before commit: drop it on rollback

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.after.append(fn)
