"""One table, every strategy: the properties any aggregation must have."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from fedsilo.adapters import apply_delta, from_bytes, schema_of, to_bytes
from fedsilo.strategies import REGISTRY, Strategy, create

from .factories import assert_states_close, effective, lora_state, random_delta, run_round


@dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, float] = field(default_factory=dict)
    mean_like: bool = True  # identical updates -> exactly that update applied
    weighted: bool = True  # weight w counts like w copies of weight 1
    exact_factors: bool = True  # factors themselves (not only B @ A) are the expected ones
    frozen_a: bool = False  # updates must leave lora_A unchanged

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("fedavg"),
    Case("fedavgm"),  # round 1: velocity = the mean delta
    Case("fedprox", {"mu": 0.1}),
    Case("fedkd", {"temperature": 3.0, "alpha": 0.3, "teacher_rank": 8}),
    Case("fedadam", mean_like=False),
    Case("fedyogi", mean_like=False),
    Case("fedadagrad", mean_like=False),
    Case("ffa-lora", frozen_a=True),
    Case("lora-exact", exact_factors=False),
    Case("clipped-fedavg", {"clip_norm": 100.0}),
    Case("median", weighted=False),
    Case("trimmed-mean", {"trim_ratio": 0.2}, weighted=False),
]


def strategy(case: Case) -> Strategy:
    return create(case.name, case.params)


def deltas(case: Case, global_state, n: int):
    return [random_delta(global_state, seed=i, frozen_a=case.frozen_a) for i in range(n)]


def assert_same(case: Case, got, want) -> None:
    if case.exact_factors:
        assert_states_close(got, want)
    assert_states_close(effective(got), effective(want))


def test_every_registered_strategy_has_a_row() -> None:
    assert sorted(REGISTRY) == sorted(c.name for c in CASES)
    assert all(cls.name == name for name, cls in REGISTRY.items())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_identical_updates(case: Case) -> None:
    g = lora_state()
    (d,) = deltas(case, g, 1)
    many = run_round(strategy(case), g, [(d, 1.0), (d, 2.5), (d, 7.0)])
    one = run_round(strategy(case), g, [(d, 1.0)])
    assert_same(case, many.state, one.state)
    if case.mean_like:
        assert_same(case, many.state, apply_delta(g, d))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_weights_respected(case: Case) -> None:
    g = lora_state()
    d1, d2, d3 = deltas(case, g, 3)
    weighted = run_round(strategy(case), g, [(d1, 1.0), (d2, 3.0), (d3, 1.0)])
    if case.weighted:
        copies = run_round(
            strategy(case), g, [(d1, 1.0), (d2, 1.0), (d2, 1.0), (d2, 1.0), (d3, 1.0)]
        )
        assert_same(case, weighted.state, copies.state)
        equal = run_round(strategy(case), g, [(d1, 1.0), (d2, 1.0), (d3, 1.0)])
        diff = effective(weighted.state)["base_model.model.classifier.weight"]
        assert not torch.allclose(
            diff, effective(equal.state)["base_model.model.classifier.weight"]
        )
    else:  # robust statistics ignore self-reported example counts by design
        equal = run_round(strategy(case), g, [(d1, 1.0), (d2, 1.0), (d3, 1.0)])
        assert_same(case, weighted.state, equal.state)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_names_shapes_dtypes_preserved(case: Case) -> None:
    g = lora_state()
    result = run_round(strategy(case), g, [(d, 2.0) for d in deltas(case, g, 3)])
    assert schema_of(result.state) == schema_of(g)
    assert all(torch.isfinite(t.float()).all() for t in result.state.values())
    assert all(isinstance(v, float) for v in result.metrics.values())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_round_trips_through_safetensors(case: Case) -> None:
    g = lora_state()
    updates = [(d, 2.0) for d in deltas(case, g, 3)]
    first = run_round(strategy(case), g, updates)
    stored_state = from_bytes(to_bytes(first.state))
    stored_server = from_bytes(to_bytes(first.server_state)) if first.server_state else {}
    assert_states_close(stored_state, first.state, atol=0)
    assert schema_of(stored_state) == schema_of(first.state)
    # the second round from persisted state equals the one from in-memory state
    second_mem = run_round(strategy(case), first.state, updates, first.server_state)
    second_disk = run_round(strategy(case), stored_state, updates, stored_server)
    assert_states_close(second_disk.state, second_mem.state, atol=0)
    assert sorted(second_disk.server_state) == sorted(second_mem.server_state)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rejects_bad_input(case: Case) -> None:
    g = lora_state()
    (d,) = deltas(case, g, 1)
    s = strategy(case)
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            s.add(s.accumulator(g), d, weight)
    with pytest.raises(ValueError, match="no updates"):
        s.aggregate(g, s.accumulator(g), {})
    with pytest.raises(ValueError, match="nope"):
        create(case.name, {**case.params, "nope": 1.0})
