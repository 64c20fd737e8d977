"""The /v1 API over real HTTP against a real aggregator process, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import pytest
import torch
from tests.aggregator.conftest import AggregatorProcess
from tests.conftest import job_document

from fedsilo.adapters import from_bytes, sha256, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client, ClientError
from fedsilo.spec import parse_job

TOKENS = {"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}


def _v0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "m.lora_A.weight": torch.randn(4, 6, generator=g),
        "m.lora_B.weight": torch.zeros(5, 4),
        "classifier.weight": torch.randn(2, 6, generator=g),
    }


def _delta(scale: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, scale) for k, v in _v0().items()}


def _put(
    agg: AggregatorProcess,
    silo: str,
    round_: int,
    data: bytes,
    *,
    token: str | None = None,
    examples: str = "10",
    digest: str | None = None,
) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {token or TOKENS[silo]}",
        "X-Fedsilo-Examples": examples,
        "X-Fedsilo-Sha256": digest or sha256(data),
        "Content-Type": "application/octet-stream",
    }
    return httpx.put(f"{agg.url}/v1/jobs/demo/rounds/{round_}/updates/{silo}", content=data, headers=headers)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _setup(agg: AggregatorProcess, **spec: Any) -> tuple[Client, Client, Client]:
    admin = Client(agg.url, "demo", agg.admin, retries=0)
    created = admin.create_job(parse_job(job_document(**spec)), TOKENS)
    assert created.created and created.silo_tokens == TOKENS
    a, b = (Client(agg.url, "demo", TOKENS[n], n, retries=0) for n in ("alpha", "beta"))
    for silo in (a, b):
        silo.join(m.JoinRequest(n_train_examples=100, n_eval_examples=50))
    return admin, a, b


def _wait_version(admin: Client, version: int, timeout: float = 20.0) -> m.JobStatus:
    """Rounds close in the aggregator's background loop, not inside the last upload."""
    deadline = time.monotonic() + timeout
    while (status := admin.status()).version < version:
        assert time.monotonic() < deadline, f"version {version} not produced: {status}"
        time.sleep(0.05)
    return status


def test_full_round_trip_with_fedavg_by_hand(aggregator: AggregatorProcess) -> None:
    admin, a, b = _setup(aggregator)
    assert a.task().action == "init"
    a.put_initial(to_bytes(_v0()))
    task = b.task()
    assert (task.action, task.round, task.version) == ("train", 1, 0)
    assert from_bytes(b.adapter(0)).keys() == _v0().keys()

    a.put_update(1, to_bytes(_delta(1.0)), n_examples=30, train_seconds=1.0)
    assert admin.status().round == 1
    b.put_update(1, to_bytes(_delta(5.0)), n_examples=10, train_seconds=2.0)
    _wait_version(admin, 1)

    v1 = from_bytes(a.adapter(1))
    expected = (30 * 1.0 + 10 * 5.0) / 40  # example-weighted mean delta = 2.0
    for name, tensor in _v0().items():
        assert torch.allclose(v1[name], tensor + expected)
    status = admin.status()
    assert (status.phase, status.round, status.version) == ("Running", 2, 1)

    a.post_metrics(m.MetricsReport(version=1, split="validation", loss=0.5, accuracy=0.8, n_examples=30))
    b.post_metrics(m.MetricsReport(version=1, split="validation", loss=1.0, accuracy=0.4, n_examples=10))
    history = admin.rounds()
    assert history[0].updates == 2 and history[0].examples == 40 and history[0].max_train_seconds == 2.0
    assert math.isclose(history[0].accuracy or 0, (0.8 * 30 + 0.4 * 10) / 40)

    for silo, scale in ((a, 0.0), (b, 0.0)):
        silo.put_update(2, to_bytes(_delta(scale)), n_examples=5, train_seconds=0.1)
    assert _wait_version(admin, 2).phase == "Succeeded"
    assert a.task().action == "evaluate"  # the final adapter still needs its validation numbers

    metrics = httpx.get(f"{aggregator.url}/metrics", headers=_bearer(aggregator.admin)).text
    assert 'fedsilo_round{job="demo"} 2.0' in metrics
    assert 'fedsilo_updates_accepted_total{job="demo"} 4.0' in metrics
    assert "fedsilo_round_duration_seconds_count" in metrics


def test_bad_uploads_are_refused_and_nothing_is_stored(aggregator: AggregatorProcess) -> None:
    admin, a, _ = _setup(aggregator)
    a.put_initial(to_bytes(_v0()))
    good = to_bytes(_delta(1.0))

    wrong_shape = to_bytes({**_delta(1.0), "m.lora_A.weight": torch.zeros(3, 6)})
    nan = _delta(1.0)
    nan["m.lora_B.weight"][0, 0] = float("nan")
    cases = [
        (_put(aggregator, "alpha", 1, wrong_shape), 422, "wrong_shape"),
        (_put(aggregator, "alpha", 1, to_bytes(nan)), 422, "not_finite"),
        (_put(aggregator, "alpha", 1, to_bytes({"other": torch.zeros(2)})), 422, "wrong_names"),
        (_put(aggregator, "alpha", 1, b"garbage"), 422, "malformed"),
        (_put(aggregator, "alpha", 1, good, digest="0" * 64), 422, "bad_checksum"),
        (_put(aggregator, "alpha", 2, good), 409, "wrong_round"),
        (_put(aggregator, "alpha", 1, good, token="not-the-right-token-at-all"), 401, "unauthorized"),
        (_put(aggregator, "alpha", 1, good, token=TOKENS["beta"]), 401, "unauthorized"),
        (_put(aggregator, "alpha", 1, good, examples="0"), 422, "bad_examples"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status, response.text
        assert response.json()["reason"] == reason
    assert admin.rounds()[0].updates == 0

    # a valid upload goes through; the identical re-send is a harmless no-op; a different one is refused
    assert _put(aggregator, "alpha", 1, good).json()["duplicate"] is False
    assert _put(aggregator, "alpha", 1, good).json()["duplicate"] is True
    assert _put(aggregator, "alpha", 1, to_bytes(_delta(2.0))).status_code == 409
    assert admin.rounds()[0].updates == 1

    metrics = httpx.get(f"{aggregator.url}/metrics", headers=_bearer(aggregator.admin)).text
    assert 'fedsilo_updates_rejected_total{job="demo",reason="wrong_shape"} 1.0' in metrics


def test_auth_and_job_admin(aggregator: AggregatorProcess) -> None:
    bad_admin = Client(aggregator.url, "demo", "x" * 20, retries=0)
    with pytest.raises(ClientError) as info:
        bad_admin.create_job(parse_job(job_document()), {})
    assert info.value.status == 401
    admin = Client(aggregator.url, "demo", aggregator.admin, retries=0)
    created = admin.create_job(parse_job(job_document()), {})
    assert set(created.silo_tokens) == {"alpha", "beta"}  # generated and returned once
    again = admin.create_job(parse_job(job_document()), {})
    assert not again.created and again.silo_tokens == {}
    with pytest.raises(ClientError) as info:
        admin.create_job(parse_job(job_document(training={"rounds": 9})), {})
    assert info.value.status == 409
    with pytest.raises(ClientError) as info:
        admin.create_job(parse_job(job_document(aggregation={"strategy": "nonsense"})), {})
    assert info.value.status == 422 and "nonsense" in info.value.detail

    response = httpx.post(
        f"{aggregator.url}/v1/jobs",
        json={"job": {"kind": "FederatedJob"}},
        headers={"Authorization": f"Bearer {aggregator.admin}"},
    )
    assert response.status_code == 422 and "apiVersion" in response.json()["detail"]
    assert admin.patch_job(rounds=5).rounds == 5
    document = httpx.get(f"{aggregator.url}/openapi.json", headers=_bearer(aggregator.admin)).json()
    assert document["info"]["version"] == "v1"
    silo = Client(aggregator.url, "demo", created.silo_tokens["alpha"], "alpha", retries=0)
    assert silo.spec().metadata.name == "demo"
    with pytest.raises(ClientError) as info:
        silo.task()
    assert info.value.status == 409  # must join first


def test_restart_resumes_the_open_round(aggregator: AggregatorProcess) -> None:
    admin, a, b = _setup(aggregator)
    a.put_initial(to_bytes(_v0()))
    a.put_update(1, to_bytes(_delta(1.0)), n_examples=30, train_seconds=1.0)
    aggregator.stop()
    aggregator.start()
    assert admin.status().round == 1
    b.put_update(1, to_bytes(_delta(5.0)), n_examples=10, train_seconds=1.0)
    _wait_version(admin, 1)
    v1 = from_bytes(a.adapter(1))
    assert torch.allclose(v1["classifier.weight"], _v0()["classifier.weight"] + 2.0)
