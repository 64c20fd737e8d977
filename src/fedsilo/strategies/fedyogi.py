"""FedYogi (Reddi et al. 2021): Yogi's additive, sign-controlled second moment."""

from __future__ import annotations

import torch

from fedsilo.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    """v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.params["beta2"]) * grad_sq * torch.sign(v - grad_sq)
