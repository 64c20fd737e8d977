"""FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution"): server momentum.

The round's example-weighted mean delta Delta_t is a pseudo-gradient; the server keeps a
velocity and steps along it:

    v_t = momentum * v_{t-1} + Delta_t
    x_{t+1} = x_t + eta * v_t

Under label skew the direction each round's silo mix pulls in changes from round to round;
the velocity averages those pulls over rounds. With momentum 0 and eta 1 it is FedAvg. The
velocity travels as `server_state` tensors named `velocity/<key>` (float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedsilo.adapters import State, l2_norm
from fedsilo.strategies.base import Aggregate, WeightedSum
from fedsilo.strategies.fedavg import FedAvg


class FedAvgM(FedAvg):
    """FedAvg with server momentum on the mean delta."""

    name = "fedavgm"
    defaults: ClassVar[dict[str, float]] = {"eta": 1.0, "momentum": 0.9}

    def check(self) -> None:
        self.require(self.params["eta"] > 0, "eta", "server learning rate must be > 0")
        self.require(0 <= self.params["momentum"] < 1, "momentum", "must be in [0, 1)")

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        acc: WeightedSum,
        server_state: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        eta, momentum = self.params["eta"], self.params["momentum"]
        mean = acc.mean()
        new: State = {}
        velocity: State = {}
        for key, x in global_state.items():
            step = mean[key].float()
            previous = server_state.get(f"velocity/{key}")
            if previous is not None and tuple(previous.shape) != tuple(step.shape):
                raise ValueError(f"server state velocity/{key}: shape {tuple(previous.shape)}, expected {step.shape}")
            v = step if previous is None else momentum * previous.float() + step
            new[key] = (x.float() + eta * v).to(x.dtype)
            velocity[f"velocity/{key}"] = v
        return Aggregate(state=new, server_state=velocity, metrics={"pseudo_gradient_norm": l2_norm(mean)})
