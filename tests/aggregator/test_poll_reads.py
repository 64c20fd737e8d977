"""What one task poll costs the store: a silo with nothing to do is answered from one SELECT,
and no poll writes before it is answered (the state its answer implies is batched).

In-process (the app under Starlette's test client, SQLite): the statements the poll's read sends
from the test's thread are counted on the SQLAlchemy engine itself. A thousand idle silos poll
every 30 s, so each statement per poll is a thousand per period; `benchmarks/polling.py`
measures the CPU.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import event
from tests.conftest import job_document

from fedsilo.adapters import sha256, to_bytes
from fedsilo.aggregator.app import create_app
from fedsilo.aggregator.settings import AggregatorSettings

ADMIN = "admin-token-0123456789"
TOKENS = {s: f"{s}-token-0123456789" for s in ("alpha", "beta", "gamma")}


def headers(silo: str, token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or TOKENS[silo]}", "X-Fedsilo-Silo": silo}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, list[str]]]:
    """Round 1 open with one of three joined silos sampled; yields the client and the SQL it sends."""
    for key, value in {
        "FEDSILO_ADMIN_TOKEN": ADMIN,
        "FEDSILO_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "FEDSILO_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "FEDSILO_INSECURE_HTTP": "true",
        "FEDSILO_TICK_SECONDS": "0.05",
    }.items():
        monkeypatch.setenv(key, value)
    app = create_app(AggregatorSettings())
    doc = job_document(
        silos=[{"name": s, "data": {"path": f"{s}.csv"}} for s in TOKENS],
        aggregation={"strategy": "fedavg", "minSilos": 1, "fraction": 0.3, "roundTimeoutSeconds": 600},
    )
    statements: list[str] = []  # sent by this test's thread (the ticker's own reads and writes run in others)
    me = threading.get_ident()

    def record(*args: Any) -> None:
        if threading.get_ident() == me:
            statements.append(args[2])

    event.listen(app.state.engine.sessions.kw["bind"], "before_cursor_execute", record)
    with TestClient(app) as http:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert http.post("/v1/jobs", json={"job": doc, "silo_tokens": TOKENS}, headers=admin).is_success
        for silo in TOKENS:
            body = {"n_train_examples": 10, "n_eval_examples": 0}
            assert http.post(f"/v1/jobs/demo/silos/{silo}/join", json=body, headers=headers(silo)).is_success
        adapter = to_bytes({"m.lora_A.weight": torch.zeros(4, 6), "classifier.weight": torch.zeros(2, 6)})
        assert http.put("/v1/jobs/demo/silos/alpha/adapters/0", content=adapter, headers=headers("alpha")).is_success
        yield http, statements


def task(http: TestClient, silo: str, token: str | None = None) -> Any:
    return http.get(f"/v1/jobs/demo/silos/{silo}/task", headers=headers(silo, token))


def until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def silo_states(http: TestClient) -> dict[str, str]:
    status = http.get("/v1/jobs/demo", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    return {s["name"]: s["state"] for s in status["silos"]}


def until_train(http: TestClient) -> str:
    """The silo round 1 sampled, once the ticker opened it (shortly after the initial adapter)."""
    until(lambda: http.get("/v1/jobs/demo/rounds", headers={"Authorization": f"Bearer {ADMIN}"}).json() != [],
          "round 1 to open")
    answers = {s: task(http, s).json() for s in TOKENS}
    (participant,) = [s for s, a in answers.items() if a["action"] == "train"]
    assert all(a["action"] == "wait" and a["round"] == 1 for s, a in answers.items() if s != participant)
    return participant


def test_an_idle_poll_is_one_select_and_the_participant_still_trains(hub: tuple[TestClient, list[str]]) -> None:
    http, statements = hub
    participant = until_train(http)
    idle = next(s for s in TOKENS if s != participant)

    engine = http.app.state.engine  # type: ignore[attr-defined]
    # the route's read, called in this thread (the route adds no statement: `deps.silo_token`)
    del statements[:]
    assert engine.task("demo", idle, TOKENS[idle]).action == "wait"
    assert len(statements) == 1 and statements[0].lstrip().upper().startswith("SELECT"), statements

    # the participant: the same statement, then whether its update is in (a second read); the
    # state its answer implies (`training`) is written in the next tick's batch, not before the answer
    del statements[:]
    assert engine.task("demo", participant, TOKENS[participant]).action == "train"
    assert len(statements) == 2 and all(q.lstrip().upper().startswith("SELECT") for q in statements), statements
    until(lambda: silo_states(http)[participant] == "training", "the batched state write")


def test_a_state_written_since_the_poll_wins_over_the_batch(hub: tuple[TestClient, list[str]]) -> None:
    """The poll that hands out `train` leaves `training` to the batch; the upload that follows
    before the batch runs writes `uploaded`, and the batch, written from the state the poll
    read, does not turn it back."""
    http, _ = hub
    engine = http.app.state.engine  # type: ignore[attr-defined]
    writes = engine.write_polls
    engine.write_polls = lambda force=False: None  # the ticker's batch waits until this test runs it
    participant = until_train(http)
    data = to_bytes({"m.lora_A.weight": torch.ones(4, 6), "classifier.weight": torch.ones(2, 6)})
    up = {**headers(participant), "X-Fedsilo-Examples": "10", "X-Fedsilo-Sha256": sha256(data)}
    assert http.put(f"/v1/jobs/demo/rounds/1/updates/{participant}", content=data, headers=up).is_success
    writes(force=True)
    assert silo_states(http)[participant] != "training"


def test_the_one_select_refuses_as_the_three_reads_did(hub: tuple[TestClient, list[str]]) -> None:
    http, _ = hub
    engine = http.app.state.engine  # type: ignore[attr-defined]
    engine.write_polls = lambda force=False: None  # what polls left stays in memory to be compared
    remembered = copy.deepcopy((engine._seen, engine._moves))
    wrong = task(http, "beta", "not-the-token-of-beta")
    assert (wrong.status_code, wrong.json()["reason"]) == (401, "unauthorized")
    assert task(http, "beta", TOKENS["alpha"]).status_code == 401  # another silo's token
    unknown = http.get("/v1/jobs/demo/silos/delta/task", headers=headers("delta", TOKENS["alpha"]))
    assert unknown.status_code == 401
    no_job = http.get("/v1/jobs/nope/silos/beta/task", headers=headers("beta"))
    assert (no_job.status_code, no_job.json()["reason"]) == (404, "not_found")
    assert (engine._seen, engine._moves) == remembered  # a refused poll leaves nothing to write
