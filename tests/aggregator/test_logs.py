"""The aggregator's log, read from a real aggregator process: one logfmt line per event, refusals included."""

from __future__ import annotations

import re
import time

import httpx
import torch
from tests.aggregator.conftest import AggregatorProcess
from tests.conftest import job_document

from fedsilo.adapters import to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client, ClientError
from fedsilo.spec import parse_job

TOKENS = {"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}
STATE = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}


def _events(agg: AggregatorProcess, name: str, timeout: float = 10.0, count: int = 1) -> list[dict[str, str]]:
    """The `event=name` lines of the aggregator's log as dicts, waiting until `count` are there."""
    deadline = time.monotonic() + timeout
    while True:
        found = [dict((k, v.strip('"')) for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))
                 for line in agg.log.read_text().splitlines() if f"event={name} " in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_round_events_uploads_and_refusals_are_one_line_each(aggregator: AggregatorProcess) -> None:
    admin = Client(aggregator.url, "demo", aggregator.admin, retries=0)
    admin.create_job(parse_job(job_document(training={"rounds": 1, "localSteps": 1, "batchSize": 4})), TOKENS)
    alpha, beta = (Client(aggregator.url, "demo", TOKENS[n], n, retries=0) for n in ("alpha", "beta"))
    for silo in (alpha, beta):
        silo.join(m.JoinRequest(n_train_examples=100, n_eval_examples=10))
    alpha.put_initial(to_bytes(STATE))
    wrong_shape = {**STATE, "m.lora_A.weight": torch.ones(3, 3)}
    try:
        beta.put_update(1, to_bytes(wrong_shape), n_examples=10, train_seconds=0.5)
        raise AssertionError("a wrong shape was accepted")
    except ClientError as exc:
        assert exc.status == 422
    assert httpx.get(f"{aggregator.url}/v1/jobs/demo", headers={"Authorization": "Bearer nope"}).status_code == 401
    for silo in (alpha, beta):
        silo.put_update(1, to_bytes({k: torch.zeros_like(v) for k, v in STATE.items()}), n_examples=10,
                        train_seconds=0.5)

    uploads = _events(aggregator, "upload", count=2)
    assert {(e["silo"], e["round"], e["outcome"]) for e in uploads} == {("alpha", "1", "accepted"),
                                                                       ("beta", "1", "accepted")}
    refused = {e["status"]: e for e in _events(aggregator, "refused", count=2)}
    assert refused["422"]["reason"] == "wrong_shape" and refused["422"]["silo"] == "beta"
    assert refused["422"]["level"] == "warning" and "expected" in refused["422"]["detail"]
    assert refused["401"]["path"] == "/v1/jobs/demo" and refused["401"]["reason"] == "unauthorized"
    closed = _events(aggregator, "round_closed", timeout=15)
    assert closed and closed[0]["round"] == "1" and closed[0]["updates"] == "2" and closed[0]["examples"] == "20"
    assert _events(aggregator, "round_opened")[0]["participants"] == "alpha,beta"
    assert any(e["phase"] == "Succeeded" for e in _events(aggregator, "job_phase", timeout=15, count=2))
    assert all(line.startswith("ts=") for line in aggregator.log.read_text().splitlines())
