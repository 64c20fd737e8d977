"""Silo agents that never give up on their own: the client's retry schedule and typed outcomes.

Unit tests inject an `httpx.MockTransport` and a recording sleep (no real sleeping); the
rest drive a real aggregator process over real HTTP, including an outage of several seconds.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tests.aggregator.conftest import AggregatorProcess, postgres_database
from tests.conftest import job_document
from tests.tiny_causal import build_model_folder, write_jsonl

from fedsilo.adapters import from_bytes, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Backoff, Client, ClientError, Outcome
from fedsilo.local.runner import free_port
from fedsilo.spec import parse_job

TOKENS = {name: f"{name}-token-0123456789" for name in ("alpha", "beta", "gamma")}


# ---- the retry schedule, against a scripted transport -----------------------------------

Step = int | tuple[int, dict[str, str]] | Exception


def scripted(*steps: Step, body: Any = None) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering each request with the next step; a 200 with `body` once they run out."""
    queue, seen = list(steps), []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = queue.pop(0) if queue else 200
        if isinstance(step, Exception):
            raise step
        status, headers = step if isinstance(step, tuple) else (step, {})
        if status >= 400:
            return httpx.Response(
                status, json={"detail": f"said {status}", "reason": headers.pop("reason", None)}, headers=headers
            )
        return httpx.Response(status, json=body if body is not None else {"status": "ok"}, headers=headers)

    return httpx.MockTransport(handle), seen


def client(transport: httpx.BaseTransport, sleeps: list[float], **kwargs: Any) -> Client:
    kwargs.setdefault("retries", None)
    return Client(
        "http://aggregator",
        "demo",
        TOKENS["alpha"],
        "alpha",
        transport=transport,
        sleep=sleeps.append,
        rng=random.Random(7),
        **kwargs,
    )


def test_backoff_is_full_jitter_under_a_doubling_ceiling_and_the_cap() -> None:
    backoff, rng = Backoff(base=0.5, cap=4.0), random.Random(1)
    for attempt in range(12):
        ceiling = min(4.0, 0.5 * 2**attempt)
        draws = [backoff.delay(attempt, rng) for _ in range(400)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.9 * ceiling and min(draws) < 0.1 * ceiling  # full jitter: the whole range
        assert abs(sum(draws) / len(draws) - ceiling / 2) < 0.1 * ceiling
    assert backoff.delay(10_000, rng) <= 4.0  # no overflow however long the outage


def test_transport_errors_and_5xx_are_retried_on_that_schedule() -> None:
    transport, seen = scripted(
        httpx.ConnectError("connection refused"),
        502,
        httpx.ReadTimeout("timed out mid-body"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx.ReadError("connection reset by peer"),
        500,
        503,
        408,
        429,
        body=[{"version": 1}],
    )
    sleeps: list[float] = []
    assert client(transport, sleeps, backoff_cap=2.0).evaluations() == [{"version": 1}]
    assert len(seen) == 10 and len(sleeps) == 9
    rng = random.Random(7)
    assert sleeps == [Backoff(cap=2.0).delay(n, rng) for n in range(9)]  # exactly the documented schedule
    assert all(s <= min(2.0, 0.5 * 2**n) for n, s in enumerate(sleeps))


def test_retry_after_is_honoured() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    sleeps: list[float] = []
    transport, _ = scripted(
        (503, {"Retry-After": "7"}), (429, {"Retry-After": "3"}), (503, {"Retry-After": when}), 503, body=[]
    )
    client(transport, sleeps, backoff_cap=1.0).rounds()
    assert sleeps[0] == 7.0 and sleeps[1] == 3.0  # never sooner than asked; the jitter alone would be under 1 s
    assert 17 < sleeps[2] <= 20
    assert sleeps[3] <= 1.0  # no header: back to the capped backoff


def test_a_long_outage_logs_once_when_it_starts_and_once_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedsilo.client")
    transport, seen = scripted(*[httpx.ConnectError("connection refused")] * 200, body=[])
    sleeps: list[float] = []
    assert client(transport, sleeps).rounds() == []
    assert len(seen) == 201 and len(sleeps) == 200 and max(sleeps) <= 30.0
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "fedsilo.client"]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "retrying for ever" in lines[0][1] and "ConnectError" in lines[0][1]
    assert "answers again after" in lines[1][1] and "200 retries" in lines[1][1]


def test_bounded_retries_give_up() -> None:
    sleeps: list[float] = []
    with pytest.raises(ClientError) as info:
        client(scripted(503, 503, 503, 503)[0], sleeps, retries=3).rounds()
    assert info.value.status == 503 and len(sleeps) == 3
    with pytest.raises(httpx.ConnectError):
        client(scripted(*[httpx.ConnectError("refused")] * 3)[0], sleeps, retries=2).rounds()


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "invalid"),
        (401, "unauthorized"),
        (403, "not_participant"),
        (404, "not_found"),
        (413, "too_large"),
        (422, "wrong_shape"),
    ],
)
def test_requests_that_are_wrong_are_rejected_at_once(status: int, reason: str) -> None:
    sleeps: list[float] = []
    transport, seen = scripted((status, {"reason": reason}))
    with pytest.raises(ClientError) as info:
        client(transport, sleeps).put_update(1, b"delta", 10, 1.0)
    assert (info.value.status, info.value.reason) == (status, reason) and reason in str(info.value)
    assert len(seen) == 1 and sleeps == []


@pytest.mark.parametrize(
    ("step", "outcome", "has_detail"),
    [
        ((409, {"reason": "wrong_round"}), Outcome.LATE, True),
        ((409, {"reason": "stale"}), Outcome.LATE, True),
        ((409, {"reason": "duplicate"}), Outcome.DUPLICATE, True),
        (200, Outcome.ACCEPTED, False),
    ],
)
def test_upload_outcomes(step: Step, outcome: Outcome, has_detail: bool) -> None:
    transport, _ = scripted(step, body={"round": 1, "sha256": "ab" * 32, "duplicate": False})
    upload = client(transport, []).put_update(1, b"delta", 10, 1.0)
    assert upload.outcome is outcome and upload.round == 1 and bool(upload.detail) is has_detail
    with pytest.raises(ClientError) as info:  # a conflict the client does not know stays an error
        client(scripted((409, {"reason": "conflict"}))[0], []).put_update(1, b"delta", 10, 1.0)
    assert info.value.reason == "conflict"


def test_long_poll_passes_wait_and_stretches_the_read_timeout() -> None:
    asked: list[tuple[str | None, float]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append((request.url.params.get("wait"), request.extensions["timeout"]["read"]))
        return httpx.Response(200, json={"action": "wait"})

    silo = client(httpx.MockTransport(handle), [], timeout=5.0)
    assert silo.task().action == "wait"
    silo.task(wait=20)
    silo.task(wait=0.5)
    silo.task(wait=45)  # the server's ceiling is 30 s
    assert asked == [(None, 5.0), ("20", 50.0), ("0.5", 30.5), ("30", 60.0)]


# ---- against a real aggregator process ---------------------------------------------------


def _aggregator(tmp_path: Path, database_url: str | None = None) -> AggregatorProcess:
    return AggregatorProcess(
        f"http://127.0.0.1:{free_port()}",
        secrets.token_urlsafe(24),
        database_url or f"sqlite:///{tmp_path / 'fedsilo.db'}",
        tmp_path / "checkpoints",
        tmp_path / "aggregator.log",
    )


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[AggregatorProcess]:
    agg = _aggregator(tmp_path)
    agg.start()
    yield agg
    agg.stop()


def _v0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"m.lora_A.weight": torch.randn(4, 6, generator=g), "classifier.weight": torch.randn(2, 6, generator=g)}


def _delta(scale: float) -> bytes:
    return to_bytes({k: torch.full_like(v, scale) for k, v in _v0().items()})


def _setup(agg: AggregatorProcess, silos: tuple[str, ...] = ("alpha", "beta"), **spec: Any) -> list[Client]:
    """The admin client, then one joined client per silo; alpha has uploaded the initial adapter."""
    spec.setdefault("silos", [{"name": n, "data": {"path": f"{n}.csv"}} for n in silos])
    admin = Client(agg.url, "demo", agg.admin, retries=0)
    admin.create_job(parse_job(job_document(**spec)), {n: TOKENS[n] for n in silos})
    clients = [Client(agg.url, "demo", TOKENS[n], n, retries=0) for n in silos]
    for c in clients:
        c.join(m.JoinRequest(n_train_examples=100, n_eval_examples=10))
    clients[0].put_initial(to_bytes(_v0()))
    return [admin, *clients]


def test_outcomes_against_the_real_aggregator(aggregator: AggregatorProcess) -> None:
    aggregation = {"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 4}
    admin, a, b, c = _setup(aggregator, ("alpha", "beta", "gamma"), aggregation=aggregation)
    assert a.put_update(1, _delta(1.0), 30, 1.0).outcome is Outcome.ACCEPTED
    again = a.put_update(1, _delta(1.0), 30, 1.0)  # the response was lost: sent again
    assert (again.outcome, again.detail) == (Outcome.DUPLICATE, "")
    other = a.put_update(1, _delta(2.0), 30, 1.0)  # e.g. retrained after a restart: the first one counts
    assert other.outcome is Outcome.DUPLICATE and "different update" in other.detail
    assert b.put_update(1, _delta(3.0), 10, 1.0).outcome is Outcome.ACCEPTED

    deadline = time.monotonic() + 30
    while admin.status().round < 2:  # gamma misses round 1's deadline
        assert time.monotonic() < deadline, admin.status()
        time.sleep(0.2)
    late = c.put_update(1, _delta(4.0), 10, 1.0)
    assert late.outcome is Outcome.LATE and "not open" in late.detail
    assert (c.task().action, c.task().round) == ("train", 2)  # moves on to the next round
    (first, *_) = admin.rounds()
    assert (first.updates, first.examples) == (2, 40)

    never: list[float] = []
    stranger = Client(aggregator.url, "demo", "not-the-token-of-anyone", "alpha", retries=None, sleep=never.append)
    with pytest.raises(ClientError) as info:
        stranger.put_update(2, _delta(1.0), 30, 1.0)
    assert (info.value.status, info.value.reason) == (401, "unauthorized") and never == []
    lost = Client(aggregator.url, "no-such-job", TOKENS["alpha"], "alpha", retries=None, sleep=never.append)
    with pytest.raises(ClientError) as info:
        lost.task()
    assert info.value.reason == "not_found" and never == []


def test_a_restarted_silo_is_told_to_wait_not_to_retrain(aggregator: AggregatorProcess) -> None:
    admin, a, b = _setup(aggregator)
    assert a.task().action == "train"
    a.put_update(1, _delta(1.0), 30, 1.0)
    a.close()
    # the agent process crashed after its upload; the new one joins again and asks for its task
    restarted = Client(aggregator.url, "demo", TOKENS["alpha"], "alpha", retries=0)
    restarted.join(m.JoinRequest(n_train_examples=100, n_eval_examples=10))
    task = restarted.task()
    assert (task.action, task.round, task.version) == ("wait", 1, 0)
    # what the agent reads to rebuild its state: the open round already holds its update
    (current,) = restarted.rounds()
    assert current.state == "open" and "alpha" in current.participants and current.updates == 1
    b.put_update(1, _delta(5.0), 10, 1.0)
    task = restarted.task(wait=10)  # the round closes in the aggregator's background loop
    assert (task.action, task.round) == ("train", 2)
    assert admin.rounds()[0].examples == 40


def test_a_long_poll_returns_as_soon_as_the_task_changes(aggregator: AggregatorProcess) -> None:
    _, a, b = _setup(aggregator)
    a.put_update(1, _delta(1.0), 30, 1.0)
    started = time.monotonic()
    first = a.task(wait=0.5)
    if first.action == "wait" and time.monotonic() - started < 0.3:
        pytest.skip("this aggregator ignores ?wait= (no long polls yet); plain polling still works")
    assert first.action == "wait" and time.monotonic() - started >= 0.5  # held, then still `wait`
    threading.Timer(1.0, lambda: b.put_update(1, _delta(5.0), 10, 1.0)).start()
    started = time.monotonic()
    task = a.task(wait=20)
    assert (task.action, task.round) == ("train", 2)
    assert 0.9 <= time.monotonic() - started < 10  # answered when round 2 opened, not after 20 s


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_outage_of_several_seconds_is_ridden_out_and_counted_once(
    database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedsilo.client")
    agg = _aggregator(tmp_path, postgres_database() if database == "postgresql" else None)
    agg.start()
    try:
        admin, _, _ = _setup(agg)
        agg.stop()
        silo = Client(agg.url, "demo", TOKENS["alpha"], "alpha", retries=None, backoff_cap=1.0)
        result: dict[str, Any] = {}
        call = threading.Thread(target=lambda: result.update(upload=silo.put_update(1, _delta(1.0), 30, 1.0)))
        call.start()
        time.sleep(6)
        assert call.is_alive()  # still retrying, as long as it takes
        agg.start()  # same port, same database
        call.join(60)
        assert not call.is_alive() and result["upload"].outcome is Outcome.ACCEPTED
        (first,) = admin.rounds()
        assert (first.updates, first.examples) == (1, 30)
        lines = [r for r in caplog.records if r.name == "fedsilo.client"]
        assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO], [r.getMessage() for r in lines]
    finally:
        agg.stop()


# ---- a real silo agent process, killed after its upload ------------------------------------


def _agent(agg: AggregatorProcess, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FEDSILO_AGGREGATOR_URL": agg.url,
        "FEDSILO_JOB": "demo",
        "FEDSILO_SILO": "alpha",
        "FEDSILO_TOKEN": TOKENS["alpha"],
        "FEDSILO_DATA_ROOT": str(tmp_path),
        "FEDSILO_TORCH_THREADS": "1",
        "FEDSILO_LONG_POLL_SECONDS": "5",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fedsilo", "silo-agent"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def _until(condition: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_agent_resumes_without_retraining(aggregator: AggregatorProcess, tmp_path: Path) -> None:
    """SIGKILL the agent once its round-1 update is in; the restarted one must not retrain round 1,
    must do the evaluation that followed the upload, then carry on to the end of the job."""
    model = build_model_folder(tmp_path / "model")
    write_jsonl(tmp_path / "alpha.jsonl")
    doc = job_document(
        baseModel={"path": str(model)},
        task={"type": "causal-lm"},
        peft={"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        training={"rounds": 2, "localSteps": 2, "batchSize": 4, "maxLength": 64},
        silos=[
            {"name": "alpha", "data": {"path": "alpha.jsonl", "validationSplit": 0.25}},
            {"name": "beta", "data": {"path": "beta.jsonl"}},  # scripted below
        ],
    )
    admin = Client(aggregator.url, "demo", aggregator.admin, retries=3)
    admin.create_job(parse_job(doc), {n: TOKENS[n] for n in ("alpha", "beta")})
    beta = Client(aggregator.url, "demo", TOKENS["beta"], "beta", retries=3)
    beta.join(m.JoinRequest(n_train_examples=10, n_eval_examples=0))

    first_log, second_log = tmp_path / "alpha-1.log", tmp_path / "alpha-2.log"
    first = _agent(aggregator, tmp_path, first_log)
    try:
        _until(lambda: admin.rounds() and admin.rounds()[0].updates == 1, "alpha's round-1 update")
    finally:
        first.kill()
        first.wait(20)
    second = _agent(aggregator, tmp_path, second_log)
    try:
        _until(lambda: "resumed: round 1" in second_log.read_text(), "the restarted agent to resume")
        _until(lambda: any(e["version"] == 0 for e in admin.evaluations()), "alpha's evaluation of version 0")
        while (task := beta.task()).action != "done":
            if task.action == "train":
                zeros = {k: torch.zeros_like(v) for k, v in from_bytes(beta.adapter(task.version)).items()}
                beta.put_update(task.round, to_bytes(zeros), 10, 0.1)
            time.sleep(0.2)
        assert second.wait(120) == 0, second_log.read_text()[-3000:]
    finally:
        second.kill()
    text = second_log.read_text()
    assert "round 1:" not in text and "round 2:" in text, text[-3000:]  # round 1 was not retrained
    assert [(r.round, r.updates) for r in admin.rounds()] == [(1, 2), (2, 2)]
    assert admin.status().phase == "Succeeded"
