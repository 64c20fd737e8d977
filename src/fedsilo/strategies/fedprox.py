"""FedProx (Li et al. 2020): FedAvg on the server, a proximal term on each silo.

The silo minimises loss(w) + mu/2 * ||w - w_global||^2 over its trainable adapter
tensors, which keeps heterogeneous silos from drifting far from the global adapter.
Aggregation itself is FedAvg; the strategy only tells silos `proximal_mu`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedsilo.strategies.base import ClientConfig
from fedsilo.strategies.fedavg import FedAvg


def proximal_term(
    params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """mu/2 * sum ||params[k] - global_params[k]||^2 over the keys of `params`.

    `params` are the live trainable tensors (gradients flow through them);
    `global_params` is the round's starting snapshot under the same names (detached).
    Add the result to the training loss.
    """
    if mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {mu}")
    missing = sorted(set(params) - set(global_params))
    if missing:
        raise ValueError(f"proximal term: no global tensor for {missing[:5]}")
    if not params:
        raise ValueError("proximal term: no trainable parameters given")
    total = sum(
        ((p - global_params[k].detach().to(p.device, p.dtype)) ** 2).sum()
        for k, p in params.items()
    )
    return 0.5 * mu * torch.as_tensor(total)


class FedProx(FedAvg):
    """FedAvg plus `proximal_mu` sent to silos."""

    name = "fedprox"
    defaults: ClassVar[dict[str, float]] = {"mu": 0.01}

    def check(self) -> None:
        self.require(self.params["mu"] >= 0, "mu", "must be >= 0")

    def client_config(self) -> ClientConfig:
        return {"proximal_mu": self.params["mu"]}
