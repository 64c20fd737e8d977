"""Clipped FedAvg, coordinate-wise median and trimmed mean on hand-checkable numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsilo.strategies import create
from fedsilo.strategies.median import Median

from .factories import run_round

G = {"w": torch.zeros(3)}


def ups(*rows: list[float], weights: list[float] | None = None):
    weights = weights or [1.0] * len(rows)
    return [({"w": torch.tensor(r)}, w) for r, w in zip(rows, weights, strict=True)]


def test_clipped_fedavg_by_hand() -> None:
    # [3, 4, 0] has norm 5 -> scaled to norm 1: [0.6, 0.8, 0]; [0.1, 0, 0] stays
    result = run_round(
        create("clipped-fedavg", {"clip_norm": 1.0}), G, ups([3, 4, 0], [0.1, 0, 0], weights=[1, 3])
    )
    torch.testing.assert_close(result.state["w"], torch.tensor([(0.6 + 0.3) / 4, 0.8 / 4, 0.0]))
    assert result.metrics["clipped_fraction"] == 0.5
    with pytest.raises(ValueError, match=r"params\.clip_norm"):
        create("clipped-fedavg", {"clip_norm": 0.0})


def test_clipping_bounds_a_malicious_silo() -> None:
    honest = [[0.1, 0.1, 0.1]] * 4
    result = run_round(
        create("clipped-fedavg", {"clip_norm": 0.5}), G, ups(*honest, [1e6, -1e6, 1e6])
    )
    assert float(result.state["w"].abs().max()) < 0.5


def test_median_odd_and_even() -> None:
    odd = run_round(
        create("median"), G, ups([1, 5, 9], [2, 4, 8], [100, -7, 0], weights=[1, 1, 1000])
    )
    torch.testing.assert_close(odd.state["w"], torch.tensor([2.0, 4.0, 8.0]))
    even = run_round(create("median"), G, ups([1, 5, 9], [2, 4, 8], [100, -7, 0], [3, 3, 3]))
    torch.testing.assert_close(even.state["w"], torch.tensor([2.5, 3.5, 5.5]))


def test_trimmed_mean_by_hand() -> None:
    rows = [[float(v), -float(v), 1.0] for v in (1, 2, 3, 4, 1000)]
    # n = 5, trim_ratio 0.2 -> drop 1 at each end: mean of 2, 3, 4
    result = run_round(create("trimmed-mean", {"trim_ratio": 0.2}), G, ups(*rows))
    torch.testing.assert_close(result.state["w"], torch.tensor([3.0, -3.0, 1.0]))
    assert result.metrics["trimmed_per_side"] == 1.0
    none = run_round(
        create("trimmed-mean", {"trim_ratio": 0.1}), G, ups(*rows)
    )  # floor(0.5) = 0: plain mean
    torch.testing.assert_close(none.state["w"], torch.tensor([202.0, -202.0, 1.0]))
    with pytest.raises(ValueError, match=r"params\.trim_ratio"):
        create("trimmed-mean", {"trim_ratio": 0.5})


def test_spill_to_disk_gives_the_same_result_and_cleans_up(tmp_path: Path) -> None:
    rows = [[1, 5, 9], [2, 4, 8], [100, -7, 0], [3, 3, 3]]
    spilled = Median()
    spilled.spill_dir = tmp_path
    acc = spilled.accumulator(G)
    for delta, w in ups(*rows):
        spilled.add(acc, delta, w)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 4
    result = spilled.aggregate(G, acc, {})
    torch.testing.assert_close(
        result.state["w"], run_round(create("median"), G, ups(*rows)).state["w"]
    )
    assert list(tmp_path.iterdir()) == []
