"""The label-skew benchmark's head recalibration (`+lda`, `lda-probe`): the closed-form math its
README numbers rest on. The statistics are sums, so how the examples are split cannot matter."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark imports its sibling skew_table
_spec = importlib.util.spec_from_file_location("label_skew_benchmark", ROOT / "benchmarks" / "strategies.py")
assert _spec is not None and _spec.loader is not None
bench = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(bench)
HeadStats, lda_head, with_head = bench.HeadStats, bench.lda_head, bench.with_head


def stats(x: torch.Tensor, y: torch.Tensor, k: int) -> HeadStats:
    onehot = torch.nn.functional.one_hot(y, k).double()
    return HeadStats(onehot.sum(0), onehot.T @ x.double(), x.double().T @ x.double())


def two_classes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes, 500 and 300 examples in 8 dimensions, apart along the first axis."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.tensor([2.0] + [0.0] * 7)
    x = torch.cat([torch.randn(500, 8, generator=g) + shift, torch.randn(300, 8, generator=g) - shift])
    return x, torch.cat([torch.zeros(500), torch.ones(300)]).long()


def test_one_class_silos_pooled_separate_the_classes() -> None:
    """Each silo holds one class (alpha -> 0): alone it cannot learn a boundary, pooled it can."""
    x, y = two_classes()
    weight, bias = lda_head([stats(x[:500], y[:500], 3), stats(x[500:], y[500:], 3)])
    assert ((x @ weight.T + bias).argmax(1) == y).float().mean() > 0.95
    # the class no silo holds has no weight and the smallest prior: it is never predicted
    assert torch.count_nonzero(weight[2]) == 0 and bias[2] < bias[:2].min()


def test_the_split_does_not_matter() -> None:
    x, y = two_classes(1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(2))
    whole = lda_head([stats(x, y, 2)])
    parts = lda_head([stats(x[order[i::4]], y[order[i::4]], 2) for i in range(4)])
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_with_head_replaces_only_the_classifier() -> None:
    state = {
        "classifier.weight": torch.zeros(2, 8),
        "classifier.bias": torch.zeros(2),
        "encoder.lora_A.weight": torch.ones(4, 8),
    }
    head = (torch.ones(2, 8), torch.full((2,), 3.0))
    out = with_head(state, head)
    assert torch.equal(out["classifier.weight"], head[0]) and torch.equal(out["classifier.bias"], head[1])
    assert out["encoder.lora_A.weight"] is state["encoder.lora_A.weight"]
    with pytest.raises(SystemExit, match="one classifier weight and bias"):
        with_head({"encoder.lora_A.weight": torch.ones(4, 8)}, head)
