"""FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning").

Every silo keeps A frozen at the global adapter's A (one random initialisation, made by the
aggregator from the job's seed and downloaded by every silo) and trains only B. Then
B_i A = (B + dB_i) A, so the weighted mean of the B deltas is the exact mean of the
products: plain FedAvg is exact.

Convention: silos still send every tensor (the upload schema stays the global one) with
exactly zero deltas for the `lora_A` keys; an update that changes A is refused, because
averaging it would silently be inexact. Silo-side hook: `client_config()` returns
`freeze_lora_a=True`; freeze every parameter whose name `is_lora_a`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsilo.adapters import AdapterError
from fedsilo.strategies.base import ClientConfig, WeightedSum
from fedsilo.strategies.fedavg import FedAvg
from fedsilo.strategies.lora import LORA_A


def is_lora_a(name: str) -> bool:
    """True for a LoRA A factor, in a peft state dict (`.lora_A.weight`) or a live
    model's parameter names (`.lora_A.<adapter>.weight`)."""
    return LORA_A in name or ".lora_A." in name


class FfaLora(FedAvg):
    """FedAvg that requires frozen (zero-delta) LoRA A factors."""

    name = "ffa-lora"

    def client_config(self) -> ClientConfig:
        return {"freeze_lora_a": True}

    def add(self, acc: WeightedSum, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        for key, tensor in delta.items():
            if is_lora_a(key) and torch.count_nonzero(tensor):
                raise AdapterError(
                    "lora_a_not_frozen",
                    f"{key}: ffa-lora keeps lora_A frozen, but this update changes it "
                    f"(max |delta| {float(tensor.abs().max()):.3g})",
                )
        acc.add(delta, weight)
