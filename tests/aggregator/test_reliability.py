"""Reliability over real HTTP against real aggregator processes: fencing, deadlines that
are fair, resume, spec changes reaching the engine, async buffers, long polls and uploads
racing a deadline. Scripted silos send small random tensors; expected adapters are
computed here from what was accepted.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from tests.aggregator.conftest import AggregatorProcess, postgres_database
from tests.conftest import job_document

from fedsilo.adapters import from_bytes, sha256, to_bytes
from fedsilo.local.runner import free_port

State = dict[str, torch.Tensor]


def v0() -> State:
    g = torch.Generator().manual_seed(3)
    return {"m.lora_A.weight": torch.randn(4, 6, generator=g), "classifier.weight": torch.randn(2, 6, generator=g)}


def delta(seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in v0().items()}


def combine(base: State, parts: list[tuple[State, float]]) -> State:
    """base + weighted mean of the parts, the way the aggregator computes it (float64 sum)."""
    total = sum(w for _, w in parts)
    return {k: (v.float() + (sum(d[k].double() * w for d, w in parts) / total).float()) for k, v in base.items()}


class Hub:
    """Admin and silo calls over raw HTTP (no client-side retries hide what happens)."""

    def __init__(self, url: str, admin: str, tokens: dict[str, str]) -> None:
        self.url, self.admin, self.tokens = url, admin, tokens

    def _silo(self, silo: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[silo]}", "X-Fedsilo-Silo": silo}

    def create(self, doc: dict[str, Any]) -> httpx.Response:
        body = {"job": doc, "silo_tokens": self.tokens}
        return httpx.post(f"{self.url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {self.admin}"})

    def patch(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.patch(f"{self.url}/v1/jobs/demo", json=body, headers={"Authorization": f"Bearer {self.admin}"})

    def status(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/jobs/demo", headers={"Authorization": f"Bearer {self.admin}"})
        r.raise_for_status()
        return dict(r.json())

    def rounds(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/v1/jobs/demo/rounds", headers={"Authorization": f"Bearer {self.admin}"})
        return list(r.json())

    def join(self, silo: str) -> httpx.Response:
        body = {"n_train_examples": 1000, "n_eval_examples": 100}
        return httpx.post(f"{self.url}/v1/jobs/demo/silos/{silo}/join", json=body, headers=self._silo(silo))

    def task(self, silo: str, wait: float = 0) -> httpx.Response:
        params = {"wait": str(wait)} if wait else None
        return httpx.get(
            f"{self.url}/v1/jobs/demo/silos/{silo}/task", params=params, headers=self._silo(silo), timeout=60
        )

    def init(self, silo: str) -> httpx.Response:
        return httpx.put(
            f"{self.url}/v1/jobs/demo/silos/{silo}/adapters/0", content=to_bytes(v0()), headers=self._silo(silo)
        )

    def upload(self, silo: str, round_: int, state: State, examples: int) -> httpx.Response:
        data = to_bytes(state)
        headers = {**self._silo(silo), "X-Fedsilo-Examples": str(examples), "X-Fedsilo-Sha256": sha256(data)}
        return httpx.put(f"{self.url}/v1/jobs/demo/rounds/{round_}/updates/{silo}", content=data, headers=headers)

    def adapter(self, version: int) -> State:
        r = httpx.get(f"{self.url}/v1/jobs/demo/adapters/{version}", headers={"Authorization": f"Bearer {self.admin}"})
        r.raise_for_status()
        return from_bytes(r.content)

    def wait_for(self, what: str, check: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not check(status := self.status()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {status}"
            time.sleep(0.05)
        return status


def tokens_for(*silos: str) -> dict[str, str]:
    return {s: f"{s}-token-{secrets.token_hex(8)}" for s in silos}


def document(silos: list[str], **aggregation: Any) -> dict[str, Any]:
    return job_document(
        training={"rounds": 3, "localSteps": 1},
        aggregation={"strategy": "fedavg", "minSilos": 1, "roundTimeoutSeconds": 600, **aggregation},
        silos=[{"name": s, "data": {"path": f"{s}.csv"}} for s in silos],
    )


def process(tmp_path: Path, database_url: str, name: str, **env: str) -> AggregatorProcess:
    return AggregatorProcess(
        f"http://127.0.0.1:{free_port()}",
        "admin-token-0123456789",
        database_url,
        tmp_path / "checkpoints",
        tmp_path / f"{name}.log",
        env=env,
    )


def started(hub: Hub, doc: dict[str, Any]) -> None:
    assert hub.create(doc).status_code == 201
    for silo in hub.tokens:
        assert hub.join(silo).status_code == 200
    assert hub.init(next(iter(hub.tokens))).status_code == 200
    hub.wait_for("round 1", lambda s: s["phase"] == "Running")


def test_second_aggregator_on_the_same_postgres_is_fenced(tmp_path: Path) -> None:
    url = postgres_database()
    first = process(tmp_path, url, "first", FEDSILO_LEASE_SECONDS="2")
    first.start()
    second = process(tmp_path, url, "second", FEDSILO_LEASE_SECONDS="2")
    second.start()
    try:
        hub1 = Hub(first.url, first.admin, tokens_for("alpha", "beta"))
        hub2 = Hub(second.url, second.admin, hub1.tokens)
        started(hub1, document(["alpha", "beta"], minSilos=2))
        fenced = hub2.upload("alpha", 1, delta(1), 10)
        assert fenced.status_code == 503 and fenced.json()["reason"] == "fenced", fenced.text
        assert fenced.headers["retry-after"]
        assert hub2.status()["round"] == 1  # reads are served by any aggregator
        assert hub1.upload("alpha", 1, delta(1), 10).status_code == 200

        first.kill()  # SIGKILL: its lease expires after 2 s, then the second takes over
        deadline = time.monotonic() + 20
        while (r := hub2.upload("beta", 1, delta(2), 30)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        hub2.wait_for("version 1", lambda s: s["version"] >= 1)
        assert torch.equal(
            hub2.adapter(1)["classifier.weight"], combine(v0(), [(delta(1), 10), (delta(2), 30)])["classifier.weight"]
        )
        assert "lease taken" in second.log.read_text()

        first.start()  # the old one comes back: now it is the one fenced
        late = hub1.upload("alpha", 2, delta(3), 10)
        assert late.status_code == 503 and late.json()["reason"] == "fenced"
    finally:
        first.stop()
        second.stop()


def test_job_file_aggregator_waits_for_the_lease(tmp_path: Path) -> None:
    """Two replicas started from one job file on one database: one serves, the other waits unready."""
    url = postgres_database()
    tokens = tokens_for("alpha", "beta")
    job_file, tokens_file = tmp_path / "job.yaml", tmp_path / "tokens.json"
    job_file.write_text(yaml.safe_dump(document(["alpha", "beta"])))
    tokens_file.write_text(__import__("json").dumps(tokens))
    env = {
        "FEDSILO_JOB_FILE": str(job_file),
        "FEDSILO_SILO_TOKENS_FILE": str(tokens_file),
        "FEDSILO_LEASE_SECONDS": "2",
    }
    first, second = process(tmp_path, url, "first", **env), process(tmp_path, url, "second", **env)
    first.start()
    second.start_waiting()
    try:
        time.sleep(1.5)
        assert httpx.get(f"{second.url}/readyz").status_code == 503
        assert "is served by aggregator" in second.log.read_text()
        first.stop()  # graceful: the lease is released at once
        deadline = time.monotonic() + 15
        while httpx.get(f"{second.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, second.log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        first.stop()
        second.stop()


def test_downtime_does_not_count_against_silos(tmp_path: Path) -> None:
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", "agg", FEDSILO_LEASE_SECONDS="0.5")
    agg.start()
    try:
        hub = Hub(agg.url, agg.admin, tokens_for("alpha", "beta"))
        started(hub, document(["alpha", "beta"], minSilos=2, roundTimeoutSeconds=3))
        assert hub.upload("alpha", 1, delta(1), 10).status_code == 200
        agg.kill()
        time.sleep(4)  # longer than the whole round timeout
        agg.start()
        time.sleep(0.6)
        status = hub.status()
        assert (status["phase"], status["round"]) == ("Running", 1), status
        assert "deadline moved" in agg.log.read_text()
        assert hub.upload("beta", 1, delta(2), 10).status_code == 200
        hub.wait_for("version 1", lambda s: s["version"] >= 1)
    finally:
        agg.stop()


def test_failed_job_resumes(tmp_path: Path) -> None:
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", "agg")
    agg.start()
    try:
        hub = Hub(agg.url, agg.admin, tokens_for("alpha", "beta"))
        started(hub, document(["alpha", "beta"], minSilos=2, roundTimeoutSeconds=1))
        assert hub.upload("alpha", 1, delta(1), 10).status_code == 200
        failed = hub.wait_for("Failed", lambda s: s["phase"] == "Failed")
        assert "resume" in failed["message"]
        assert hub.task("beta").json()["action"] == "wait"  # agents stay, ready for a resume
        assert hub.patch({"resume": True, "rounds": 1}).status_code == 200
        assert hub.status()["phase"] == "Running"
        assert hub.task("beta").json()["action"] == "train"
        assert hub.upload("beta", 1, delta(2), 30).status_code == 200
        hub.wait_for("Succeeded", lambda s: s["phase"] == "Succeeded")
        expected = combine(v0(), [(delta(1), 10), (delta(2), 30)])
        assert torch.equal(hub.adapter(1)["classifier.weight"], expected["classifier.weight"])
        again = hub.patch({"resume": True})
        assert again.status_code == 409 and again.json()["reason"] == "not_failed"
    finally:
        agg.stop()


def test_spec_changes_reach_the_engine(tmp_path: Path) -> None:
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", "agg")
    agg.start()
    try:
        hub = Hub(agg.url, agg.admin, tokens_for("alpha", "beta", "gamma"))
        doc = document(["alpha", "beta", "gamma"], minSilos=1)
        started(hub, doc)
        immutable = hub.patch({"job": {**doc, "spec": {**doc["spec"], "peft": {"method": "lora", "r": 4}}}})
        assert immutable.status_code == 422 and immutable.json()["reason"] == "immutable"
        assert "spec.peft" in immutable.json()["detail"]

        # remove gamma (revoked at once; round 1 stops waiting for it), add delta, switch to fedadam
        changed = document(["alpha", "beta", "delta"], minSilos=1, strategy="fedadam")
        no_token = hub.patch({"job": changed})
        assert no_token.status_code == 422 and "delta" in no_token.json()["detail"]
        hub.tokens["delta"] = "delta-token-0123456789abc"
        r = hub.patch({"job": changed, "silo_tokens": {"delta": hub.tokens["delta"]}})
        assert r.status_code == 200, r.text
        assert hub.join("gamma").status_code == 401 and hub.join("gamma").json()["reason"] == "revoked"
        assert hub.join("delta").status_code == 200
        spec = httpx.get(f"{hub.url}/v1/jobs/demo/spec", headers={"Authorization": f"Bearer {hub.admin}"}).json()
        assert spec["spec"]["aggregation"]["strategy"] == "fedavg"  # round 1 keeps its strategy
        assert hub.upload("alpha", 1, delta(1), 10).status_code == 200
        assert hub.upload("beta", 1, delta(2), 10).status_code == 200
        hub.wait_for("version 1", lambda s: s["version"] >= 1)
        assert torch.equal(
            hub.adapter(1)["classifier.weight"], combine(v0(), [(delta(1), 10), (delta(2), 10)])["classifier.weight"]
        )
        spec = httpx.get(f"{hub.url}/v1/jobs/demo/spec", headers={"Authorization": f"Bearer {hub.admin}"}).json()
        assert spec["spec"]["aggregation"]["strategy"] == "fedadam"  # from round 2 on
        assert set(hub.rounds()[1]["participants"]) == {"alpha", "beta", "delta"}
    finally:
        agg.stop()


def test_async_buffers_weight_stale_updates(tmp_path: Path) -> None:
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", "agg")
    agg.start()
    try:
        hub = Hub(agg.url, agg.admin, tokens_for("alpha", "beta", "gamma", "omega"))
        started(hub, document(["alpha", "beta", "gamma", "omega"], mode="async", bufferSize=2, maxStaleness=1))
        assert hub.task("gamma").json()["action"] == "train"
        assert hub.upload("alpha", 1, delta(1), 10).status_code == 200
        assert hub.upload("beta", 1, delta(2), 30).status_code == 200
        hub.wait_for("version 1", lambda s: s["version"] >= 1)
        v1 = hub.adapter(1)
        assert torch.equal(
            v1["classifier.weight"], combine(v0(), [(delta(1), 10), (delta(2), 30)])["classifier.weight"]
        )
        stale = hub.upload("gamma", 1, delta(3), 20)  # trained from version 0, arrives in buffer 2
        assert stale.status_code == 200 and stale.json()["round"] == 2, stale.text
        assert hub.upload("gamma", 1, delta(3), 20).json()["duplicate"] is True
        assert hub.upload("alpha", 2, delta(4), 10).status_code == 200
        hub.wait_for("version 2", lambda s: s["version"] >= 2)
        expected = combine(v1, [(delta(3), 20 / 2**0.5), (delta(4), 10)])
        assert torch.equal(hub.adapter(2)["classifier.weight"], expected["classifier.weight"])
        too_old = hub.upload("omega", 1, delta(5), 30)  # two versions stale, maxStaleness 1
        assert too_old.status_code == 409 and too_old.json()["reason"] == "stale"
    finally:
        agg.stop()


def test_long_poll_answers_when_the_round_opens(tmp_path: Path) -> None:
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", "agg")
    agg.start()
    try:
        hub = Hub(agg.url, agg.admin, tokens_for("alpha", "beta"))
        doc = document(["alpha", "beta"])
        doc["spec"]["silos"][1]["rank"] = 4  # a low-rank silo waits for the initial adapter
        assert hub.create(doc).status_code == 201
        assert hub.join("alpha").status_code == 200 and hub.join("beta").status_code == 200
        threading.Timer(1.0, lambda: hub.init("alpha")).start()
        started_at = time.monotonic()
        answer = hub.task("beta", wait=20).json()
        assert answer["action"] == "train" and time.monotonic() - started_at < 5
        assert hub.task("alpha", wait=0.5).json()["action"] == "train"
        hub.upload("alpha", 1, delta(1), 10)
        started_at = time.monotonic()
        assert hub.task("alpha", wait=0.5).json()["action"] == "wait"  # nothing to do: answered after the wait
        assert time.monotonic() - started_at >= 0.5
    finally:
        agg.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_uploads_racing_the_deadline(tmp_path: Path, backend: str) -> None:
    """Many silos upload around the deadline: every 200 is counted once, nothing after the close."""
    url = f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else postgres_database()
    agg = process(tmp_path, url, "agg", FEDSILO_TICK_SECONDS="0.05")
    agg.start()
    silos = [f"s{i:02d}" for i in range(16)]
    try:
        hub = Hub(agg.url, agg.admin, tokens_for(*silos))
        started(hub, document(silos, minSilos=1, roundTimeoutSeconds=2))
        opened = time.monotonic()
        rng = random.Random(11)
        delays = {s: rng.uniform(1.2, 2.8) for s in silos}  # half before the deadline, half around or after
        answers: dict[str, int] = {}

        def send(silo: str, index: int) -> None:
            time.sleep(max(0.0, opened + delays[silo] - time.monotonic()))
            answers[silo] = hub.upload(silo, 1, delta(100 + index), 10 + index).status_code

        threads = [threading.Thread(target=send, args=(s, i)) for i, s in enumerate(silos)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hub.wait_for("version 1", lambda s: s["version"] >= 1)
        accepted = sorted(s for s, code in answers.items() if code == 200)
        assert set(answers.values()) <= {200, 409}, answers
        assert accepted and len(accepted) < len(silos), answers  # the deadline really cut in
        history = hub.rounds()[0]
        assert history["updates"] == len(accepted), (history, answers)
        parts = [(delta(100 + silos.index(s)), 10 + silos.index(s)) for s in accepted]
        assert torch.equal(hub.adapter(1)["classifier.weight"], combine(v0(), parts)["classifier.weight"])
    finally:
        agg.stop()
