"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning").

Per coordinate, drop the k = floor(trim_ratio * n) largest and k smallest silo values and
average the rest. Deliberately unweighted, as in the paper and in Flower's FedTrimmedAvg:
example counts are self-reported, and a weighted robust statistic would let one silo that
claims many examples dominate. Keeps every update: O(silos) memory (see `UpdateList`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch

from fedsilo.adapters import State
from fedsilo.strategies.base import Aggregate, Strategy
from fedsilo.strategies.updates import UpdateList


class TrimmedMean(Strategy[UpdateList]):
    """Unweighted coordinate-wise trimmed mean of the deltas."""

    name = "trimmed-mean"
    defaults: ClassVar[dict[str, float]] = {"trim_ratio": 0.1}
    spill_dir: Path | None = None  # set to keep updates on disk instead of in memory

    def check(self) -> None:
        self.require(0 <= self.params["trim_ratio"] < 0.5, "trim_ratio", "must be in [0, 0.5)")

    def trim_count(self, n: int) -> int:
        """Values dropped at each end of n sorted values."""
        return math.floor(self.params["trim_ratio"] * n)

    def accumulator(self, global_state: Mapping[str, torch.Tensor]) -> UpdateList:
        return UpdateList(self.spill_dir)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        acc: UpdateList,
        server_state: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        n = acc.count
        k = self.trim_count(n)
        new: State = {}
        try:
            for key, x in global_state.items():
                values = acc.stacked(key).sort(dim=0).values
                new[key] = (x.float() + values[k : n - k].mean(dim=0)).to(x.dtype)
        finally:
            acc.close()
        return Aggregate(
            state=new, server_state=dict(server_state), metrics={"trimmed_per_side": float(k)}
        )
