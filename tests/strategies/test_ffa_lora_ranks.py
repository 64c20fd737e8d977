"""ffa-lora's frozen A, and heterogeneous ranks checked against PEFT's own delta weight."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from fedsilo.adapters import AdapterError, delta
from fedsilo.strategies import create, is_lora_a, pad_rank, silo_alpha, truncate_rank
from fedsilo.strategies.lora import dense_products, lora_pairs

from .factories import lora_state, random_delta, run_round
from .test_lora_exact import dense_reference, rel


def test_ffa_lora_averages_b_exactly() -> None:
    g = lora_state(48, 32, rank=4, seed=1)
    updates = [
        (random_delta(g, seed=i, scale=0.05, frozen_a=True), w)
        for i, w in enumerate([3.0, 1.0, 6.0])
    ]
    result = run_round(create("ffa-lora"), g, updates)
    ref = dense_reference(g, updates)
    for prefix, m in dense_products(result.state).items():
        assert rel(m, ref[prefix]) < 1e-6
        assert torch.equal(result.state[prefix + ".lora_A.weight"], g[prefix + ".lora_A.weight"])
    assert create("ffa-lora").client_config() == {"freeze_lora_a": True}


def test_ffa_lora_refuses_a_trained_a() -> None:
    g = lora_state()
    s = create("ffa-lora")
    with pytest.raises(AdapterError, match=r"lora_A\.weight: ffa-lora keeps lora_A frozen") as err:
        s.add(s.accumulator(g), random_delta(g, seed=0), 1.0)
    assert err.value.reason == "lora_a_not_frozen"
    assert is_lora_a("x.query.lora_A.weight") and is_lora_a("x.query.lora_A.default.weight")
    assert not is_lora_a("x.query.lora_B.weight")


def test_pad_and_truncate_round_trip() -> None:
    g = lora_state(20, 12, rank=8)
    small = truncate_rank(g, 3)
    for a_key, b_key in lora_pairs(g).values():
        assert small[a_key].shape == (3, 12) and small[b_key].shape == (20, 3)
    padded = pad_rank(small, 8)
    for prefix, (a_key, b_key) in lora_pairs(g).items():
        assert padded[a_key].shape == (8, 12) and padded[b_key].shape == (20, 8)
        assert (
            torch.count_nonzero(padded[a_key][3:]) == 0
            and torch.count_nonzero(padded[b_key][:, 3:]) == 0
        )
        torch.testing.assert_close(dense_products(padded)[prefix], dense_products(small)[prefix])
    assert torch.equal(truncate_rank(padded, 3)[a_key], small[a_key])
    assert torch.equal(
        padded["base_model.model.classifier.weight"], g["base_model.model.classifier.weight"]
    )
    # ffa-lora: padding with the global (frozen) A keeps A's delta zero, the product unchanged
    frozen = pad_rank(small, 8, a_from=g)
    assert torch.equal(frozen[a_key], g[a_key])
    torch.testing.assert_close(dense_products(frozen), dense_products(padded))
    with pytest.raises(ValueError, match="exceeds the global rank"):
        pad_rank(g, 4)
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate_rank(g, 9)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(24, 16)


def peft_delta_weight(r: int, alpha: float, seed: int, rslora: bool = False):
    """A PEFT-wrapped layer with random (non-zero) factors: its state dict and delta weight."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["query"], use_rslora=rslora)
    model = get_peft_model(Tiny(), config)
    layer = model.base_model.model.query
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return get_peft_model_state_dict(model), layer.get_delta_weight("default")


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_convention_matches_peft(rslora: bool) -> None:
    """A rank-r_i silo with lora_alpha = silo_alpha(...) has the global scale: padding is exact."""
    r, alpha = 8, 16.0
    scale = alpha / (r**0.5 if rslora else r)
    state, weight = peft_delta_weight(3, silo_alpha(alpha, r, 3, rslora), seed=0, rslora=rslora)
    (product,) = dense_products(pad_rank(state, r)).values()
    torch.testing.assert_close((scale * product).float(), weight, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="between 1 and the global rank"):
        silo_alpha(alpha, r, 9)


def test_lora_exact_with_heterogeneous_ranks() -> None:
    """Silos of rank 8, 4 and 2 (each at the global scale) aggregate to the exact mean delta."""
    r, alpha = 8, 16.0
    g, _ = peft_delta_weight(r, alpha, seed=10)
    weights = {8: 50.0, 4: 20.0, 2: 30.0}
    updates, want = [], 0
    for i, (rank, w) in enumerate(weights.items()):
        state, weight = peft_delta_weight(rank, silo_alpha(alpha, r, rank), seed=i)
        updates.append((delta(pad_rank(state, r), g), w))
        want = want + weight.double() * w / sum(weights.values())
    result = run_round(create("lora-exact"), g, updates)
    (product,) = dense_products(result.state).values()
    # rank <= 8 + 4 + 2 = 14 > 8, so compare with the best rank-8 approximation of the exact mean
    u, s, vh = torch.linalg.svd(want, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    assert rel(alpha / r * product, best) < 1e-5
    assert result.metrics["lora_truncation_error"] == pytest.approx(rel(best, want), rel=1e-4)
