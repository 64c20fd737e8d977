"""FedAdagrad (Reddi et al. 2021): the second moment sums every squared pseudo-gradient."""

from __future__ import annotations

from typing import ClassVar

import torch

from fedsilo.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """v_t = v_{t-1} + Delta_t^2; no beta2, and no momentum by default (beta1 = 0)."""

    name = "fedadagrad"
    defaults: ClassVar[dict[str, float]] = {"eta": 1e-2, "beta1": 0.0, "tau": 1e-3}

    def second_moment(self, v: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
        return v + grad_sq
