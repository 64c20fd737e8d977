"""lora-exact against the dense sum_i p_i B_i A_i in PEFT's layout (A: r x in, B: out x r)."""

from __future__ import annotations

import pytest
import torch

from fedsilo.strategies import create
from fedsilo.strategies.lora import LowRankSum, dense_products, lora_pairs

from .factories import lora_state, random_delta, run_round

WEIGHTS = [120.0, 40.0, 300.0, 75.0, 10.0]


def silo_updates(g, out_features: int, in_features: int, disagreement: float = 1.0):
    """Silos whose factors differ from the global by about `disagreement` of their size."""
    updates = []
    for i, w in enumerate(WEIGHTS):
        gen = torch.Generator().manual_seed(i)
        delta = {}
        for k, v in g.items():
            size = float(v.float().abs().mean()) or 0.01
            delta[k] = torch.randn(v.shape, generator=gen) * size * disagreement
        updates.append((delta, w))
    return updates


def dense_reference(g, updates) -> dict[str, torch.Tensor]:
    """sum_i p_i B_i A_i with B_i = B + dB_i, A_i = A + dA_i, in float64."""
    total = sum(w for _, w in updates)
    ref: dict[str, torch.Tensor] = {}
    for delta, w in updates:
        silo = {k: g[k].double() + delta[k].double() for k in g}
        for prefix, m in dense_products(silo).items():
            ref[prefix] = ref.get(prefix, 0) + m * (w / total)
    return ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.detach() - b.detach()) / torch.linalg.norm(b.detach()))


@pytest.mark.parametrize(("out_features", "in_features"), [(384, 384), (160, 96)])
def test_exact_product_then_best_rank_r(out_features: int, in_features: int) -> None:
    g = lora_state(out_features, in_features, rank=8, seed=1)
    updates = silo_updates(g, out_features, in_features)
    result = run_round(create("lora-exact"), g, updates)
    ref = dense_reference(g, updates)
    got = dense_products(result.state)
    errors, tails = [], []
    for prefix, m in ref.items():
        a_key, b_key = lora_pairs(result.state)[prefix]
        assert result.state[a_key].shape == (8, in_features)
        assert result.state[b_key].shape == (out_features, 8)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = (u[:, :8] * s[:8]) @ vh[:8]  # Eckart-Young: the best rank-8 approximation
        assert rel(got[prefix], best) < 1e-5
        errors.append(rel(got[prefix], m))
        tails.append(float((s[8:] ** 2).sum() / (s**2).sum()) ** 0.5)
    assert result.metrics["lora_truncation_error_max"] == pytest.approx(max(errors), rel=1e-4)
    assert result.metrics["lora_truncation_error_max"] == pytest.approx(max(tails), rel=1e-4)
    assert (
        0 < result.metrics["lora_truncation_error"] <= result.metrics["lora_truncation_error_max"]
    )


def test_naive_factor_average_is_strictly_worse() -> None:
    # Eckart-Young: mean(B) @ mean(A) is a rank-r matrix, so it can never beat the best
    # rank-r approximation that lora-exact returns; with disagreeing silos it is worse.
    g = lora_state(384, 384, rank=8, seed=2)
    updates = silo_updates(g, 384, 384)
    ref = dense_reference(g, updates)
    exact = dense_products(run_round(create("lora-exact"), g, updates).state)
    naive = dense_products(run_round(create("fedavg"), g, updates).state)  # mean(B) @ mean(A)
    for prefix, m in ref.items():
        assert rel(naive[prefix], m) > 1.2 * rel(exact[prefix], m)


def test_same_products_different_factors() -> None:
    # Silos may reach the same B A with differently scaled factors (B R, R^-1 A): the
    # products agree, lora-exact returns that product, the factor average does not.
    g = lora_state(384, 384, rank=8, seed=7)
    updates = []
    for i, w in enumerate(WEIGHTS):
        r = torch.diag(torch.linspace(0.5, 2.0, 8) ** (i - 2))
        silo = dict(g)
        for a_key, b_key in lora_pairs(g).values():
            silo[a_key], silo[b_key] = torch.linalg.inv(r) @ g[a_key], g[b_key] @ r
        updates.append(({k: silo[k] - g[k] for k in g}, w))
    ref = dense_reference(g, updates)
    exact = dense_products(run_round(create("lora-exact"), g, updates).state)
    naive = dense_products(run_round(create("fedavg"), g, updates).state)
    for prefix, m in ref.items():
        assert rel(exact[prefix], m) < 1e-5
        assert rel(naive[prefix], m) > 0.1


def test_exact_without_truncation_when_a_is_shared() -> None:
    # silos that only change B: sum_i p_i B_i A = (sum_i p_i B_i) A has rank <= r
    g = lora_state(384, 384, rank=8, seed=3)
    updates = [
        (random_delta(g, seed=i, scale=0.05, frozen_a=True), w) for i, w in enumerate(WEIGHTS)
    ]
    result = run_round(create("lora-exact"), g, updates)
    ref = dense_reference(g, updates)
    for prefix, m in dense_products(result.state).items():
        assert rel(m, ref[prefix]) < 1e-5
    assert result.metrics["lora_truncation_error"] < 1e-6


def test_balanced_split_without_floor() -> None:
    g = lora_state(64, 48, rank=4, seed=4)
    updates = silo_updates(g, 64, 48)
    result = run_round(create("lora-exact", {"min_a_row_norm": 0.0}), g, updates)
    for a_key, b_key in lora_pairs(result.state).values():
        a, b = result.state[a_key].double(), result.state[b_key].double()
        gram_b, gram_a = b.T @ b, a @ a.T  # both diag(S_r) for B = U S^1/2, A = S^1/2 V^T
        torch.testing.assert_close(gram_b, gram_a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gram_a, torch.diag(torch.diagonal(gram_a)), atol=1e-6, rtol=0)


def test_floor_keeps_empty_components_trainable() -> None:
    # first round, nothing learnt yet: B = 0 everywhere, so M = 0
    g = lora_state(32, 24, rank=4, seed=5, b_zero=True)
    zero = {k: torch.zeros_like(v) for k, v in g.items()}
    result = run_round(create("lora-exact"), g, [(zero, 1.0), (zero, 2.0)])
    for a_key, b_key in lora_pairs(result.state).values():
        assert torch.count_nonzero(result.state[b_key]) == 0
        norms = torch.linalg.norm(result.state[a_key], dim=1)
        torch.testing.assert_close(norms, torch.full((4,), 3**-0.5), atol=1e-6, rtol=0)
    assert result.metrics["lora_truncation_error"] == 0.0


def test_low_rank_sum_factored_and_dense_paths_agree() -> None:
    gen = torch.Generator().manual_seed(6)
    pairs = [
        (torch.randn(40, 3, generator=gen), torch.randn(3, 30, generator=gen), w)
        for w in (1.0, 2.0, 0.5)
    ]
    factored, dense = LowRankSum(40, 30), LowRankSum(40, 30)
    for b, a, w in pairs:
        factored.add(b, a, w)
    for b, a, w in pairs * 1:
        dense.add(b, a, w)
    dense.dense = dense.matrix()  # force the dense path
    assert factored.dense is None
    want = sum(w * b.double() @ a.double() for b, a, w in pairs)
    for acc in (factored, dense):
        u, s, vh = acc.svd()
        torch.testing.assert_close((u * s) @ vh, want, atol=1e-9, rtol=1e-9)
    wide = LowRankSum(8, 6)
    for b, a, w in pairs:
        wide.add(b[:8], a[:, :6], w)
    assert wide.dense is not None  # 9 columns of factors would exceed one dense 8 x 6 matrix
    torch.testing.assert_close(
        wide.matrix(), sum(w * b[:8].double() @ a[:, :6].double() for b, a, w in pairs)
    )


def test_half_pair_is_rejected() -> None:
    g = lora_state()
    g.pop(next(k for k in g if k.endswith("lora_B.weight")))
    with pytest.raises(ValueError, match="needs both"):
        create("lora-exact").accumulator(g)
