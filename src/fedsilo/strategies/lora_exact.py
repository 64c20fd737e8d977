"""Exact LoRA aggregation: average the products B_i A_i, not the factors.

Averaging A and B separately gives mean(B) mean(A), which is not mean(B A): the cross
terms between silos are wrong. Here each silo's full factors are rebuilt from its delta
(B_i = B_global + dB_i, A_i = A_global + dA_i), the accumulator folds
M = sum_i p_i B_i A_i exactly per LoRA module, and `aggregate` re-factorises M to the
global rank r by truncated SVD (the best rank-r approximation). The relative truncation
error ||M - B A||_F / ||M||_F over all modules is reported as `lora_truncation_error`
(and the worst module as `lora_truncation_error_max`).

Scale: every silo uses the global scale alpha / r (see `ranks.silo_alpha`), so the new
factors keep the global scale and scale * B A = scale * M exactly up to the truncation.
Non-LoRA tensors (classifier head, modules_to_save, biases) are averaged as in FedAvg.
Memory: per LoRA module the exact sum's factors re-compressed to their joint rank, never more
than about twice the dense out x in matrix (see `LowRankSum`): bounded whatever the number of
silos, and one rank's worth of factors when silos share directions (a frozen A).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedsilo.adapters import State
from fedsilo.strategies.base import Aggregate, Strategy, WeightedSum, apply_mean, check_weight
from fedsilo.strategies.lora import (
    PEFT_INIT_A_ROW_NORM,
    LowRankSum,
    check_pair,
    lora_pairs,
    refactor,
)


class LoraSum:
    """Per LoRA module the exact sum of w_i B_i A_i; a weighted sum for the other tensors."""

    def __init__(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self.global_state = global_state
        self.pairs = lora_pairs(global_state)
        self.products: dict[str, LowRankSum] = {}
        for prefix, (a_key, b_key) in self.pairs.items():
            a, b = global_state[a_key], global_state[b_key]
            check_pair(a_key, a, b_key, b)
            self.products[prefix] = LowRankSum(b.shape[0], a.shape[1])
        self.factor_keys = {k for pair in self.pairs.values() for k in pair}
        self.others = WeightedSum()

    @property
    def count(self) -> int:
        return self.others.count

    @property
    def weight(self) -> float:
        return self.others.weight

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        check_weight(weight)
        missing = sorted(self.factor_keys - set(delta))
        if missing:
            raise ValueError(f"update lacks LoRA factors {missing[:5]}")
        for prefix, (a_key, b_key) in self.pairs.items():
            a = self.global_state[a_key].double() + delta[a_key].double()
            b = self.global_state[b_key].double() + delta[b_key].double()
            self.products[prefix].add(b, a, weight)
        self.others.add({k: v for k, v in delta.items() if k not in self.factor_keys}, weight)


class LoraExact(Strategy[LoraSum]):
    """Exact product averaging with SVD re-factorisation to the global rank."""

    name = "lora-exact"
    defaults: ClassVar[dict[str, float]] = {"min_a_row_norm": PEFT_INIT_A_ROW_NORM}

    def check(self) -> None:
        self.require(self.params["min_a_row_norm"] >= 0, "min_a_row_norm", "must be >= 0")

    def accumulator(self, global_state: Mapping[str, torch.Tensor]) -> LoraSum:
        return LoraSum(global_state)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        acc: LoraSum,
        server_state: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        if acc.count == 0:
            raise ValueError("no updates to average")
        others = {k: v for k, v in global_state.items() if k not in acc.factor_keys}
        new: State = apply_mean(others, acc.others.mean())
        tail_sq = total_sq = worst = 0.0
        for prefix, (a_key, b_key) in acc.pairs.items():
            u, s, vh = acc.products[prefix].svd()
            rank = global_state[a_key].shape[0]
            fac = refactor(u, s / acc.weight, vh, rank, self.params["min_a_row_norm"])
            new[a_key] = fac.a.to(global_state[a_key].dtype)
            new[b_key] = fac.b.to(global_state[b_key].dtype)
            tail_sq, total_sq = tail_sq + fac.tail_sq, total_sq + fac.total_sq
            worst = max(worst, fac.relative_error)
        overall = (tail_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
        metrics = {"lora_truncation_error": overall, "lora_truncation_error_max": worst}
        return Aggregate(
            state={k: new[k] for k in global_state},
            server_state=dict(server_state),
            metrics=metrics,
        )
