"""The strategy contract: pure functions over adapter tensors.

A round folds each accepted update into an accumulator as it arrives, then `aggregate`
turns the accumulator into the next global adapter. The engine's call sequence is:

    acc = strategy.accumulator(global_state)          # once per round
    strategy.add(acc, delta, weight)                  # per accepted update (delta = local - global)
    result = strategy.aggregate(global_state, acc, server_state)
    # persist result.state (next global), result.server_state, report result.metrics

Most strategies hold one adapter's worth of memory whatever the silo count (`WeightedSum`);
the robust ones (median, trimmed mean) must keep every update (`UpdateList`). Anything a
strategy must remember between rounds (server optimiser moments) is returned as
`server_state` tensors, which the aggregator persists with the job and passes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from fedsilo.adapters import State


class Accumulator(Protocol):
    """What every accumulator offers the engine: fold an update, count what was folded."""

    @property
    def count(self) -> int:
        """Updates folded so far."""

    @property
    def weight(self) -> float:
        """Sum of the folded updates' weights."""

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None: ...


def check_weight(weight: float) -> None:
    """Update weights (example counts) must be positive and finite."""
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"update weight must be positive and finite, got {weight}")


@dataclass
class WeightedSum:
    """Running sum of weight * delta: memory of one adapter whatever the silo count.

    The sum is kept in float64: a float32 delta times an integer weight is exact there, so
    the float32 mean does not depend on the order updates arrived in (a round rebuilt
    after a crash, in another order, yields the same adapter bit for bit, barring a sum
    that lands within 2^-29 of a float32 rounding boundary).
    """

    total: State = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        check_weight(weight)
        for name, tensor in delta.items():
            if name not in self.total:
                self.total[name] = torch.zeros(tensor.shape, dtype=torch.float64)
            # in place, no float64 temporary: the product w * x is exact in float64 (see above),
            # so computing it inside the add rounds exactly as the separate product did
            self.total[name].add_(tensor, alpha=weight)
        self.weight += weight
        self.count += 1

    def mean(self) -> State:
        if self.count == 0:
            raise ValueError("no updates to average")
        return {k: v / self.weight for k, v in self.total.items()}


@dataclass
class Aggregate:
    """Result of one round's aggregation."""

    state: State
    server_state: State = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def apply_mean(global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> State:
    """global + mean delta for every global key, keeping the global dtypes."""
    missing = sorted(set(global_state) - set(mean))
    if missing:
        raise ValueError(f"the accumulated updates lack tensors {missing[:5]}")
    return {k: (v.float() + mean[k].float()).to(v.dtype) for k, v in global_state.items()}


AccT = TypeVar("AccT", bound=Accumulator)
ClientConfig = dict[str, float | bool]


class Strategy(Generic[AccT]):
    """Base of every strategy; `params` come from `spec.aggregation.params`.

    Unknown parameter names are rejected; subclasses validate values in `check`.
    Subclasses implement `accumulator` and `aggregate`, and override `add` only to
    transform an update before folding it (clipping, validation).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, params: Mapping[str, float] | None = None) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = sorted(self.defaults) or "none"
            raise ValueError(
                f"strategy {self.name!r} has no parameter(s) {unknown}; allowed: {allowed}"
            )
        self.params = {**self.defaults, **{k: float(v) for k, v in params.items()}}
        self.check()

    def check(self) -> None:
        """Validate `self.params`; raise ValueError naming the parameter."""

    def require(self, ok: bool, param: str, rule: str) -> None:
        """Raise a ValueError naming `param` when `ok` is false."""
        if not ok:
            value = self.params[param]
            raise ValueError(f"aggregation.params.{param}={value} ({self.name}): {rule}")

    def client_config(self) -> ClientConfig:
        """Settings the aggregator must pass to every silo (e.g. FedProx's proximal_mu)."""
        return {}

    def accumulator(self, global_state: Mapping[str, torch.Tensor]) -> AccT:
        """A fresh, empty accumulator for one round against `global_state`."""
        raise NotImplementedError

    def add(self, acc: AccT, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one silo's delta (local - global), weighted by its example count."""
        acc.add(delta, weight)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        acc: AccT,
        server_state: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        """Turn the round's accumulator into the next global adapter."""
        raise NotImplementedError


AnyStrategy = Strategy[Any]
