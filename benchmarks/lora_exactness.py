"""How wrong is averaging LoRA factors? Pure tensors, runs in seconds.

For silos that disagree more and more (each silo's A and B differ from the global ones by
`disagreement` times their typical size), compare against the exact mean product
M = sum_i p_i B_i A_i (float64, dense) of a 384 x 384 layer at rank 8 (MiniLM's query):

  naive      ||mean(B) mean(A) - M|| / ||M||     (what fedavg does to LoRA factors)
  exact sum  ||lora-exact's accumulated M - M|| / ||M||   (before re-factorisation)
  lora-exact ||B' A' - M|| / ||M|| after the rank-8 SVD: the truncation error, which is the
             smallest error any rank-8 adapter can have (Eckart-Young)

"rescaled factors" rows use silos with identical products but differently scaled factors
(B R_i, R_i^-1 A): exact is exact, naive is not. "round 1" rows start from PEFT's init
(B = 0): each silo learns its own B while its A drifts.

Usage: python benchmarks/lora_exactness.py [--silos 5] [--layers 12]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedsilo.adapters import State
from fedsilo.strategies import create
from fedsilo.strategies.lora import dense_products, lora_pairs

OUT, IN, R = 384, 384, 8


def global_state(layers: int, gen: torch.Generator) -> State:
    state: State = {}
    for i in range(layers):
        prefix = f"base_model.model.bert.encoder.layer.{i}.attention.self.query"
        state[f"{prefix}.lora_A.weight"] = (torch.rand(R, IN, generator=gen) * 2 - 1) * IN**-0.5
        state[f"{prefix}.lora_B.weight"] = torch.randn(OUT, R, generator=gen) * 0.01
    state["base_model.model.classifier.weight"] = torch.randn(2, OUT, generator=gen) * 0.1
    return state


def noisy_silos(g: State, n: int, disagreement: float, gen: torch.Generator) -> list[State]:
    return [
        {
            k: v + torch.randn(v.shape, generator=gen) * float(v.abs().mean()) * disagreement
            for k, v in g.items()
        }
        for _ in range(n)
    ]


def first_round_silos(g: State, n: int, a_moves: float, gen: torch.Generator) -> list[State]:
    """Round 1: B starts at 0 (PEFT's init); silos learn B and move A by `a_moves` x its size."""
    silos = []
    for _ in range(n):
        silo = dict(g)
        for a_key, b_key in lora_pairs(g).values():
            a = g[a_key]
            silo[a_key] = a + torch.randn(a.shape, generator=gen) * float(a.abs().mean()) * a_moves
            silo[b_key] = torch.randn(g[b_key].shape, generator=gen) * 0.01
        silos.append(silo)
    return silos


def gauge_silos(g: State, n: int, spread: float) -> list[State]:
    silos = []
    for i in range(n):
        r = torch.diag(torch.linspace(1 / spread, spread, R) ** ((i - n // 2) / max(1, n // 2)))
        silo = dict(g)
        for a_key, b_key in lora_pairs(g).values():
            silo[a_key], silo[b_key] = torch.linalg.inv(r) @ g[a_key], g[b_key] @ r
        silos.append(silo)
    return silos


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def measure(
    g: State, silos: list[State], weights: list[float]
) -> tuple[float, float, float, float]:
    """(naive, exact-sum, lora-exact, seconds) errors, worst layer."""
    total = sum(weights)
    products = [dense_products(s) for s in silos]
    reference = {
        p: sum(ps[p] * (w / total) for ps, w in zip(products, weights, strict=True))
        for p in products[0]
    }
    deltas = [{k: s[k] - g[k] for k in g} for s in silos]
    results = {}
    seconds = 0.0
    for name in ("fedavg", "lora-exact"):
        strategy = create(name)
        start = time.perf_counter()
        acc = strategy.accumulator(g)
        for d, w in zip(deltas, weights, strict=True):
            strategy.add(acc, d, w)
        if name == "lora-exact":
            exact_sum = max(
                rel(acc.products[p].matrix() / acc.weight, m) for p, m in reference.items()
            )
        results[name] = dense_products(strategy.aggregate(g, acc, {}).state)
        seconds = time.perf_counter() - start
    naive = max(rel(results["fedavg"][p], m) for p, m in reference.items())
    exact = max(rel(results["lora-exact"][p], m) for p, m in reference.items())
    return naive, exact_sum, exact, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    g = global_state(args.layers, gen)
    weights = [float(w) for w in torch.randint(50, 500, (args.silos,), generator=gen)]
    print(
        f"{args.silos} silos, {args.layers} LoRA layers {OUT}x{IN}, rank {R}; worst layer shown"
    )
    head = ("silos differ by", "naive", "exact sum", "lora-exact", "naive/exact", "agg s")
    print("{:>22} | {:>9} | {:>9} | {:>10} | {:>11} | {:>6}".format(*head))
    print("-" * 86)
    rows = [
        (f"{d:g} x factor size", noisy_silos(g, args.silos, d, gen))
        for d in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    ]
    zero_b = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in g.items()}
    first = [
        (f"round 1, A moved x{d:g}", first_round_silos(zero_b, args.silos, d, gen))
        for d in (0.1, 1.0)
    ]
    rows += [(f"rescaled factors x{s:g}", gauge_silos(g, args.silos, s)) for s in (1.5, 4.0)]
    for label, silos in rows + first:
        base = zero_b if label.startswith("round 1") else g
        naive, exact_sum, exact, seconds = measure(base, silos, weights)
        ratio = naive / exact if exact > 1e-12 else float("inf")
        row = (label, naive, exact_sum, exact, ratio, seconds)
        print("{:>22} | {:9.2e} | {:9.2e} | {:10.2e} | {:11.1f} | {:6.2f}".format(*row))


if __name__ == "__main__":
    main()
