"""FedAvg (McMahan et al. 2017): example-weighted mean of the silo deltas."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsilo.strategies.base import Aggregate, Strategy, WeightedSum, apply_mean


class FedAvg(Strategy[WeightedSum]):
    """global + sum_i n_i delta_i / sum_i n_i."""

    name = "fedavg"

    def accumulator(self, global_state: Mapping[str, torch.Tensor]) -> WeightedSum:
        return WeightedSum()

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        acc: WeightedSum,
        server_state: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        return Aggregate(
            state=apply_mean(global_state, acc.mean()), server_state=dict(server_state)
        )
