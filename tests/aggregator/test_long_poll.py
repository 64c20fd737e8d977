"""Long-polls over real HTTP against real aggregator processes: they sleep on change
notifications (`aggregator/notify.py`), not timers. A waiter wakes at once after a commit,
a change committed by a second aggregator process reaches it within the watcher period,
a client that hangs up leaves no waiter behind, and idle pollers cost almost no CPU.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from tests.aggregator.conftest import AggregatorProcess
from tests.conftest import job_document

from fedsilo.adapters import sha256, to_bytes
from fedsilo.aggregator.notify import WATCH_SECONDS
from fedsilo.local.runner import free_port

ADMIN = "admin-token-0123456789"


def state(value: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A.weight": torch.full((4, 6), value), "classifier.weight": torch.full((2, 6), value)}


class Silos:
    """Silo calls over raw httpx (no client retries): join, init, upload, task."""

    def __init__(self, url: str, names: list[str]) -> None:
        self.url, self.tokens = url, {s: f"{s}-token-{secrets.token_hex(8)}" for s in names}

    def headers(self, silo: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[silo]}", "X-Fedsilo-Silo": silo}

    def create(self, **spec: Any) -> None:
        doc = job_document(silos=[{"name": s, "data": {"path": f"{s}.csv"}} for s in self.tokens], **spec)
        body = {"job": doc, "silo_tokens": self.tokens}
        r = httpx.post(f"{self.url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert r.status_code == 201, r.text

    def join_all(self) -> None:
        def join(silo: str) -> None:
            body = {"n_train_examples": 100, "n_eval_examples": 0}
            r = httpx.post(f"{self.url}/v1/jobs/demo/silos/{silo}/join", json=body, headers=self.headers(silo))
            assert r.status_code == 200, r.text

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(join, self.tokens))

    def init(self, silo: str) -> None:
        url = f"{self.url}/v1/jobs/demo/silos/{silo}/adapters/0"
        assert httpx.put(url, content=to_bytes(state(0.0)), headers=self.headers(silo)).status_code == 200

    def upload(self, silo: str, round_: int, url: str | None = None) -> None:
        data = to_bytes(state(1.0))
        headers = {**self.headers(silo), "X-Fedsilo-Examples": "10", "X-Fedsilo-Sha256": sha256(data)}
        r = httpx.put(f"{url or self.url}/v1/jobs/demo/rounds/{round_}/updates/{silo}", content=data, headers=headers)
        assert r.status_code == 200, r.text

    def task(self, silo: str, wait: float = 0, url: str | None = None) -> dict[str, Any]:
        params = {"wait": str(wait)} if wait else None
        r = httpx.get(
            f"{url or self.url}/v1/jobs/demo/silos/{silo}/task", params=params, headers=self.headers(silo), timeout=60
        )
        assert r.status_code == 200, r.text
        return dict(r.json())


def started(tmp_path: Path, name: str, database: str, **env: str) -> AggregatorProcess:
    agg = AggregatorProcess(
        f"http://127.0.0.1:{free_port()}", ADMIN, database, tmp_path / "checkpoints", tmp_path / f"{name}.log", env=env
    )
    agg.start()
    return agg


def waiting(agg: AggregatorProcess) -> float:
    """The aggregator's `fedsilo_long_polls_waiting` gauge for job demo."""
    text = httpx.get(f"{agg.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    found = re.search(r'^fedsilo_long_polls_waiting\{job="demo"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def until(check: Any, timeout: float, what: str) -> float:
    """Seconds until `check()` holds (fails after `timeout`)."""
    started_at = time.monotonic()
    while not check():
        assert time.monotonic() - started_at < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - started_at


def answer_after(silos: Silos, silo: str, change: Any, url: str | None = None) -> tuple[dict[str, Any], float]:
    """Long-poll as `silo` while `change()` runs in another thread; the answer and its delay after the change."""
    done: dict[str, float] = {}

    def later() -> None:
        time.sleep(1.0)  # the poll is waiting by now
        change()
        done["at"] = time.monotonic()

    thread = threading.Thread(target=later)
    thread.start()
    answer = silos.task(silo, wait=20, url=url)
    answered = time.monotonic()
    thread.join()
    return answer, answered - done["at"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_commit_wakes_the_waiter_at_once(tmp_path: Path) -> None:
    agg = started(tmp_path, "agg", f"sqlite:///{tmp_path / 'store.db'}")
    try:
        silos = Silos(agg.url, ["alpha", "beta"])
        silos.create(training={"rounds": 3, "localSteps": 1})
        silos.join_all()
        silos.init("alpha")
        assert silos.task("alpha")["action"] == "train"
        silos.upload("alpha", 1)
        # beta's upload completes round 1; round 2 opens and alpha's held `wait` becomes `train`
        answer, delay = answer_after(silos, "alpha", lambda: silos.upload("beta", 1))
        assert answer["action"] == "train" and answer["round"] == 2
        assert delay < 1.0, f"{delay:.2f}s from the commit to the waiter's answer"
        assert waiting(agg) == 0
    finally:
        agg.stop()


def test_a_change_by_another_aggregator_reaches_waiters(tmp_path: Path) -> None:
    """Two processes on one store: the lease holder commits, the other's waiter hears of it from its watcher."""
    database = f"sqlite:///{tmp_path / 'store.db'}"
    writer = started(tmp_path, "writer", database)
    reader = started(tmp_path, "reader", database)
    try:
        silos = Silos(writer.url, ["alpha", "beta"])
        silos.create(training={"rounds": 3, "localSteps": 1})
        silos.join_all()
        silos.init("alpha")
        silos.upload("alpha", 1)
        answer, delay = answer_after(silos, "alpha", lambda: silos.upload("beta", 1), url=reader.url)
        assert answer["action"] == "train" and answer["round"] == 2
        assert delay < WATCH_SECONDS + 1.0, f"{delay:.2f}s from the other process's commit to the waiter"
    finally:
        writer.stop()
        reader.stop()


def test_a_client_that_hangs_up_leaves_no_waiter(tmp_path: Path) -> None:
    agg = started(tmp_path, "agg", f"sqlite:///{tmp_path / 'store.db'}")
    try:
        silos = Silos(agg.url, ["alpha", "beta"])
        silos.create(training={"rounds": 3, "localSteps": 1})
        silos.join_all()
        silos.init("alpha")
        silos.upload("alpha", 1)
        host, port = agg.url.removeprefix("http://").split(":")
        headers = "".join(f"{k}: {v}\r\n" for k, v in silos.headers("alpha").items())
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(f"GET /v1/jobs/demo/silos/alpha/task?wait=30 HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            until(lambda: waiting(agg) == 1, 5, "the poll to wait")
        # the socket is closed: the waiter ends on the disconnect, long before its 30 s
        assert until(lambda: waiting(agg) == 0, 3, "the waiter to end") < 3
    finally:
        agg.stop()


def test_idle_long_pollers_cost_almost_no_cpu(tmp_path: Path) -> None:
    """300 silos hold long polls for 5 s while the round waits for one straggler: CPU stays low.

    Per-waiter polling (a 50 ms timer each, as before notify.py) costs most of a core here.
    """
    n = 300
    agg = started(tmp_path, "agg", f"sqlite:///{tmp_path / 'store.db'}", FEDSILO_TICK_SECONDS="1")
    try:
        silos = Silos(agg.url, [f"s{i:03d}" for i in range(n + 1)])
        silos.create(
            training={"rounds": 1, "localSteps": 1},
            aggregation={"strategy": "fedavg", "minSilos": 1, "fraction": 1 / (n + 1), "roundTimeoutSeconds": 600},
        )
        silos.join_all()
        silos.init("s000")
        idle = [s for s in silos.tokens if silos.task(s)["action"] == "wait"]
        assert len(idle) == n

        async def poll(http: httpx.AsyncClient, silo: str) -> None:
            r = await http.get(f"/v1/jobs/demo/silos/{silo}/task", params={"wait": "30"}, headers=silos.headers(silo))
            assert r.status_code == 200

        measured: dict[str, float] = {}
        assert agg.proc is not None
        pid = agg.proc.pid

        async def load() -> None:
            limits = httpx.Limits(max_connections=n + 10)
            async with httpx.AsyncClient(base_url=agg.url, limits=limits, timeout=60) as http:
                polls = [asyncio.create_task(poll(http, s)) for s in idle]
                await asyncio.to_thread(until, lambda: waiting(agg) == n, 30, "every poll to wait")
                cpu0, t0 = cpu_seconds(pid), time.monotonic()
                await asyncio.sleep(5)
                measured["share"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
                for p in polls:
                    p.cancel()
                await asyncio.gather(*polls, return_exceptions=True)

        asyncio.run(load())
        assert measured["share"] < 0.15, f"{n} idle long-polls cost {100 * measured['share']:.0f}% of a core"
        until(lambda: waiting(agg) == 0, 5, "the cancelled polls to end")
    finally:
        agg.stop()
