"""lora-exact on DoRA adapters (real PEFT state): the magnitude vectors are averaged as the
weighted mean of the silos' magnitudes, the direction's low-rank update B A as the exact
weighted mean of the products (then the best rank-r approximation), and the result loads
into a DoRA model whose layers compute m * (W0 + s B A) / ||W0 + s B A||_col from those parts."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from fedsilo.strategies import create
from fedsilo.strategies.lora import dense_products

from .factories import run_round

WEIGHTS = [50.0, 20.0, 130.0]


class Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = torch.nn.Linear(12, 10), torch.nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + self.v(x)


def dora_model(rank: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(Two(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q", "v"], use_dora=True))


def silo_deltas(g: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], float]]:
    out = []
    for i, w in enumerate(WEIGHTS):
        gen = torch.Generator().manual_seed(i)
        out.append(({k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in g.items()}, w))
    return out


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_magnitudes_are_the_weighted_mean_and_products_exact() -> None:
    rank = 4
    model = dora_model(rank)
    g = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    magnitudes = [k for k in g if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 2  # the test is about real DoRA state
    updates = silo_deltas(g)
    result = run_round(create("lora-exact"), g, updates).state

    total = sum(WEIGHTS)
    for key in magnitudes:
        want = g[key].double() + sum(d[key].double() * w for d, w in updates) / total
        torch.testing.assert_close(result[key].double(), want, atol=1e-6, rtol=1e-6)
    mean_products: dict[str, torch.Tensor] = {}
    for d, w in updates:
        silo = {k: g[k].double() + d[k].double() for k in g}
        for prefix, prod in dense_products(silo).items():
            mean_products[prefix] = mean_products.get(prefix, 0) + prod * (w / total)
    got = dense_products(result)
    for prefix, want in mean_products.items():
        # three rank-4 silos sum to rank 12 > 4: the best rank-4 approximation of the exact mean
        torch.testing.assert_close(got[prefix], best_rank(want, rank), atol=1e-5, rtol=1e-4)


def test_aggregated_dora_state_loads_and_computes_from_its_parts() -> None:
    rank = 4
    model = dora_model(rank)
    g = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    result = run_round(create("lora-exact"), g, silo_deltas(g)).state
    set_peft_model_state_dict(model, result)
    layer = model.base_model.model.q
    w0 = layer.base_layer.weight.detach().double()
    scale = layer.scaling["default"]
    a = result["base_model.model.q.lora_A.weight"].double()
    b = result["base_model.model.q.lora_B.weight"].double()
    m = result["base_model.model.q.lora_magnitude_vector"].double()
    v = w0 + scale * b @ a
    weight = m[:, None] * v / v.norm(dim=1, keepdim=True)  # PEFT's DoRA: row-wise norm of out x in
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x.float()).double()
    torch.testing.assert_close(got, x @ weight.T + layer.base_layer.bias.double(), atol=1e-4, rtol=1e-4)
