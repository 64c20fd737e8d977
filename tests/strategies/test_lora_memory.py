"""lora-exact's accumulator stays bounded with many silos, and its sum stays exact.

`LowRankSum` re-compresses its factors to their joint numerical rank: silos sharing a
frozen A (FFA-LoRA style) cost one rank's worth of factors however many they are, and
independent silos never cost more than the dense matrix. The sum, and lora-exact's
aggregate, agree with the dense reference to float64 round-off.
"""

from __future__ import annotations

import torch

from fedsilo.strategies import create
from fedsilo.strategies.lora import LowRankSum, lora_pairs

from .factories import lora_state

OUT, IN, RANK, SILOS = 64, 48, 4, 300


def _silos(shared_a: bool, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(RANK, IN, generator=g)
    return [
        (torch.randn(OUT, RANK, generator=g), a0 if shared_a else torch.randn(RANK, IN, generator=g), float(1 + i % 7))
        for i in range(SILOS)
    ]


def _fold(silos: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[LowRankSum, int]:
    acc, peak = LowRankSum(OUT, IN), 0
    for b, a, w in silos:
        acc.add(b, a, w)
        peak = max(peak, acc.held)
    return acc, peak


def _reference(silos: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    return sum((w * b.double() @ a.double() for b, a, w in silos), torch.zeros(OUT, IN, dtype=torch.float64))


def test_shared_directions_cost_their_joint_rank_not_the_silo_count() -> None:
    silos = _silos(shared_a=True, seed=1)
    acc, peak = _fold(silos)
    assert acc.dense is None
    # the sum of ranks would be 300 x 4 = 1200 columns; the joint rank is 4
    assert peak <= 2 * RANK * (OUT + IN) + RANK * (OUT + IN), peak
    want = _reference(silos)
    torch.testing.assert_close(acc.matrix(), want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_independent_silos_never_hold_more_than_the_dense_matrix() -> None:
    silos = _silos(shared_a=False, seed=2)
    acc, peak = _fold(silos)
    assert peak <= 2 * OUT * IN, peak
    want = _reference(silos)
    torch.testing.assert_close(acc.matrix(), want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_lora_exact_result_with_many_silos_matches_the_dense_svd() -> None:
    g = lora_state(OUT, IN, rank=RANK, seed=3)
    gen = torch.Generator().manual_seed(4)
    pairs = lora_pairs(g)
    deltas = []
    for i in range(120):  # A frozen (FFA-LoRA style): only B and the head move
        delta = {k: torch.zeros_like(v) if k.endswith("lora_A.weight") else 0.1 * torch.randn(v.shape, generator=gen)
                 for k, v in g.items()}
        deltas.append((delta, float(1 + i % 5)))
    strategy = create("lora-exact")
    acc = strategy.accumulator(g)
    for delta, w in deltas:
        strategy.add(acc, delta, w)
    assert all(p.dense is None and p.held <= 3 * RANK * (OUT + IN) for p in acc.products.values())
    result = strategy.aggregate(g, acc, {})
    total = sum(w for _, w in deltas)
    for a_key, b_key in pairs.values():
        m = sum(w * (g[b_key].double() + d[b_key].double()) @ (g[a_key].double() + d[a_key].double())
                for d, w in deltas) / total
        u, s, vh = torch.linalg.svd(m)
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]  # Eckart-Young: the best rank-r approximation
        got = result.state[b_key].double() @ result.state[a_key].double()
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-6)
