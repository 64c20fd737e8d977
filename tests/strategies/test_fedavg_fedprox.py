"""FedAvg by hand, and FedProx's proximal term."""

from __future__ import annotations

import pytest
import torch

from fedsilo.strategies import create, proximal_term

from .factories import run_round


def test_fedavg_by_hand() -> None:
    g = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.float16)}
    d1 = {"w": torch.tensor([1.0, 0.0]), "h": torch.tensor([1.0])}
    d2 = {"w": torch.tensor([-1.0, 4.0]), "h": torch.tensor([-1.0])}
    result = run_round(create("fedavg"), g, [(d1, 30.0), (d2, 10.0)])
    # mean delta = (30*d1 + 10*d2) / 40 = [0.5, 1.0] and [0.5]
    assert torch.equal(result.state["w"], torch.tensor([1.5, 3.0]))
    assert result.state["h"].dtype == torch.float16
    assert float(result.state["h"]) == 1.0


def test_fedprox_client_config_and_validation() -> None:
    assert create("fedprox", {"mu": 0.5}).client_config() == {"proximal_mu": 0.5}
    assert create("fedprox").client_config() == {"proximal_mu": 0.01}
    assert create("fedavg").client_config() == {}
    with pytest.raises(ValueError, match=r"aggregation\.params\.mu"):
        create("fedprox", {"mu": -1.0})


def test_proximal_term_value_and_gradient() -> None:
    w = {
        "a": torch.tensor([1.0, 2.0], requires_grad=True),
        "b": torch.tensor([[3.0]], requires_grad=True),
    }
    w0 = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]]), "unused": torch.zeros(3)}
    term = proximal_term(w, w0, mu=0.2)
    # 0.2 / 2 * (1 + 4 + 4) = 0.9
    assert float(term.detach()) == pytest.approx(0.9)
    term.backward()
    # d/dw = mu * (w - w0)
    assert torch.allclose(w["a"].grad, torch.tensor([0.2, 0.4]))
    assert torch.allclose(w["b"].grad, torch.tensor([[0.4]]))


def test_proximal_term_errors() -> None:
    w = {"a": torch.ones(2)}
    with pytest.raises(ValueError, match="'a'"):
        proximal_term(w, {"b": torch.ones(2)}, mu=0.1)
    with pytest.raises(ValueError, match="mu"):
        proximal_term(w, w, mu=-0.1)
    assert float(proximal_term(w, w, mu=1.0)) == 0.0
