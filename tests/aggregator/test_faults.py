"""Fault injection at every step of accepting an update and closing a round.

The engine runs in-process on a real SQLite file (and the machine's PostgreSQL) with two
boundaries made faulty: the blob folder (a write, read or delete raises) and the database
commit (raises before the commit, or after it took effect — a lost acknowledgement). For
every single fault point of a fault-free run, a fresh job is driven to completion the way
silos and the server loop do it (retry what failed), then the store is audited: each
round's global adapter must equal the previous one plus the example-weighted mean of
exactly the updates that round accepted, and no row may point at a missing file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import event, select
from tests.aggregator.conftest import postgres_database
from tests.conftest import job_document

from fedsilo.adapters import from_bytes, sha256, to_bytes
from fedsilo.aggregator.acceptance import Incoming
from fedsilo.aggregator.blobs import Blobs, Staged
from fedsilo.aggregator.errors import EngineError, Fenced, Unavailable
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.rounds import Engine
from fedsilo.aggregator.store import UpdateRow, VersionRow, make_sessions
from fedsilo.api import models as m
from fedsilo.spec import parse_job

SILOS = {"gamma": 20, "alpha": 10, "beta": 30}  # example counts; arrival order != the sorted rebuild order
ROUNDS = 3


class Injected(RuntimeError):
    """The fault the test injects."""


@dataclass
class Faults:
    """Counts boundary operations and raises at the one chosen (op, n)."""

    target: tuple[str, int] | None = None
    seen: Counter[str] = field(default_factory=Counter)
    fired: bool = False

    def hit(self, op: str) -> None:
        self.seen[op] += 1
        if not self.fired and self.target == (op, self.seen[op]):
            self.fired = True
            raise Injected(f"injected fault at {op} #{self.seen[op]}")


class FaultyBlobs(Blobs):
    def __init__(self, root: Path, faults: Faults) -> None:
        super().__init__(root)
        self.faults = faults

    def put(self, data: bytes) -> str:
        self.faults.hit("blob.put")
        return super().put(data)

    def sync(self, staged: Staged) -> None:
        self.faults.hit("blob.sync")
        super().sync(staged)

    def adopt(self, staged: Staged) -> str:
        self.faults.hit("blob.adopt")
        return super().adopt(staged)

    def get(self, digest: str) -> bytes:
        self.faults.hit("blob.get")
        return super().get(digest)

    def delete(self, digest: str) -> None:
        self.faults.hit("blob.delete")
        super().delete(digest)


def v0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"m.lora_A.weight": torch.randn(4, 6, generator=g), "classifier.weight": torch.randn(2, 6, generator=g)}


def delta(silo: str, round_: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(hash((silo, round_)) % 2**31)
    return {k: torch.randn(v.shape, generator=g) for k, v in v0().items()}


def incoming(engine: Engine, silo: str, round_: int, data: bytes, n: int) -> Incoming:
    """An upload as the HTTP layer hands it over: the body staged in the engine's blob store."""
    return Incoming(silo, round_, engine.blobs.stage(data), sha256(data), n)


def retry(fn: Callable[[], Any], tries: int = 5) -> Any:
    """What a silo (or the server loop) does after a failure: try again."""
    for attempt in range(tries):
        try:
            return fn()
        except Injected:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    counter = iter(range(10_000))

    def fresh() -> str:
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / f'store-{next(counter)}.db'}"
        return postgres_database()

    yield fresh


def run_job(url: str, root: Path, faults: Faults) -> Engine:
    sessions = make_sessions(url)
    engine = Engine(sessions, FaultyBlobs(root, faults), Metrics())

    @event.listens_for(sessions, "before_commit")
    def _before(_: Any) -> None:
        faults.hit("commit.before")

    @event.listens_for(sessions, "after_commit")
    def _after(_: Any) -> None:
        faults.hit("commit.after")  # the commit took effect; the caller sees an error

    doc = job_document(
        training={"rounds": ROUNDS, "localSteps": 1},
        aggregation={"strategy": "fedavg", "minSilos": 3, "roundTimeoutSeconds": 600},
        silos=[{"name": n, "data": {"path": f"{n}.csv"}} for n in SILOS],
    )
    tokens = {n: f"{n}-token-0123456789" for n in SILOS}
    retry(lambda: engine.create_job(parse_job(doc), tokens))
    for name, n in SILOS.items():
        retry(lambda name=name, n=n: engine.join("demo", name, m.JoinRequest(n_train_examples=n, n_eval_examples=0)))
    retry(lambda: engine.put_initial("demo", "alpha", engine.blobs.stage(to_bytes(v0()))))
    for round_ in range(1, ROUNDS + 1):
        for name, n in SILOS.items():
            up = (name, round_, to_bytes(delta(name, round_)), n)
            # each try sends the body again, as an HTTP retry does (the engine consumes the staged file)
            retry(lambda up=up: engine.submit_update("demo", incoming(engine, *up)))
        for _ in range(10):  # the server loop: tick until the round has closed
            engine.tick()  # logs and isolates a job's failure; the next tick retries
            if engine.status("demo").version >= round_:
                break
    return engine


def audit(engine: Engine) -> None:
    """Every version = previous + weighted mean of exactly the accepted updates; every row's file exists."""
    status = engine.status("demo")
    assert (status.phase, status.version) == ("Succeeded", ROUNDS), status
    with engine.sessions() as s:
        versions = {v.version: v.sha256 for v in s.scalars(select(VersionRow).where(VersionRow.job == "demo"))}
        updates = s.scalars(select(UpdateRow).where(UpdateRow.job == "demo")).all()
    assert all(engine.blobs.exists(d) for d in versions.values()), "a version row points at a missing file"
    previous = from_bytes(engine.blobs.path(versions[0]).read_bytes())
    for round_ in range(1, ROUNDS + 1):
        accepted = sorted((u.silo, u.n_examples) for u in updates if u.round == round_)
        assert accepted == sorted(SILOS.items()), f"round {round_}: accepted {accepted}"
        total = sum(n for _, n in accepted)
        got = from_bytes(engine.blobs.path(versions[round_]).read_bytes())
        for k, base in previous.items():
            mean = sum(delta(s, round_)[k].double() * n for s, n in accepted) / total
            assert torch.equal(got[k], (base.float() + mean.float()).to(base.dtype)), f"round {round_} {k}"
        previous = got
    engine.sweep(min_age_seconds=0)
    left = {p.name.split(".")[0] for p in engine.blobs.root.glob("*/*")}
    assert left == set(versions.values()), "orphan or missing blob files after the sweep"


def test_double_count_from_the_issue_is_gone(tmp_path: Path) -> None:
    """A failed blob write on A's first try used to fold A twice (1.667 instead of 2.0)."""
    faults = Faults(target=("blob.put", 2))  # put #1 is the initial adapter, #2 the first silo's first update
    engine = run_job(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "blobs", faults)
    assert faults.fired
    audit(engine)


def test_every_single_fault_point(database: Callable[[], str], tmp_path: Path) -> None:
    clean = Faults()
    audit(run_job(database(), tmp_path / "clean", clean))
    points = [(op, i) for op, count in sorted(clean.seen.items()) for i in range(1, count + 1)]
    ops = {"blob.put", "blob.sync", "blob.adopt", "blob.get", "blob.delete", "commit.before", "commit.after"}
    assert {op for op, _ in points} >= ops
    failures = []
    for index, point in enumerate(points):
        faults = Faults(target=point)
        try:
            audit(run_job(database(), tmp_path / f"run-{index}", faults))
        except (AssertionError, EngineError, Injected) as exc:
            failures.append(f"{point}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def test_a_paused_writer_is_fenced_after_takeover(tmp_path: Path) -> None:
    """Two engines on one SQLite store: the second takes over an expired lease; the first,
    waking up (a long GC pause, SIGSTOP), can no longer write — its upload is refused
    before anything changes — and the update it would have double-counted counts once."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    clock = lambda: now[0]  # noqa: E731
    first = Engine(make_sessions(url), Blobs(tmp_path / "blobs"), Metrics(), clock, holder="first", lease_seconds=5)
    second = Engine(make_sessions(url), Blobs(tmp_path / "blobs"), Metrics(), clock, holder="second", lease_seconds=5)
    doc = job_document(
        training={"rounds": 1, "localSteps": 1},
        aggregation={"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 600},
        silos=[{"name": n, "data": {"path": f"{n}.csv"}} for n in ("alpha", "beta")],
    )
    first.create_job(parse_job(doc), {n: f"{n}-token-0123456789" for n in ("alpha", "beta")})
    for name in ("alpha", "beta"):
        first.join("demo", name, m.JoinRequest(n_train_examples=10, n_eval_examples=0))
    first.put_initial("demo", "alpha", first.blobs.stage(to_bytes(v0())))
    data = to_bytes(delta("alpha", 1))
    first.submit_update("demo", incoming(first, "alpha", 1, data, 10))
    with pytest.raises(Fenced):  # the lease is first's and still valid
        second.submit_update("demo", incoming(second, "alpha", 1, data, 10))

    now[0] += timedelta(seconds=30)  # first is paused past its lease
    # second took over and sees alpha's committed update
    assert second.submit_update("demo", incoming(second, "alpha", 1, data, 10)).duplicate
    with pytest.raises(Fenced):
        first.submit_update("demo", incoming(first, "alpha", 1, data, 10))
    data = to_bytes(delta("beta", 1))
    second.submit_update("demo", incoming(second, "beta", 1, data, 10))
    second.tick()
    assert second.status("demo").phase == "Succeeded"
    first.tick()  # a fenced engine's tick changes nothing and does not raise
    audit_round = from_bytes(second.blobs.path(second.adapter("demo", 1)[1]).read_bytes())
    expected = {
        k: v.float() + ((delta("alpha", 1)[k].double() + delta("beta", 1)[k].double()) / 2).float()
        for k, v in v0().items()
    }
    assert all(torch.equal(audit_round[k], expected[k]) for k in expected)


def test_async_upload_while_a_buffer_closes_lands_in_the_next(tmp_path: Path) -> None:
    """Between a full buffer and its close, an async upload is asked to retry (503), not lost."""
    engine = Engine(make_sessions(f"sqlite:///{tmp_path / 'a.db'}"), Blobs(tmp_path / "blobs"), Metrics())
    doc = job_document(
        training={"rounds": 3, "localSteps": 1},
        aggregation={"strategy": "fedavg", "minSilos": 1, "mode": "async", "bufferSize": 2},
        silos=[{"name": n, "data": {"path": f"{n}.csv"}} for n in SILOS],
    )
    engine.create_job(parse_job(doc), {n: f"{n}-token-0123456789" for n in SILOS})
    for name, n in SILOS.items():
        engine.join("demo", name, m.JoinRequest(n_train_examples=n, n_eval_examples=0))
    engine.put_initial("demo", "alpha", engine.blobs.stage(to_bytes(v0())))

    def upload(silo: str) -> m.UpdateAccepted:
        return engine.submit_update("demo", incoming(engine, silo, 1, to_bytes(delta(silo, 1)), SILOS[silo]))

    upload("alpha")
    upload("beta")  # buffer 1 is full; it closes at the next tick
    with pytest.raises(Unavailable) as refused:
        upload("gamma")
    assert refused.value.reason == "aggregating"
    engine.tick()
    assert upload("gamma").round == 2  # one version stale, in buffer 2
    history = engine.history("demo")
    assert [h.updates for h in history] == [2, 1]
