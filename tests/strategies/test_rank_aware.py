"""Heterogeneous ranks under weighted sums: component j is averaged over the silos that trained it."""

from __future__ import annotations

import pytest
import torch

from fedsilo.strategies import create, pad_rank, rescale_components, truncate_rank
from fedsilo.strategies.lora import LORA_A, LORA_B

from .factories import lora_state, random_delta

R = 8
SILOS = [(8, 30.0), (4, 50.0), (2, 20.0)]  # (rank, weight)


def padded_updates(g: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Each silo trains its top-r_i components; the rest of its padded delta is zero."""
    return [(pad_rank(truncate_rank(random_delta(g, seed=i), rank), R), w) for i, (rank, w) in enumerate(SILOS)]


Updates = list[tuple[dict[str, torch.Tensor], float]]


def reference(g: dict[str, torch.Tensor], updates: Updates) -> dict[str, torch.Tensor]:
    """Per component j, the weighted mean over the silos of rank > j (what HetLoRA-style averaging means)."""
    out = {}
    for name, tensor in g.items():
        mean = torch.zeros_like(tensor, dtype=torch.float64)
        for j in range(R) if name.endswith((LORA_A, LORA_B)) else [None]:
            idx: tuple[slice, ...] = (slice(None),) * tensor.dim()
            if j is not None:
                idx = (slice(j, j + 1), slice(None)) if name.endswith(LORA_A) else (slice(None), slice(j, j + 1))
            trained = [(d, w) for (d, w), (rank, _) in zip(updates, SILOS, strict=True) if j is None or rank > j]
            total = sum(w for _, w in trained)
            mean[idx] = sum(d[name].double()[idx] * w for d, w in trained) / total
        out[name] = tensor.double() + mean
    return out


def test_fedavg_averages_each_component_over_its_trainers() -> None:
    g = lora_state(10, 12, rank=R)
    updates = padded_updates(g)
    strategy = create("fedavg")
    acc = strategy.accumulator(g)
    for d, w in updates:
        strategy.add(acc, d, w)
    plain = strategy.aggregate(g, acc, {}).state  # what fedavg did before: shrunk components 2..7

    acc = strategy.accumulator(g)
    for d, w in updates:
        strategy.add(acc, d, w)
    assert rescale_components(acc.total, SILOS, R)
    fixed = strategy.aggregate(g, acc, {}).state
    want = reference(g, updates)
    a_key = next(k for k in g if k.endswith(LORA_A))
    for name in g:
        torch.testing.assert_close(fixed[name].double(), want[name], atol=1e-5, rtol=1e-5, msg=name)
    # the plain average moves component 5 (trained by the rank-8 silo only) by 30 % of its update
    moved_plain = float((plain[a_key][5] - g[a_key][5]).norm())
    moved_fixed = float((fixed[a_key][5] - g[a_key][5]).norm())
    assert moved_plain == pytest.approx(0.3 * moved_fixed, rel=1e-4)


def test_nothing_changes_at_one_rank_and_untrained_components_stay_zero() -> None:
    g = lora_state(10, 12, rank=R)
    total = {k: v.double().clone() for k, v in random_delta(g, seed=3).items()}
    before = {k: v.clone() for k, v in total.items()}
    assert not rescale_components(total, [(R, 1.0), (R, 2.0)], R)
    assert all(torch.equal(total[k], before[k]) for k in total)
    only_low = {k: v.double() for k, v in pad_rank(truncate_rank(random_delta(g, seed=4), 3), R).items()}
    rescale_components(only_low, [(3, 5.0), (2, 1.0)], R)
    a_key = next(k for k in g if k.endswith(LORA_A))
    assert only_low[a_key][3:].abs().sum() == 0  # nobody trained components 3..7


def test_a_sum_without_a_factors_and_a_wrong_rank() -> None:
    g = lora_state(10, 12, rank=R)
    b_only = {k: v.double() for k, v in random_delta(g, seed=5).items() if not k.endswith(LORA_A)}
    b_key = next(k for k in b_only if k.endswith(LORA_B))
    column7 = b_only[b_key][:, 7].clone()
    rescale_components(b_only, SILOS, R)  # a secure ffa-lora sum carries B only
    torch.testing.assert_close(b_only[b_key][:, 7], column7 * (100.0 / 30.0))
    with pytest.raises(ValueError, match="global rank 16"):
        rescale_components({k: v.double() for k, v in g.items()}, [(16, 1.0), (4, 1.0)], 16)
