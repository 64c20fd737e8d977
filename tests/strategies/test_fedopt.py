"""Server optimisers: one step by hand, moments carried between rounds."""

from __future__ import annotations

import math

import pytest
import torch

from fedsilo.strategies import create

from .factories import lora_state, random_delta, run_round

ETA, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3


def one_round(name: str, delta: float, server_state=None, x: float = 1.0):
    params = {"eta": ETA, "beta1": B1, "tau": TAU}
    if name != "fedadagrad":
        params["beta2"] = B2
    g = {"w": torch.tensor([x])}
    # two silos whose weighted mean delta is `delta`
    updates = [({"w": torch.tensor([delta + 1.0])}, 1.0), ({"w": torch.tensor([delta - 1.0])}, 1.0)]
    return run_round(create(name, params), g, updates, server_state)


def test_fedadam_one_step_by_hand() -> None:
    result = one_round("fedadam", 0.5)
    m = (1 - B1) * 0.5  # 0.05
    v = B2 * TAU**2 + (1 - B2) * 0.25  # 0.00250099
    assert float(result.server_state["m/w"]) == pytest.approx(m)
    assert float(result.server_state["v/w"]) == pytest.approx(v)
    assert float(result.state["w"]) == pytest.approx(1.0 + ETA * m / (math.sqrt(v) + TAU), rel=1e-6)
    assert result.metrics["pseudo_gradient_norm"] == pytest.approx(0.5)


def test_fedyogi_and_fedadagrad_second_moments() -> None:
    yogi = one_round("fedyogi", 0.5)
    # sign(v - g^2) = sign(1e-6 - 0.25) = -1, so v grows by (1 - beta2) g^2
    assert float(yogi.server_state["v/w"]) == pytest.approx(TAU**2 + (1 - B2) * 0.25)
    ada = one_round("fedadagrad", 0.5)
    assert float(ada.server_state["v/w"]) == pytest.approx(TAU**2 + 0.25)


def test_moments_carry_over_rounds() -> None:
    first = one_round("fedadam", 0.5)
    second = one_round("fedadam", -0.2, first.server_state, x=float(first.state["w"]))
    m = B1 * (1 - B1) * 0.5 + (1 - B1) * -0.2
    v = B2 * float(first.server_state["v/w"]) + (1 - B2) * 0.04
    want = float(first.state["w"]) + ETA * m / (math.sqrt(v) + TAU)
    assert float(second.server_state["m/w"]) == pytest.approx(m)
    assert float(second.state["w"]) == pytest.approx(want, rel=1e-6)


def test_fedopt_validation() -> None:
    with pytest.raises(ValueError, match=r"params\.beta1"):
        create("fedadam", {"beta1": 1.0})
    with pytest.raises(ValueError, match=r"params\.tau"):
        create("fedyogi", {"tau": 0.0})
    with pytest.raises(ValueError, match="beta2"):
        create("fedadagrad", {"beta2": 0.9})  # Adagrad has no beta2
    with pytest.raises(ValueError, match="server state m/w"):
        one_round("fedadam", 0.5, {"m/w": torch.zeros(3), "v/w": torch.zeros(3)})


def test_fedavgm_steps_along_the_velocity_and_refuses_bad_params() -> None:
    g = lora_state(6, 5, rank=2)
    strategy = create("fedavgm", {"eta": 0.5, "momentum": 0.8})
    d1, d2 = random_delta(g, seed=1), random_delta(g, seed=2)
    r1 = run_round(strategy, g, [(d1, 3.0)])
    r2 = run_round(strategy, r1.state, [(d2, 1.0)], r1.server_state)
    for key, x in g.items():
        v1 = d1[key].float()
        v2 = 0.8 * v1 + d2[key].float()
        torch.testing.assert_close(r1.state[key].float(), (x.float() + 0.5 * v1).to(x.dtype).float())
        torch.testing.assert_close(r2.state[key].float(), (r1.state[key].float() + 0.5 * v2).to(x.dtype).float(),
                                   atol=2e-3 if x.dtype == torch.float16 else 1e-6, rtol=1e-4)
        torch.testing.assert_close(r2.server_state[f"velocity/{key}"], v2)
    with pytest.raises(ValueError, match="momentum"):
        create("fedavgm", {"momentum": 1.0})
