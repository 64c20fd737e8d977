"""aggregation.lossWeighting's weight factor: a silo's training loss as a share of chance level."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from fedsilo.strategies import WeightedSum, loss_share

CHANCE = math.log(3)


@pytest.mark.parametrize(
    ("loss", "chance", "share"),
    [
        (0.5, None, 1.0),  # no loss weighting
        (None, CHANCE, 1.0),  # no report: the most a report could claim
        (float("nan"), CHANCE, 1.0),
        (float("inf"), CHANCE, 1.0),
        (0.0, CHANCE, 1 / 1024),  # a saturated silo still counts a little: the round's weight never sums to 0
        (CHANCE / 2, CHANCE, 0.5),
        (CHANCE, CHANCE, 1.0),
        (1e5, CHANCE, 1.0),  # an inflated report is capped at chance level
    ],
)
def test_share_is_the_loss_over_chance_capped_and_floored(
    loss: float | None, chance: float | None, share: float
) -> None:
    assert loss_share(loss, chance) == share


def test_weights_stay_exact_products_so_the_fold_order_does_not_matter() -> None:
    rng = random.Random(7)
    weights = [rng.randint(1, 2**19) * loss_share(rng.uniform(0, 2), CHANCE) for _ in range(6)]
    deltas = [{"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(i))} for i in range(6)]
    for w, d in zip(weights, deltas, strict=True):  # n x share x a float32 is exact in float64
        x = float(d["w"][0, 0])
        assert Fraction(w * x) == Fraction(w) * Fraction(x)
    forward, backward = WeightedSum(), WeightedSum()
    for w, d in zip(weights, deltas, strict=True):
        forward.add(d, w)
    for w, d in reversed(list(zip(weights, deltas, strict=True))):
        backward.add(d, w)
    assert torch.equal(forward.mean()["w"].float(), backward.mean()["w"].float())
