"""Server optimisers on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

The pseudo-gradient of a round is the example-weighted mean delta Delta_t. With moments
m (first) and v (second), per tensor and element-wise:

    m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
    v_t = second_moment(v_{t-1}, Delta_t^2)          # Adam / Yogi / Adagrad differ only here
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

As in the paper's Algorithm 2 (and unlike Flower, which starts v at 0) the moments start at
m_{-1} = 0 and v_{-1} = tau^2, and there is no bias correction. The moments travel as
`server_state` tensors named `m/<key>` and `v/<key>` (float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedsilo.adapters import State, l2_norm
from fedsilo.strategies.base import Aggregate, WeightedSum
from fedsilo.strategies.fedavg import FedAvg


def _moment(
    server_state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor, fill: float
) -> torch.Tensor:
    """The stored moment `key`, or a fresh one filled with `fill` in the first round."""
    if key not in server_state:
        return torch.full_like(like, fill, dtype=torch.float32)
    stored = server_state[key]
    if tuple(stored.shape) != tuple(like.shape):
        raise ValueError(
            f"server state {key}: shape {tuple(stored.shape)}, expected {tuple(like.shape)}"
        )
    return stored.float()


class FedOpt(FedAvg):
    """Adaptive server optimiser; subclasses define `second_moment`."""

    defaults: ClassVar[dict[str, float]] = {"eta": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}

    def check(self) -> None:
        self.require(self.params["eta"] > 0, "eta", "server learning rate must be > 0")
        self.require(0 <= self.params["beta1"] < 1, "beta1", "must be in [0, 1)")
        if "beta2" in self.params:
            self.require(0 <= self.params["beta2"] < 1, "beta2", "must be in [0, 1)")
        self.require(self.params["tau"] > 0, "tau", "adaptivity constant must be > 0")

    def second_moment(self, v: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and Delta_t^2."""
        raise NotImplementedError

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        acc: WeightedSum,
        server_state: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        eta, beta1, tau = self.params["eta"], self.params["beta1"], self.params["tau"]
        mean = acc.mean()
        new: State = {}
        moments: State = {}
        for key, x in global_state.items():
            grad = mean[key].float()
            m = beta1 * _moment(server_state, f"m/{key}", grad, 0.0) + (1 - beta1) * grad
            v = self.second_moment(_moment(server_state, f"v/{key}", grad, tau**2), grad * grad)
            new[key] = (x.float() + eta * m / (v.sqrt() + tau)).to(x.dtype)
            moments[f"m/{key}"], moments[f"v/{key}"] = m, v
        norm = l2_norm(mean)
        return Aggregate(state=new, server_state=moments, metrics={"pseudo_gradient_norm": norm})
