"""Who may do what, over real HTTP against a real aggregator process.

The authorization matrix: every endpoint x every kind of caller -> the expected answer,
and after every refusal the store (every table but the leases) and the blob folder are
exactly as before. Then the identity lifecycle (rotation with a grace period, expiry,
revocation) and the least-privilege rules (initial adapter, test metrics, declared
example counts, a silo's slice of the job).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, inspect, select, text
from tests.aggregator.conftest import AggregatorProcess
from tests.aggregator.test_reliability import process, v0
from tests.conftest import job_document

from fedsilo.adapters import sha256, to_bytes
from fedsilo.aggregator.store import LeaseRow, aware
from fedsilo.local.runner import free_port

TOKENS = {
    "alpha": "alpha-token-0123456789",  # trainer
    "beta": "beta-token-0123456789",  # trainer
    "gamma": "gamma-token-0123456789",  # evaluator
    "delta": "delta-token-0123456789",  # evaluator that never joins: the subject of token rotation
}
OTHER_JOB_ALPHA = "other-alpha-token-0123456789"
METRICS_TOKEN = "metrics-reader-token-0123456789"
ADMIN = "admin-token-0123456789"
TICK = 0.1  # the hub's tick (seconds): work a request leaves to the ticker is written soon
SETTLE = timedelta(seconds=1.5)  # > TICK + two ticks' work (`settle`)
SILO_ROLES = {"alpha": "trainer", "beta": "trainer", "gamma": "evaluator", "delta": "evaluator"}


def demo_document(name: str = "demo", **overrides: Any) -> dict[str, Any]:
    doc = job_document(
        training={"rounds": 2, "localSteps": 1},
        aggregation={"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 600},
        silos=[
            {"name": s, "role": role, "organisation": f"{s} hospital", "data": {"path": f"/secret/{s}.csv"}}
            for s, role in SILO_ROLES.items()
        ],
        **overrides,
    )
    doc["metadata"] = {"name": name, "labels": {"team": "private"}}
    return doc


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Caller:
    """Credentials and the silo named in the URL (and in X-Fedsilo-Silo for reads)."""

    headers: dict[str, Any]
    silo: str = "alpha"


CALLERS = {
    "none": Caller({}),
    "malformed": Caller({"Authorization": "Token alpha-token-0123456789"}),
    "non_ascii": Caller({"Authorization": "Bearer ålpha-tøken-0123456789".encode()}),
    "wrong": Caller(bearer("not-a-token-of-anybody-0123")),
    "other_silo": Caller(bearer(TOKENS["beta"])),
    "other_job": Caller(bearer(OTHER_JOB_ALPHA)),
    "metrics": Caller(bearer(METRICS_TOKEN)),
    "admin": Caller(bearer(ADMIN)),
    "trainer": Caller(bearer(TOKENS["alpha"])),
    "evaluator": Caller(bearer(TOKENS["gamma"]), silo="gamma"),
}
TRAINED = {k: v + 1.0 for k, v in v0().items()}


def requests_for(c: Caller) -> dict[str, dict[str, Any]]:
    """Each endpoint's request as `c` makes it (the admin and metrics reader name alpha's URL)."""
    job, silo = "/v1/jobs/demo", f"/v1/jobs/demo/silos/{c.silo}"
    update = to_bytes({k: v * 0 + 0.5 for k, v in v0().items()})
    upload = {**c.headers, "X-Fedsilo-Examples": "5", "X-Fedsilo-Sha256": sha256(update)}
    secagg = f"/v1/jobs/demo/rounds/1/secagg/{c.silo}"
    return {
        "create_job": {"method": "POST", "url": "/v1/jobs", "json": {"job": demo_document("third")}},
        "patch_job": {"method": "PATCH", "url": job, "json": {"rounds": 2}},
        "rotate_token": {
            "method": "POST",
            "url": "/v1/jobs/demo/silos/delta/token",
            "json": {"token": "delta-rotated-token-0123456789", "grace_seconds": 60},
        },
        "revoke_token": {"method": "DELETE", "url": "/v1/jobs/demo/silos/delta/token"},
        "openapi": {"method": "GET", "url": "/openapi.json"},
        "metrics": {"method": "GET", "url": "/metrics"},
        "status": {"method": "GET", "url": job},
        "spec": {"method": "GET", "url": f"{job}/spec"},
        "rounds": {"method": "GET", "url": f"{job}/rounds"},
        "evaluations": {"method": "GET", "url": f"{job}/evaluations"},
        "adapter": {"method": "GET", "url": f"{job}/adapters/0"},
        "join": {"method": "POST", "url": f"{silo}/join", "json": {"n_train_examples": 10, "n_eval_examples": 4}},
        "task": {"method": "GET", "url": f"{silo}/task"},
        "report_test": {
            "method": "POST",
            "url": f"{silo}/metrics",
            "json": {"version": 0, "split": "test", "loss": 0.5, "accuracy": 0.5, "n_examples": 4},
        },
        "initial": {"method": "PUT", "url": f"{silo}/adapters/0", "content": to_bytes(v0())},
        "update": {
            "method": "PUT",
            "url": f"/v1/jobs/demo/rounds/1/updates/{c.silo}",
            "content": update,
            "headers": upload,
        },
        "secagg_view": {"method": "GET", "url": secagg},
        "secagg_keys": {
            "method": "PUT",
            "url": f"{secagg}/keys",
            "json": {"c_pk": "AA==", "s_pk": "AA==", "b_commit": "00"},
        },
        "secagg_shares": {"method": "PUT", "url": f"{secagg}/shares", "json": {"ciphertexts": {}}},
        "secagg_reveal": {"method": "PUT", "url": f"{secagg}/reveal", "json": {"shares": {}}},
    }


ADMIN_ONLY = {"create_job", "patch_job", "rotate_token", "revoke_token", "openapi"}
READS = {"status", "spec", "rounds", "evaluations", "adapter"}
SILO_ROUTES = {
    "join",
    "task",
    "report_test",
    "initial",
    "update",
    "secagg_view",
    "secagg_keys",
    "secagg_shares",
    "secagg_reveal",
}
# what the silo's own role may not do: 403, whatever the job's state
ROLE_REFUSED = {("trainer", "report_test"), ("evaluator", "initial"), ("evaluator", "update")}


def expected(endpoint: str, caller: str) -> int | None:
    """The refusal `caller` gets at `endpoint`, or None when it is let through."""
    if endpoint in ADMIN_ONLY:
        return None if caller == "admin" else 401
    if endpoint == "metrics":
        return None if caller in ("admin", "metrics") else 401
    allowed = {"admin", "trainer", "evaluator"} if endpoint in READS else {"trainer", "evaluator"}
    if caller not in allowed:
        return 401
    return 403 if (caller, endpoint) in ROLE_REFUSED else None


def snapshot(database: str, blobs: Path) -> tuple[dict[str, list[tuple[Any, ...]]], list[str]]:
    """Every row and blob, but the silos' `last_seen`: the ticker writes it every 15 s from polls
    that were let through (`test_poll_reads` holds that a refused poll is never remembered)."""
    engine = create_engine(database)
    schema = inspect(engine)
    tables = [t for t in schema.get_table_names() if t not in ("leases", "alembic_version")]
    rows = {}
    with engine.connect() as conn:
        for t in tables:
            columns = [c["name"] for c in schema.get_columns(t) if (t, c["name"]) != ("silos", "last_seen")]
            query = text(f"SELECT {', '.join(columns)} FROM {t}")
            rows[t] = sorted(map(tuple, conn.execute(query)), key=repr)
    engine.dispose()
    return rows, sorted(str(p) for p in blobs.rglob("*"))


def settle(database: str, since: datetime) -> None:
    """Wait until what a request let through at `since` left to the ticker is written: the poll's
    state change goes out in the next tick's batch, a round may close on an upload in the tick.
    Every tick renews the job's lease; one renewed `SETTLE` after `since` comes from a tick that
    started after the tick that wrote them had finished (each tick waits `TICK` first)."""
    engine = create_engine(database)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                renewed = conn.execute(select(LeaseRow.renewed_at).where(LeaseRow.job == "demo")).scalar_one()
            if aware(renewed) >= since + SETTLE:  # type: ignore[operator]
                return
            time.sleep(TICK)
    finally:
        engine.dispose()
    raise AssertionError("the aggregator's ticker did not renew the job's lease for a minute")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[AggregatorProcess]:
    agg = process(
        tmp_path,
        f"sqlite:///{tmp_path / 'fedsilo.db'}",
        "authz",
        FEDSILO_METRICS_TOKEN=METRICS_TOKEN,
        FEDSILO_TICK_SECONDS=str(TICK),
    )
    agg.admin = ADMIN
    agg.start()
    yield agg
    agg.stop()


def send(agg: AggregatorProcess, request: dict[str, Any]) -> httpx.Response:
    method, url = request["method"], f"{agg.url}{request['url']}"
    kwargs = {k: v for k, v in request.items() if k in ("json", "content", "headers")}
    return httpx.request(method, url, timeout=30, **kwargs)


def create(agg: AggregatorProcess, job: dict[str, Any], tokens: dict[str, str]) -> httpx.Response:
    """The admin creates a job with these silo tokens."""
    return send(
        agg,
        {"method": "POST", "url": "/v1/jobs", "headers": bearer(ADMIN), "json": {"job": job, "silo_tokens": tokens}},
    )


def rotate(agg: AggregatorProcess, body: dict[str, Any], silo: str = "beta") -> httpx.Response:
    """The admin rotates `silo`'s token."""
    return send(
        agg, {"method": "POST", "url": f"/v1/jobs/demo/silos/{silo}/token", "headers": bearer(ADMIN), "json": body}
    )


def start_demo(agg: AggregatorProcess) -> None:
    """Job demo running round 1 (alpha, beta joined, alpha sent v0; gamma joined) and a second job."""
    assert create(agg, demo_document(), TOKENS).status_code == 201
    other = job_document(silos=[{"name": "alpha", "data": {"path": "a.csv"}}], aggregation={"minSilos": 1})
    other["metadata"]["name"] = "other"
    assert create(agg, other, {"alpha": OTHER_JOB_ALPHA}).status_code == 201
    for silo in ("alpha", "beta", "gamma"):
        body = {"n_train_examples": 10 if SILO_ROLES[silo] == "trainer" else 0, "n_eval_examples": 4}
        r = send(
            agg,
            {
                "method": "POST",
                "url": f"/v1/jobs/demo/silos/{silo}/join",
                "headers": bearer(TOKENS[silo]),
                "json": body,
            },
        )
        assert r.status_code == 200, r.text
    r = send(
        agg,
        {
            "method": "PUT",
            "url": "/v1/jobs/demo/silos/alpha/adapters/0",
            "headers": bearer(TOKENS["alpha"]),
            "content": to_bytes(v0()),
        },
    )
    assert r.status_code == 200, r.text
    status = send(agg, {"method": "GET", "url": "/v1/jobs/demo", "headers": bearer(ADMIN)}).json()
    assert (status["phase"], status["round"]) == ("Running", 1)


def test_authorization_matrix_and_nothing_changes_on_refusal(hub: AggregatorProcess, tmp_path: Path) -> None:
    start_demo(hub)
    database, blobs = f"sqlite:///{tmp_path / 'fedsilo.db'}", tmp_path / "checkpoints"
    wrong: list[str] = []
    let_through: datetime | None = datetime.now(UTC)  # when a request that may leave work to the ticker was answered
    for caller_name, caller in CALLERS.items():
        for endpoint, request in requests_for(caller).items():
            headers = request.get("headers") or caller.headers
            if endpoint in READS:
                headers = {**headers, "X-Fedsilo-Silo": caller.silo}
            request = {**request, "headers": headers}
            refusal = expected(endpoint, caller_name)
            if refusal is not None and let_through is not None:
                settle(database, let_through)
                let_through = None
            before = snapshot(database, blobs)
            answer = send(hub, request)
            if refusal is None:
                ok = answer.status_code not in (401, 403) and answer.status_code < 500
                if request["method"] != "GET" or endpoint == "task":  # a poll's state change is the tick's
                    let_through = datetime.now(UTC)
            else:
                ok = answer.status_code == refusal and snapshot(database, blobs) == before
                ok = ok and set(answer.json()) == {"detail", "reason"}
            if not ok:
                wrong.append(f"{caller_name} {endpoint}: {answer.status_code} {answer.text[:120]}")
    assert not wrong, "\n".join(wrong)
    assert send(hub, {"method": "GET", "url": "/docs"}).status_code == 404  # no public API browser


def test_rotation_keeps_the_old_token_for_the_grace_period_then_refuses_it(hub: AggregatorProcess) -> None:
    start_demo(hub)
    task = {"method": "GET", "url": "/v1/jobs/demo/silos/beta/task"}
    rotated = rotate(hub, {"grace_seconds": 2})
    assert rotated.status_code == 200 and rotated.json()["rotated"]
    new = rotated.json()["token"]
    assert len(new) >= 32 and new != TOKENS["beta"]
    assert send(hub, {**task, "headers": bearer(TOKENS["beta"])}).status_code == 200  # in grace
    assert send(hub, {**task, "headers": bearer(new)}).status_code == 200
    time.sleep(2.2)
    old = send(hub, {**task, "headers": bearer(TOKENS["beta"])})
    assert old.status_code == 401
    assert send(hub, {**task, "headers": bearer(new)}).status_code == 200
    # a named rotation is retry-safe: the same call again changes nothing
    named = {"token": "beta-second-token-0123456789", "grace_seconds": 60}
    first, again = rotate(hub, named).json(), rotate(hub, named).json()
    assert first["rotated"] and not again["rotated"]
    assert first["previous_valid_until"] == again["previous_valid_until"]
    assert send(hub, {**task, "headers": bearer(new)}).status_code == 200  # the previous one, in grace


def test_expiry_and_revocation(hub: AggregatorProcess) -> None:
    start_demo(hub)
    task = {"method": "GET", "url": "/v1/jobs/demo/silos/beta/task"}
    expiring = rotate(hub, {"grace_seconds": 0, "expires_in_seconds": 1.5}).json()
    assert send(hub, {**task, "headers": bearer(TOKENS["beta"])}).status_code == 401  # no grace asked
    assert send(hub, {**task, "headers": bearer(expiring["token"])}).status_code == 200
    time.sleep(1.7)
    expired = send(hub, {**task, "headers": bearer(expiring["token"])})
    assert (expired.status_code, expired.json()["reason"]) == (401, "expired")

    fresh = rotate(hub, {"grace_seconds": 600}).json()["token"]
    assert send(hub, {**task, "headers": bearer(fresh)}).status_code == 200
    assert (
        send(hub, {"method": "DELETE", "url": "/v1/jobs/demo/silos/beta/token", "headers": bearer(ADMIN)}).status_code
        == 204
    )
    refused = send(hub, {**task, "headers": bearer(fresh)})
    assert (refused.status_code, refused.json()["reason"]) == (401, "revoked")
    assert send(hub, {**task, "headers": bearer(expiring["token"])}).status_code == 401  # its grace ended too
    after = rotate(hub, {"grace_seconds": 600}).json()
    assert after["previous_valid_until"] is None  # a revoked token gets no grace
    assert send(hub, {**task, "headers": bearer(after["token"])}).status_code == 200
    assert send(hub, {**task, "headers": bearer(fresh)}).status_code == 401


def test_least_privilege_rules(hub: AggregatorProcess) -> None:
    start_demo(hub)
    alpha, beta, gamma = (bearer(TOKENS[s]) for s in ("alpha", "beta", "gamma"))

    # the initial adapter: the same one again is a no-op, a different one a 409
    same = send(
        hub, {"method": "PUT", "url": "/v1/jobs/demo/silos/beta/adapters/0", "headers": beta, "content": to_bytes(v0())}
    )
    assert same.status_code == 200
    other = send(
        hub,
        {"method": "PUT", "url": "/v1/jobs/demo/silos/beta/adapters/0", "headers": beta, "content": to_bytes(TRAINED)},
    )
    assert (other.status_code, other.json()["reason"]) == (409, "initial_exists")

    # example counts: capped by the declaration at the first join, which cannot grow
    data = to_bytes(TRAINED)
    upload = {"method": "PUT", "url": "/v1/jobs/demo/rounds/1/updates/alpha", "content": data}
    big = send(hub, {**upload, "headers": {**alpha, "X-Fedsilo-Examples": "11", "X-Fedsilo-Sha256": sha256(data)}})
    assert (big.status_code, big.json()["reason"]) == (422, "examples_exceed_declared")
    rejoin = send(
        hub,
        {
            "method": "POST",
            "url": "/v1/jobs/demo/silos/alpha/join",
            "headers": alpha,
            "json": {"n_train_examples": 1_000_000, "n_eval_examples": 4},
        },
    )
    assert (rejoin.status_code, rejoin.json()["reason"]) == (409, "declared_examples")
    ok = send(hub, {**upload, "headers": {**alpha, "X-Fedsilo-Examples": "10", "X-Fedsilo-Sha256": sha256(data)}})
    assert ok.status_code == 200
    status = send(hub, {"method": "GET", "url": "/v1/jobs/demo", "headers": bearer(ADMIN)}).json()
    declared = {s["name"]: (s["train_examples"], s["eval_examples"]) for s in status["silos"]}
    assert declared == {"alpha": (10, 4), "beta": (10, 4), "gamma": (0, 4), "delta": (0, 0)}

    # metrics: test split only from evaluators, no more examples than declared
    report = {"version": 0, "split": "test", "loss": 0.1, "accuracy": 1.0, "n_examples": 4}
    url = "/v1/jobs/demo/silos/{}/metrics"
    assert (
        send(hub, {"method": "POST", "url": url.format("alpha"), "headers": alpha, "json": report}).status_code == 403
    )
    too_many = send(
        hub, {"method": "POST", "url": url.format("gamma"), "headers": gamma, "json": {**report, "n_examples": 5}}
    )
    assert (too_many.status_code, too_many.json()["reason"]) == (422, "examples_exceed_declared")
    assert (
        send(hub, {"method": "POST", "url": url.format("gamma"), "headers": gamma, "json": report}).status_code == 204
    )
    validation = {**report, "split": "validation"}
    assert (
        send(hub, {"method": "POST", "url": url.format("gamma"), "headers": gamma, "json": validation}).status_code
        == 403
    )
    assert (
        send(hub, {"method": "POST", "url": url.format("alpha"), "headers": alpha, "json": validation}).status_code
        == 204
    )

    # a silo reads only its own slice of the job
    read = {**alpha, "X-Fedsilo-Silo": "alpha"}
    spec = send(hub, {"method": "GET", "url": "/v1/jobs/demo/spec", "headers": read}).json()
    assert spec["metadata"] == {"name": "demo", "labels": {}, "annotations": {}}
    by_name = {s["name"]: s for s in spec["spec"]["silos"]}
    assert by_name["alpha"]["data"]["path"] == "/secret/alpha.csv" and by_name["alpha"]["organisation"]
    assert by_name["beta"]["data"]["path"] == "redacted" and not by_name["beta"].get("organisation")
    assert "/secret/beta.csv" not in str(spec) and "beta hospital" not in str(spec)
    mine = send(hub, {"method": "GET", "url": "/v1/jobs/demo", "headers": read}).json()
    assert [s["name"] for s in mine["silos"]] == ["alpha"]
    rounds = send(hub, {"method": "GET", "url": "/v1/jobs/demo/rounds", "headers": read}).json()
    assert rounds[0]["participants"] == ["alpha"]
    full = send(hub, {"method": "GET", "url": "/v1/jobs/demo/spec", "headers": bearer(ADMIN)}).json()
    assert full["metadata"]["labels"] == {"team": "private"} and "/secret/beta.csv" in str(full)


def test_a_trainer_of_a_smaller_rank_cannot_send_the_initial_adapter(tmp_path: Path) -> None:
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'fedsilo.db'}", "rank")
    agg.admin = ADMIN
    agg.start()
    try:
        doc = job_document(
            silos=[{"name": "alpha", "data": {"path": "a.csv"}}, {"name": "beta", "rank": 2, "data": {"path": "b.csv"}}]
        )
        tokens = {"alpha": TOKENS["alpha"], "beta": TOKENS["beta"]}
        assert create(agg, doc, tokens).status_code == 201
        refused = send(
            agg,
            {
                "method": "PUT",
                "url": "/v1/jobs/demo/silos/beta/adapters/0",
                "headers": bearer(TOKENS["beta"]),
                "content": to_bytes(v0()),
            },
        )
        assert (refused.status_code, refused.json()["reason"]) == (403, "not_allowed")
    finally:
        agg.stop()


def test_metrics_need_a_token_and_per_silo_series_can_be_switched_off(tmp_path: Path) -> None:
    metrics_port = free_port()  # Prometheus' separate door: no token, the network policy guards it
    agg = process(
        tmp_path,
        f"sqlite:///{tmp_path / 'fedsilo.db'}",
        "quiet",
        FEDSILO_PER_SILO_METRICS="false",
        FEDSILO_METRICS_TOKEN=METRICS_TOKEN,
        FEDSILO_METRICS_PORT=str(metrics_port),
    )
    agg.admin = ADMIN
    agg.start()
    try:
        start_demo(agg)
        data = to_bytes(TRAINED)
        for silo in ("alpha", "beta"):
            r = send(
                agg,
                {
                    "method": "PUT",
                    "url": f"/v1/jobs/demo/rounds/1/updates/{silo}",
                    "content": data,
                    "headers": {**bearer(TOKENS[silo]), "X-Fedsilo-Examples": "10", "X-Fedsilo-Sha256": sha256(data)},
                },
            )
            assert r.status_code == 200, r.text
        assert send(agg, {"method": "GET", "url": "/metrics"}).status_code == 401
        text_ = send(agg, {"method": "GET", "url": "/metrics", "headers": bearer(METRICS_TOKEN)}).text
        assert 'fedsilo_updates_accepted_total{job="demo"} 2.0' in text_
        assert "fedsilo_silo_examples{" not in text_ and "fedsilo_silo_train_seconds{" not in text_
        separate = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert separate.status_code == 200 and 'fedsilo_updates_accepted_total{job="demo"} 2.0' in separate.text
    finally:
        agg.stop()


def test_an_agent_picks_up_its_rotated_token_from_the_mounted_file(hub: AggregatorProcess, tmp_path: Path) -> None:
    """The operator rewrites the silo's Secret (a file in the pod); the agent's next 401 makes it re-read it."""
    from fedsilo.api.client import Client
    from fedsilo.silo_agent.settings import SiloSettings

    start_demo(hub)
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["beta"] + "\n")
    settings = SiloSettings(aggregator_url=hub.url, job="demo", silo="beta", token_file=token_file)
    client = Client(hub.url, "demo", settings.read_token(), "beta", retries=0, token_source=settings.read_token)
    assert client.task().action == "train"
    rotated = rotate(hub, {"grace_seconds": 0}).json()["token"]
    token_file.write_text(rotated)  # what kubelet does when the Secret changes
    assert client.task().action == "train"  # one 401, then the same request with the new token
    assert client.http.headers["Authorization"] == f"Bearer {rotated}"
