"""Norm-bounded FedAvg (Sun et al. 2019, "Can you really backdoor federated learning?").

Each silo delta is scaled down to at most `clip_norm` (L2 over all its tensors) before the
weighted mean, which bounds how far any one silo can move the global adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedsilo.adapters import l2_norm
from fedsilo.strategies.base import Aggregate, ClientConfig, WeightedSum
from fedsilo.strategies.fedavg import FedAvg


@dataclass
class ClippedSum(WeightedSum):
    """A weighted sum that also counts how many updates were clipped."""

    clipped: int = 0


def clip(
    delta: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], bool]:
    """Scale `delta` to L2 norm at most `clip_norm`; returns (delta, whether it was scaled)."""
    norm = l2_norm(delta)
    if norm <= clip_norm:
        return dict(delta), False
    factor = clip_norm / norm
    return {k: v.float() * factor for k, v in delta.items()}, True


class ClippedFedAvg(FedAvg):
    """FedAvg of deltas each clipped to `clip_norm`."""

    name = "clipped-fedavg"
    defaults: ClassVar[dict[str, float]] = {"clip_norm": 1.0}

    def check(self) -> None:
        self.require(self.params["clip_norm"] > 0, "clip_norm", "must be > 0")

    def client_config(self) -> ClientConfig:
        # under secure aggregation the aggregator never sees one delta: the silo clips its own
        return {"clip_norm": self.params["clip_norm"]}

    def accumulator(self, global_state: Mapping[str, torch.Tensor]) -> ClippedSum:
        return ClippedSum()

    def add(self, acc: WeightedSum, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        clipped, was_clipped = clip(delta, self.params["clip_norm"])
        acc.add(clipped, weight)
        if was_clipped and isinstance(acc, ClippedSum):
            acc.clipped += 1

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        acc: WeightedSum,
        server_state: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        result = super().aggregate(global_state, acc, server_state)
        if isinstance(acc, ClippedSum):
            result.metrics["clipped_fraction"] = acc.clipped / acc.count
        return result
