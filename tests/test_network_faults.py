"""A federation through a faulty network: every round's adapter is exact, every update counted once.

A loopback proxy between two scripted silos and a real aggregator process breaks HTTP
exchanges on a seeded schedule: connections refused at once, delays, stalls past the read
timeout, resets in the middle of an upload body, responses cut mid-body, and the nasty
one: the request reached the aggregator whole (it committed the update) but the silo only
saw a reset, so it re-sends, and that must count as a duplicate, not a second update.
"""

from __future__ import annotations

import random
import secrets
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.aggregator.conftest import AggregatorProcess
from tests.conftest import job_document

from fedsilo.adapters import from_bytes, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client, Outcome
from fedsilo.local.runner import free_port
from fedsilo.spec import parse_job

SEED = 20240611
ROUNDS = 3
EXAMPLES = {"alpha": 24, "beta": 8}  # weights 3/4 and 1/4: the mean of dyadic tensors is exact
TOKENS = {name: f"{name}-token-0123456789" for name in EXAMPLES}
READ_TIMEOUT = 2.0
# the first attempt of each upload meets one of these, so every kind is seen on an upload
UPLOAD_FAULTS = {
    ("alpha", 1): "cut_request",  # reset mid-body: the aggregator never gets the whole update
    ("beta", 1): "lose_response",  # accepted, but the silo sees a reset: re-sent, a duplicate
    ("alpha", 2): "lose_response",
    ("beta", 2): "refuse",
    ("alpha", 3): "stall",  # no answer within the read timeout, then a reset
    ("beta", 3): "cut_request",
}
ANSWER_LOST = {"lose_response", "stall", "cut_response"}  # the request arrived whole, the answer did not
OTHER_FAULTS = ["pass"] * 10 + ["refuse"] * 2 + ["delay"] * 2 + ["lose_response", "cut_response", "cut_request"]


class FaultyProxy:
    """127.0.0.1 HTTP/1.1 proxy that breaks exchanges on a schedule seeded per (method, path, attempt).

    It reads each request whole (Content-Length bodies only, as httpx sends bytes), forwards it
    on a fresh upstream connection, reads the response whole and passes it on, unless the
    schedule says otherwise. It stops by itself after `lifetime` seconds.
    """

    def __init__(self, upstream_port: int, lifetime: float = 120.0) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop_at = time.monotonic() + lifetime
        self.attempts: Counter[str] = Counter()
        self.applied: list[tuple[str, str]] = []  # (request line, fault)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop_at = 0.0
        self.thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while time.monotonic() < self.stop_at:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def fault(self, method: str, path: str) -> str:
        key = f"{method} {path}"
        with self.lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
        rng = random.Random(f"{SEED}/{key}/{attempt}")
        if method == "PUT" and "/updates/" in path:
            round_, silo = int(path.split("/")[5]), path.rsplit("/", 1)[1]
            if attempt == 0:
                return UPLOAD_FAULTS[(silo, round_)]
            return rng.choice(["pass", "pass", "delay", "lose_response", "cut_request"]) if attempt < 3 else "pass"
        if method == "GET" and "/adapters/" in path and attempt == 0:
            return "cut_response"  # a download truncated mid-body
        return rng.choice(OTHER_FAULTS) if attempt < 4 else "pass"

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            while time.monotonic() < self.stop_at:
                request = _read_message(conn)
                if request is None:
                    return
                method, path = request[: request.index(b"\r\n")].decode().split(" ")[:2]
                fault = self.fault(method, path)
                with self.lock:
                    self.applied.append((f"{method} {path}", fault))
                if not self._exchange(conn, request, fault):
                    _reset(conn)
                    return
        except OSError:
            _reset(conn)
        finally:
            conn.close()

    def _exchange(self, conn: socket.socket, request: bytes, fault: str) -> bool:
        """Forward one request and its response; False when the client connection must be reset."""
        rng = random.Random(f"{SEED}/{len(request)}/{fault}")
        if fault == "refuse":
            return False
        if fault == "delay":
            time.sleep(rng.uniform(0.05, 0.4))
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30) as upstream:
            if fault == "cut_request":  # part of the request, then a reset on both sides
                upstream.sendall(request[: rng.randrange(len(request) // 2, len(request) - 1)])
                _reset(upstream)
                return False
            upstream.sendall(request)
            if fault == "lose_response":  # the aggregator answered: it has done the work; the silo sees a reset
                upstream.recv(1)
                return False
            response = _read_message(upstream)
            assert response is not None, "the aggregator closed the connection without answering"
        if fault == "stall":
            time.sleep(READ_TIMEOUT + 0.5)
            return False
        if fault == "cut_response":
            conn.sendall(response[: rng.randrange(1, len(response))])
            return False
        conn.sendall(response)
        return True


def _read_message(sock: socket.socket) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length (or no) body; None on a clean EOF before it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            if data:
                raise ConnectionResetError("connection closed mid-headers")
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    assert b"chunked" not in headers.get(b"transfer-encoding", b""), "the proxy only speaks Content-Length"
    status = head.split(b" ", 2)[1]
    length = 0 if status in (b"204", b"304") else int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("connection closed mid-body")
        body += chunk
    return head + b"\r\n\r\n" + body


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


# ---- the federation -----------------------------------------------------------------------


def _dyadic(seed: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, shape, generator=g).float() * scale


SHAPES = {"m.lora_A.weight": (8, 512), "m.lora_B.weight": (512, 8), "classifier.weight": (2, 512)}


def _v0() -> dict[str, torch.Tensor]:
    return {name: _dyadic(i, shape, 0.25) for i, (name, shape) in enumerate(SHAPES.items())}


def _delta(silo: str, round_: int) -> dict[str, torch.Tensor]:
    base = 1000 * round_ + (0 if silo == "alpha" else 500)
    return {name: _dyadic(base + i, shape, 0.125) for i, (name, shape) in enumerate(SHAPES.items())}


def _expected() -> list[dict[str, torch.Tensor]]:
    """Global adapter per version, as if the network never failed: v_r = v_{r-1} + example-weighted mean."""
    versions = [_v0()]
    total = sum(EXAMPLES.values())
    for r in range(1, ROUNDS + 1):
        mean = {k: sum(EXAMPLES[s] * _delta(s, r)[k] for s in EXAMPLES) / total for k in SHAPES}
        versions.append({k: versions[-1][k] + mean[k] for k in SHAPES})
    return versions


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[AggregatorProcess]:
    agg = AggregatorProcess(
        f"http://127.0.0.1:{free_port()}",
        secrets.token_urlsafe(24),
        f"sqlite:///{tmp_path / 'fedsilo.db'}",
        tmp_path / "checkpoints",
        tmp_path / "aggregator.log",
    )
    agg.start()
    yield agg
    agg.stop()


def _silo(
    url: str, name: str, expected: list[dict[str, torch.Tensor]], outcomes: dict[tuple[str, int], Outcome]
) -> None:
    client = Client(
        url, "demo", TOKENS[name], name, retries=None, timeout=READ_TIMEOUT, backoff_cap=0.5, rng=random.Random(name)
    )
    client.join(m.JoinRequest(n_train_examples=EXAMPLES[name], n_eval_examples=4))
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        task = client.task()
        if task.action == "done":
            return
        if task.action == "init":
            client.put_initial(to_bytes(_v0()))
        elif task.action == "train":
            base = from_bytes(client.adapter(task.version))
            assert all(torch.equal(base[k], expected[task.version][k]) for k in SHAPES), task
            upload = client.put_update(task.round, to_bytes(_delta(name, task.round)), EXAMPLES[name], 0.1)
            outcomes[(name, task.round)] = upload.outcome
        elif task.action == "evaluate":
            client.post_metrics(m.MetricsReport(version=task.version, split="validation", loss=1.0, n_examples=4))
        else:
            time.sleep(0.05)
    raise TimeoutError(f"silo {name} did not finish")


def test_a_job_through_a_faulty_network_ends_exactly_as_without_faults(aggregator: AggregatorProcess) -> None:
    admin = Client(aggregator.url, "demo", aggregator.admin, retries=3)  # straight to the aggregator
    doc = job_document(
        training={"rounds": ROUNDS, "localSteps": 1, "batchSize": 4},
        aggregation={"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 120},
    )
    admin.create_job(parse_job(doc), TOKENS)
    expected = _expected()
    outcomes: dict[tuple[str, int], Outcome] = {}
    errors: list[BaseException] = []
    proxy = FaultyProxy(int(aggregator.url.rsplit(":", 1)[1]))

    def run(name: str) -> None:
        try:
            _silo(proxy.url, name, expected, outcomes)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    try:
        silos = [threading.Thread(target=run, args=(name,)) for name in EXAMPLES]
        for t in silos:
            t.start()
        for t in silos:
            t.join(60)
    finally:
        proxy.close()
    assert not errors, errors
    assert not any(t.is_alive() for t in silos)

    status = admin.status()
    assert (status.phase, status.version) == ("Succeeded", ROUNDS)
    for version in range(1, ROUNDS + 1):
        got = from_bytes(admin.adapter(version))
        assert all(torch.equal(got[k], expected[version][k]) for k in SHAPES), f"version {version} differs"
    for info in admin.rounds():
        assert (info.updates, info.examples) == (2, sum(EXAMPLES.values())), info  # each silo once
        assert sorted(info.participants) == sorted(EXAMPLES)

    # the schedule did what it claims: every fault kind happened, uploads saw the nasty ones
    kinds = Counter(fault for _, fault in proxy.applied)
    assert {"refuse", "delay", "stall", "cut_request", "cut_response", "lose_response"} <= set(kinds), kinds
    for silo, round_ in UPLOAD_FAULTS:
        faults = [fault for line, fault in proxy.applied if line == f"PUT /v1/jobs/demo/rounds/{round_}/updates/{silo}"]
        # the aggregator counted an earlier send whose answer never arrived: the re-send is a duplicate
        counted_before = any(fault in ANSWER_LOST for fault in faults[:-1])
        assert outcomes[(silo, round_)] is (Outcome.DUPLICATE if counted_before else Outcome.ACCEPTED), (silo, faults)
    assert Outcome.DUPLICATE in outcomes.values()
