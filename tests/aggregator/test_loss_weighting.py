"""aggregation.lossWeighting over real HTTP against real aggregator processes: each update weighs its
examples times its reported training loss as a share of chance level, capped and floored; the header
is validated; a crash between uploads rebuilds the round with the same weights."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch
from tests.aggregator.conftest import postgres_database
from tests.aggregator.test_reliability import Hub, State, combine, delta, document, process, started, tokens_for, v0

from fedsilo.adapters import sha256, to_bytes

CHANCE = math.log(2)  # the test job's two labels


def upload(hub: Hub, silo: str, round_: int, state: State, examples: int, loss: str | None) -> httpx.Response:
    data = to_bytes(state)
    headers = {**hub._silo(silo), "X-Fedsilo-Examples": str(examples), "X-Fedsilo-Sha256": sha256(data)}
    if loss is not None:
        headers["X-Fedsilo-Train-Loss"] = loss
    return httpx.put(f"{hub.url}/v1/jobs/demo/rounds/{round_}/updates/{silo}", content=data, headers=headers)


def share(loss: float) -> float:
    """The documented rule, written out independently: loss / log K in 1/1024 steps, within [1/1024, 1]."""
    return min(max(round(loss / CHANCE * 1024), 1), 1024) / 1024


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_updates_weigh_examples_times_their_capped_loss_share_across_a_crash(tmp_path: Path, backend: str) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else postgres_database()
    agg = process(tmp_path, url, "agg", FEDSILO_LEASE_SECONDS="0.5")
    agg.start()
    try:
        silos = ["alpha", "beta", "gamma", "omega"]
        hub = Hub(agg.url, agg.admin, tokens_for(*silos))
        started(hub, document(silos, minSilos=4, lossWeighting=True))
        assert hub.task("alpha").json()["chance_loss"] == pytest.approx(CHANCE)
        for bad in ("nan", "inf", "-0.5", "1e7", "low"):
            refused = upload(hub, "alpha", 1, delta(1), 10, bad)
            assert refused.status_code == 422, (bad, refused.text)
            assert "x-fedsilo-train-loss" in refused.text.lower(), refused.text
        assert upload(hub, "alpha", 1, delta(1), 10, "0.0004").status_code == 200  # saturated: the floor
        assert upload(hub, "beta", 1, delta(2), 30, "100000").status_code == 200  # inflated: capped at chance
        agg.kill()  # the restarted aggregator rebuilds the round's sum from the stored rows
        agg.start()
        assert upload(hub, "gamma", 1, delta(3), 20, "0.25").status_code == 200
        assert upload(hub, "omega", 1, delta(4), 20, None).status_code == 200  # no report: as without weighting
        hub.wait_for("version 1", lambda s: s["version"] >= 1)
        got = hub.adapter(1)["classifier.weight"]
        weights = [10 * share(0.0004), 30 * 1.0, 20 * share(0.25), 20 * 1.0]
        assert weights[0] == 10 / 1024 and weights[2] == 20 * 369 / 1024
        want = combine(v0(), list(zip([delta(1), delta(2), delta(3), delta(4)], weights, strict=True)))
        assert torch.equal(got, want["classifier.weight"])
        by_examples = combine(v0(), [(delta(1), 10), (delta(2), 30), (delta(3), 20), (delta(4), 20)])
        assert not torch.allclose(got, by_examples["classifier.weight"], atol=1e-3)
        metrics = httpx.get(f"{hub.url}/metrics", headers={"Authorization": f"Bearer {hub.admin}"}).text
        assert 'fedsilo_silo_train_loss{job="demo",silo="gamma"} 0.25' in metrics
    finally:
        agg.stop()


def test_without_loss_weighting_a_reported_loss_changes_nothing(tmp_path: Path) -> None:
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", "agg")
    agg.start()
    try:
        hub = Hub(agg.url, agg.admin, tokens_for("alpha", "beta"))
        started(hub, document(["alpha", "beta"], minSilos=2, lossWeighting=False))
        assert hub.task("alpha").json()["chance_loss"] is None
        assert upload(hub, "alpha", 1, delta(1), 10, "0.001").status_code == 200
        assert upload(hub, "beta", 1, delta(2), 30, "0.6").status_code == 200
        hub.wait_for("version 1", lambda s: s["version"] >= 1)
        want = combine(v0(), [(delta(1), 10), (delta(2), 30)])
        assert torch.equal(hub.adapter(1)["classifier.weight"], want["classifier.weight"])
    finally:
        agg.stop()
