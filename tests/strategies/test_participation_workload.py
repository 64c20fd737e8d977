"""Participation sampling and resource-aware local steps."""

from __future__ import annotations

import pytest
import torch

from fedsilo.strategies import assign_steps, sample_silos

SILOS = [f"silo-{i}" for i in range(10)]


def test_sampling_is_deterministic_and_sized() -> None:
    first = sample_silos(SILOS, 0.3, 1, seed=7, round=4)
    assert first == sample_silos(list(reversed(SILOS)), 0.3, 1, seed=7, round=4)
    assert len(first) == 3 and first == sorted(first) and set(first) <= set(SILOS)
    rounds = {tuple(sample_silos(SILOS, 0.3, 1, seed=7, round=r)) for r in range(20)}
    assert len(rounds) > 5  # a different sample per round
    assert len(sample_silos(SILOS, 0.01, 1, seed=0, round=0)) == 1  # ceil, never empty
    assert len(sample_silos(SILOS, 0.1, 4, seed=0, round=0)) == 4  # min_count wins
    assert sample_silos(SILOS[:2], 0.5, 5, seed=0, round=0) == SILOS[:2]  # capped at all
    assert sample_silos(SILOS, 1.0, 1, seed=0, round=0) == sorted(SILOS)
    assert sample_silos([], 0.5, 1, seed=0, round=0) == []


def test_sampling_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fraction"):
        sample_silos(SILOS, 0.0, 1, seed=0, round=0)
    with pytest.raises(ValueError, match="duplicates"):
        sample_silos(["a", "a"], 1.0, 1, seed=0, round=0)


def test_steps_equalise_round_time() -> None:
    throughput = {"fast": 80.0, "median": 40.0, "slow": 10.0, "unknown": None}
    steps = assign_steps(throughput, default_steps=20, batch_size=8)
    # target = median time of the measured silos at 20 steps = 20 * 8 / 40 = 4 s
    assert steps == {"fast": 40, "median": 20, "slow": 5, "unknown": 20}
    seconds = {s: steps[s] * 8 / t for s, t in throughput.items() if t}
    assert max(seconds.values()) == min(seconds.values()) == 4.0


def test_steps_are_bounded() -> None:
    steps = assign_steps(
        {"rocket": 1e6, "snail": 0.01, "mid": 40.0}, default_steps=10, batch_size=8, max_factor=3
    )
    assert steps == {"rocket": 30, "snail": 1, "mid": 10}
    assert assign_steps({"a": 10.0}, 10, 8, target_seconds=2.0) == {"a": 2}
    assert assign_steps({"a": None, "b": 0.0}, 10, 8) == {"a": 10, "b": 10}
    with pytest.raises(ValueError, match="max_factor"):
        assign_steps({"a": 1.0}, 10, 8, max_factor=0.5)


def test_unequal_steps_do_not_buy_influence() -> None:
    """Two silos with the same data distribution; the fast one took 4x the steps (balanceWorkload).
    Normalised, both pull with the size of the job's localSteps, so the mean is not dragged."""
    from fedsilo.strategies import normalise_steps

    per_step = {"w": torch.tensor([1.0, -2.0])}
    slow = {"w": per_step["w"] * 5}  # 5 steps, the job's localSteps
    fast = {"w": per_step["w"] * 20}  # 20 steps
    assert torch.equal(normalise_steps(slow, 5, 5)["w"], slow["w"])
    assert torch.equal(normalise_steps(fast, 20, 5)["w"], slow["w"])
    assert torch.equal(normalise_steps(fast, 20, None)["w"], fast["w"])  # epochs mode: nothing to compare with
    with pytest.raises(ValueError, match="steps"):
        normalise_steps(fast, 0, 5)
