"""Synthetic adapter states in PEFT's layout, shared by the strategy tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedsilo.adapters import State
from fedsilo.strategies import Aggregate, Strategy
from fedsilo.strategies.lora import dense_products, lora_pairs

PREFIX = "base_model.model.bert.encoder.layer.{i}.attention.self.{m}"


def lora_state(
    out_features: int = 10,
    in_features: int = 12,
    rank: int = 4,
    layers: int = 1,
    seed: int = 0,
    b_zero: bool = False,
) -> State:
    """A global adapter: query/value LoRA pairs per layer plus a classifier head."""
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for i in range(layers):
        for m in ("query", "value"):
            prefix = PREFIX.format(i=i, m=m)
            bound = in_features**-0.5  # PEFT's Kaiming-uniform(a=sqrt(5)) bound
            a = (torch.rand(rank, in_features, generator=g) * 2 - 1) * bound
            b = (
                torch.zeros(out_features, rank)
                if b_zero
                else torch.randn(out_features, rank, generator=g) * 0.05
            )
            state[f"{prefix}.lora_A.weight"] = a
            state[f"{prefix}.lora_B.weight"] = b
    state["base_model.model.classifier.weight"] = torch.randn(2, out_features, generator=g) * 0.1
    state["base_model.model.classifier.bias"] = torch.zeros(2, dtype=torch.float16)
    return state


def random_delta(
    global_state: Mapping[str, torch.Tensor], seed: int, scale: float = 0.02, frozen_a: bool = False
) -> State:
    """A silo update (local - global): small random changes of every tensor."""
    g = torch.Generator().manual_seed(1000 + seed)
    delta = {}
    for k, v in global_state.items():
        d = torch.randn(v.shape, generator=g) * scale
        if frozen_a and k.endswith(".lora_A.weight"):
            d = torch.zeros_like(d)
        delta[k] = d
    return delta


def run_round(
    strategy: Strategy,
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    server_state: Mapping[str, torch.Tensor] | None = None,
) -> Aggregate:
    """The engine's call sequence for one round."""
    acc = strategy.accumulator(global_state)
    for delta, weight in updates:
        strategy.add(acc, delta, weight)
    return strategy.aggregate(global_state, acc, dict(server_state or {}))


def effective(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the adapter does: B @ A per LoRA module, the other tensors as they are."""
    factors = {k for pair in lora_pairs(state).values() for k in pair}
    out = {k: v.double() for k, v in state.items() if k not in factors}
    out.update(dense_products(state))
    return out


def assert_states_close(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], atol: float = 1e-5
) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        tol = 2e-3 if got[k].dtype == torch.float16 else atol
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=tol, rtol=1e-4, msg=k)
