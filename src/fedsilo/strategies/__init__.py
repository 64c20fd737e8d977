"""Aggregation strategies, found by name through one explicit registry."""

from collections.abc import Mapping

from fedsilo.strategies.base import Aggregate, Strategy, WeightedSum
from fedsilo.strategies.fedavg import FedAvg

REGISTRY: dict[str, type[Strategy]] = {
    FedAvg.name: FedAvg,
}


def create(name: str, params: Mapping[str, float] | None = None) -> Strategy:
    """Instantiate a registered strategy; unknown names and parameters raise ValueError."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {sorted(REGISTRY)}") from None
    return cls(params)


__all__ = ["REGISTRY", "Aggregate", "Strategy", "WeightedSum", "create"]
