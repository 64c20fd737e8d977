"""Aggregation strategies, found by name through one explicit registry.

A new strategy is one file `strategies/<name>.py` with one small class, one line in
REGISTRY below, and one row in `tests/strategies/test_contract.py`.
"""

from collections.abc import Mapping
from typing import Any

from fedsilo.strategies.base import Accumulator, Aggregate, ClientConfig, Strategy, WeightedSum
from fedsilo.strategies.clipped_fedavg import ClippedFedAvg
from fedsilo.strategies.fedadagrad import FedAdagrad
from fedsilo.strategies.fedadam import FedAdam
from fedsilo.strategies.fedavg import FedAvg
from fedsilo.strategies.fedavgm import FedAvgM
from fedsilo.strategies.fedkd import FedKD
from fedsilo.strategies.fedprox import FedProx, proximal_term
from fedsilo.strategies.fedyogi import FedYogi
from fedsilo.strategies.ffa_lora import FfaLora, is_lora_a
from fedsilo.strategies.lora_exact import LoraExact
from fedsilo.strategies.median import Median
from fedsilo.strategies.participation import sample_silos
from fedsilo.strategies.ranks import pad_rank, rescale_components, silo_alpha, truncate_rank
from fedsilo.strategies.trimmed_mean import TrimmedMean
from fedsilo.strategies.workload import assign_steps, normalise_steps

REGISTRY: dict[str, type[Strategy[Any]]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedProx,
        FedKD,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FfaLora,
        LoraExact,
        ClippedFedAvg,
        Median,
        TrimmedMean,
    )
}


def create(name: str, params: Mapping[str, float] | None = None) -> Strategy[Any]:
    """Instantiate a registered strategy; unknown names and parameters raise ValueError."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation strategy {name!r}; choose one of {sorted(REGISTRY)}"
        ) from None
    return cls(params)


__all__ = [
    "REGISTRY",
    "Accumulator",
    "Aggregate",
    "ClientConfig",
    "Strategy",
    "WeightedSum",
    "assign_steps",
    "create",
    "is_lora_a",
    "normalise_steps",
    "pad_rank",
    "proximal_term",
    "rescale_components",
    "sample_silos",
    "silo_alpha",
    "truncate_rank",
]
