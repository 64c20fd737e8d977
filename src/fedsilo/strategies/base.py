"""The strategy contract: pure functions over adapter tensors.

A round folds each accepted update into an accumulator as it arrives (so the aggregator
holds one adapter's worth of memory, not one per silo), then `aggregate` turns the
accumulator into the next global adapter. Anything a strategy must remember between
rounds (server optimiser moments) is returned as `server_state` tensors, which the
aggregator persists with the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedsilo.adapters import State


@dataclass
class WeightedSum:
    """Running sum of weight * delta: memory of one adapter whatever the silo count."""

    total: State = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError("update weight must be positive")
        for name, tensor in delta.items():
            scaled = tensor.float() * weight
            if name in self.total:
                self.total[name].add_(scaled)
            else:
                self.total[name] = scaled.clone()
        self.weight += weight
        self.count += 1

    def mean(self) -> State:
        if self.count == 0:
            raise ValueError("no updates to average")
        return {k: v / self.weight for k, v in self.total.items()}


@dataclass
class Aggregate:
    """Result of one round's aggregation."""

    state: State
    server_state: State = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy:
    """FedAvg: the example-weighted mean of the silo deltas, applied to the global adapter.

    Subclasses override `accumulator`, `add`, or `aggregate`; `params` come from
    `spec.aggregation.params` and unknown names are rejected.
    """

    name: ClassVar[str] = "fedavg"
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, params: Mapping[str, float] | None = None) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = sorted(self.defaults) or "none"
            raise ValueError(f"strategy {self.name!r} has no parameter(s) {unknown}; allowed: {allowed}")
        self.params = {**self.defaults, **params}

    def accumulator(self) -> WeightedSum:
        return WeightedSum()

    def add(self, acc: WeightedSum, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        acc.add(delta, weight)

    def aggregate(self, global_state: Mapping[str, torch.Tensor], acc: WeightedSum, server_state: State) -> Aggregate:
        mean = acc.mean()
        new = {k: (global_state[k].float() + mean[k]).to(global_state[k].dtype) for k in global_state}
        return Aggregate(state=new, server_state=server_state)
