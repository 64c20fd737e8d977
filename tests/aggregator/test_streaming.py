"""Streaming ingest: upload bodies go to a staged file in the blob store, never whole into memory.

Against a real aggregator process over real HTTP (SQLite): concurrent large uploads keep the
process's peak memory well under the bytes in flight and fold to the exact weighted mean; a
refused, aborted or duplicate upload leaves no file behind. In-process on a real SQLite file:
a commit that fails after the blob was adopted leaves only an orphan, which the retry reuses
and the sweep removes; a robust strategy referencing the blob files survives a restart.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import event, select
from tests.aggregator.conftest import AggregatorProcess
from tests.conftest import job_document

from fedsilo.adapters import from_bytes, sha256, to_bytes
from fedsilo.aggregator.acceptance import Incoming
from fedsilo.aggregator.blobs import INCOMING, Blobs
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.rounds import Engine
from fedsilo.aggregator.store import SiloRow, UpdateRow, aware, make_sessions
from fedsilo.api import models as m
from fedsilo.local.runner import free_port
from fedsilo.spec import parse_job

SILOS = 24
FLOATS = 2 * 1024 * 1024  # 8 MiB of float32 per upload: 192 MiB in flight at once
LIMIT = 16 * 1024 * 1024


def _names(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def _tokens(n: int) -> dict[str, str]:
    return {name: f"{name}-token-0123456789" for name in _names(n)}


def _v0() -> dict[str, torch.Tensor]:
    return {"m.lora_A.weight": torch.zeros(FLOATS // 1024, 1024), "head.weight": torch.zeros(2, 8)}


def _delta(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {k: torch.randn(v.shape, generator=g) for k, v in _v0().items()}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _peak_rss(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _incoming(agg: AggregatorProcess) -> list[Path]:
    return list((agg.checkpoint_dir / "blobs" / INCOMING).iterdir())


def _blob_files(root: Path) -> set[str]:
    return {p.name for p in root.glob("*/*.safetensors")}


@pytest.fixture
def agg(tmp_path: Path) -> Any:
    process = AggregatorProcess(
        f"http://127.0.0.1:{free_port()}",
        secrets.token_urlsafe(24),
        f"sqlite:///{tmp_path / 'fedsilo.db'}",
        tmp_path / "checkpoints",
        tmp_path / "aggregator.log",
        env={"FEDSILO_INGEST_SLOTS": "2", "FEDSILO_BODY_TIMEOUT_SECONDS": "5"},
    )
    process.start()
    yield process
    process.stop()


def _job(agg: AggregatorProcess, n: int) -> None:
    document = job_document(
        aggregation={"strategy": "fedavg", "minSilos": n, "roundTimeoutSeconds": 600, "maxUpdateBytes": LIMIT},
        silos=[{"name": name, "data": {"path": "x.csv"}} for name in _names(n)],
    )
    created = httpx.post(
        f"{agg.url}/v1/jobs", json={"job": document, "silo_tokens": _tokens(n)}, headers=_bearer(agg.admin)
    )
    assert created.status_code == 201, created.text
    for name, token in _tokens(n).items():
        body = {"n_train_examples": 100, "n_eval_examples": 1}
        assert httpx.post(f"{agg.url}/v1/jobs/demo/silos/{name}/join", json=body, headers=_bearer(token)).is_success
    initial = httpx.put(
        f"{agg.url}/v1/jobs/demo/silos/s00/adapters/0", content=to_bytes(_v0()), headers=_bearer(_tokens(n)["s00"])
    )
    assert initial.status_code == 200, initial.text


def _put(agg: AggregatorProcess, silo: str, data: bytes, examples: int = 10, digest: str | None = None) -> Any:
    headers = {**_bearer(_tokens(SILOS)[silo]), "X-Fedsilo-Examples": str(examples)}
    headers["X-Fedsilo-Sha256"] = digest or sha256(data)
    return httpx.put(f"{agg.url}/v1/jobs/demo/rounds/1/updates/{silo}", content=data, headers=headers, timeout=120)


def _wait_version(agg: AggregatorProcess, version: int) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{agg.url}/v1/jobs/demo", headers=_bearer(agg.admin)).json()["version"] < version:
        assert time.monotonic() < deadline, "the round did not aggregate"
        time.sleep(0.05)


def test_concurrent_large_uploads_keep_memory_flat_and_fold_exactly(agg: AggregatorProcess) -> None:
    _job(agg, SILOS)
    assert agg.proc is not None
    bodies = {name: to_bytes(_delta(i)) for i, name in enumerate(_names(SILOS))}
    before = _peak_rss(agg.proc.pid)
    answers: dict[str, int] = {}

    def upload(i: int, name: str) -> None:
        answers[name] = _put(agg, name, bodies[name], examples=i + 1).status_code

    threads = [threading.Thread(target=upload, args=(i, name)) for i, name in enumerate(_names(SILOS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(answers.values()) == {200}, answers
    _wait_version(agg, 1)
    grown = _peak_rss(agg.proc.pid) - before
    in_flight = sum(len(b) for b in bodies.values())
    # the old ingest held every body and a parsed copy of most: about twice the 192 MiB in flight; now the
    # global adapter, two uploads' tensors and mapped files (ingest slots), each connection's small write
    # batch, and the round's float64 sum, mean and result: a few adapters' worth whatever the silo count
    one = len(bodies["s00"])
    assert grown < 10 * one, f"peak RSS grew by {grown / 2**20:.0f} MiB for {in_flight / 2**20:.0f} MiB of uploads"
    got = from_bytes(httpx.get(f"{agg.url}/v1/jobs/demo/adapters/1", headers=_bearer(agg.admin)).content)
    total = sum(range(1, SILOS + 1))
    for key in _v0():
        mean = sum(_delta(i)[key].double() * (i + 1) for i in range(SILOS)) / total
        assert torch.equal(got[key], mean.float()), key
    assert _incoming(agg) == []


def test_refused_and_aborted_uploads_leave_no_file(agg: AggregatorProcess) -> None:
    _job(agg, 2)
    blobs = agg.checkpoint_dir / "blobs"
    stored = _blob_files(blobs)
    data = to_bytes(_delta(1))
    assert _put(agg, "s00", data, digest="0" * 64).status_code == 422  # checksum
    assert _put(agg, "s00", b"not safetensors at all").status_code == 422
    over = httpx.put(  # no Content-Length: refused at the chunk that crosses the limit
        f"{agg.url}/v1/jobs/demo/rounds/1/updates/s00",
        content=iter([data[:LIMIT // 2], data[: LIMIT // 2], data[:1024]]),
        headers={**_bearer(_tokens(2)["s00"]), "X-Fedsilo-Examples": "10", "X-Fedsilo-Sha256": sha256(data)},
    )
    assert over.status_code == 413, over.text
    late = _put(agg, "s00", data)
    assert late.status_code == 200 and _put(agg, "s00", data).json()["duplicate"]  # a retry: same answer
    assert _put(agg, "s00", to_bytes(_delta(2))).status_code == 409  # a different update for the same round
    host, port = agg.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a silo that dies mid-upload
        head = (
            f"PUT /v1/jobs/demo/rounds/1/updates/s01 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Authorization: Bearer {_tokens(2)['s01']}\r\nX-Fedsilo-Examples: 10\r\n"
            f"X-Fedsilo-Sha256: {sha256(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while _incoming(agg) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _incoming(agg) == []
    assert _blob_files(blobs) - stored == {f"{sha256(data)}.safetensors"}  # only the accepted update


def _engine(tmp_path: Path, strategy: str = "fedavg") -> Engine:
    engine = Engine(make_sessions(f"sqlite:///{tmp_path / 'store.db'}"), Blobs(tmp_path / "blobs"), Metrics())
    doc = job_document(
        training={"rounds": 1, "localSteps": 1},
        aggregation={"strategy": strategy, "minSilos": 3, "roundTimeoutSeconds": 600},
        silos=[{"name": n, "data": {"path": "x.csv"}} for n in _names(3)],
    )
    engine.create_job(parse_job(doc), _tokens(3))
    for name in _names(3):
        engine.join("demo", name, m.JoinRequest(n_train_examples=10, n_eval_examples=0))
    engine.put_initial("demo", "s00", engine.blobs.stage(to_bytes(_small(0))))
    return engine


def _small(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {"m.lora_A.weight": torch.randn(4, 6, generator=g), "head.weight": torch.randn(2, 6, generator=g)}


def _submit(engine: Engine, silo: str, data: bytes) -> m.UpdateAccepted:
    return engine.submit_update("demo", Incoming(silo, 1, engine.blobs.stage(data), sha256(data), 10))


class Crash(RuntimeError):
    pass


def test_a_commit_lost_after_adoption_leaves_only_an_orphan(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    data = to_bytes(_small(1))
    armed = [True]

    @event.listens_for(engine.sessions, "before_commit")
    def _crash(_: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise Crash("the process dies between the rename and the commit")

    with pytest.raises(Crash):
        _submit(engine, "s00", data)
    with engine.sessions() as s:
        assert s.scalars(select(UpdateRow)).all() == []
    assert engine.blobs.exists(sha256(data)), "adopted before the commit: an orphan"
    assert not list((engine.blobs.root / INCOMING).iterdir())
    assert engine.sweep(min_age_seconds=3600) == 0  # the age guard keeps what a transaction may still commit
    assert engine.sweep(min_age_seconds=0) == 1
    assert not engine.blobs.exists(sha256(data))

    with pytest.raises(Crash):  # again, and this time the retry comes before any sweep
        armed[0] = True
        _submit(engine, "s00", data)
    answer = _submit(engine, "s00", data)
    assert not answer.duplicate and engine.blobs.exists(answer.sha256)
    assert engine.sweep(min_age_seconds=0) == 0  # now a row names it
    assert _submit(engine, "s00", data).duplicate

    crashed = engine.blobs.receive()  # a body a crash left half-received
    crashed.write(data[:100])
    os.utime(crashed.path, (1, 1))
    assert engine.sweep(min_age_seconds=600) == 1 and not crashed.path.exists()
    crashed.discard()


def test_a_robust_round_references_the_blobs_and_survives_a_restart(tmp_path: Path) -> None:
    engine = _engine(tmp_path, "median")
    for i, name in enumerate(_names(2)):
        _submit(engine, name, to_bytes(_small(i + 1)))
    engine.release_leases()  # a restart: the new process rebuilds the accumulator from the rows and blobs
    restarted = Engine(engine.sessions, engine.blobs, Metrics())
    _submit(restarted, "s02", to_bytes(_small(3)))
    restarted.tick()
    got = from_bytes(restarted.adapter("demo", 1)[0])
    for key, base in _small(0).items():
        median = torch.stack([_small(i)[key] for i in (1, 2, 3)]).median(dim=0).values
        assert torch.allclose(got[key], base + median), key


def test_polls_write_nothing_until_the_batch_writes_every_silos_last_seen(tmp_path: Path) -> None:
    engine, tokens = _engine(tmp_path), _tokens(3)
    for name in _names(3):  # round 1 is open: the first poll moves each silo to `training`
        assert engine.task("demo", name, tokens[name]).action == "train"
    engine.write_polls()  # the moves are written in the next tick's batch, whatever SEEN_EVERY says
    with engine.sessions() as s:
        assert {r.state for r in s.scalars(select(SiloRow))} == {"training"}
    with engine.sessions() as s:
        joined = {r.name: aware(r.last_seen) for r in s.scalars(select(SiloRow))}
    commits = [0]
    event.listen(engine.sessions, "after_commit", lambda _: commits.__setitem__(0, commits[0] + 1))
    for _ in range(5):
        for name in _names(3):
            assert engine.task("demo", name, tokens[name]).action == "train"
    engine.write_polls()  # less than SEEN_EVERY since the engine started: nothing yet
    assert commits[0] == 0, "a poll that changes nothing must not write"
    engine.write_polls(force=True)
    assert commits[0] == 1, "one transaction for all the silos that polled"
    with engine.sessions() as s:
        seen = {r.name: aware(r.last_seen) for r in s.scalars(select(SiloRow))}
    assert all(seen[n] > joined[n] for n in _names(3))  # type: ignore[operator]
    engine.write_polls(force=True)
    assert commits[0] == 1, "nothing remembered: nothing written"
