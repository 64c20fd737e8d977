"""FedAdam (Reddi et al. 2021): Adam's second moment on the server."""

from __future__ import annotations

import torch

from fedsilo.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    """v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
        beta2 = self.params["beta2"]
        return beta2 * v + (1 - beta2) * grad_sq
