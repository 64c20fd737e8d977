"""FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning").

Every silo keeps A frozen at the global adapter's A (one random initialisation, made by the
aggregator from the job's seed and downloaded by every silo) and trains only B. Then
B_i A = (B + dB_i) A, so the weighted mean of the B deltas is the exact mean of the
products: plain FedAvg is exact.

Convention: the `lora_A` deltas are zero by contract, so they never travel (`zero_by_contract`
names them for plain, coded and masked uploads alike); the aggregator's decoder fills them
in as zeros, and an update that changes A is still refused here, because averaging it would
silently be inexact. Silo-side hook: `client_config()` returns `freeze_lora_a=True`;
freeze every parameter whose name `is_lora_a`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from fedsilo.adapters import AdapterError
from fedsilo.strategies.base import ClientConfig, WeightedSum
from fedsilo.strategies.fedavg import FedAvg
from fedsilo.strategies.lora import LORA_A


def is_lora_a(name: str) -> bool:
    """True for a LoRA A factor, in a peft state dict (`.lora_A.weight`) or a live
    model's parameter names (`.lora_A.<adapter>.weight`)."""
    return LORA_A in name or ".lora_A." in name


def zero_by_contract(config: ClientConfig) -> Callable[[str], bool] | None:
    """The tensors a strategy's silos leave at zero (ffa-lora: the frozen A factors), or None.

    The one predicate for "which tensors travel": uploads, masked vectors and decoders use it.
    """
    return is_lora_a if config.get("freeze_lora_a") else None


def omitted_names(names: Iterable[str], config: ClientConfig) -> frozenset[str]:
    """The names among `names` that no upload carries under `config` (zero by contract)."""
    zero = zero_by_contract(config)
    return frozenset(n for n in names if zero is not None and zero(n))


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
