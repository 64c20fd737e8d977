"""Coded updates over real HTTP against a real aggregator process: decoded before anything else sees them."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import zstandard
from tests.aggregator.conftest import AggregatorProcess
from tests.conftest import job_document

from fedsilo.adapters import State, from_bytes, schema_of, sha256, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client
from fedsilo.codecs import decode, encode
from fedsilo.local.runner import free_port
from fedsilo.spec import CodecSpec, parse_job

TOKENS = {"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}
A, B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "classifier.weight"
COMPACT = CodecSpec.model_validate({"dtype": "int8", "topK": 0.1, "zstd": True})
HALF = CodecSpec.model_validate({"dtype": "fp16"})


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


def _v0() -> State:
    g = torch.Generator().manual_seed(1)
    return {A: torch.randn(8, 64, generator=g), B: torch.zeros(64, 8), HEAD: torch.randn(2, 64, generator=g)}


def _delta(seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.zeros(8, 64), B: torch.randn(64, 8, generator=g) * 1e-2, HEAD: torch.randn(2, 64, generator=g)}


def _put(agg: AggregatorProcess, silo: str, round_: int, data: bytes) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {TOKENS[silo]}",
        "X-Fedsilo-Examples": "10",
        "X-Fedsilo-Sha256": sha256(data),
        "Content-Type": "application/octet-stream",
    }
    return httpx.put(f"{agg.url}/v1/jobs/demo/rounds/{round_}/updates/{silo}", content=data, headers=headers)


def _wait_version(admin: Client, version: int, timeout: float = 20.0) -> m.JobStatus:
    deadline = time.monotonic() + timeout
    while (status := admin.status()).version < version:
        assert time.monotonic() < deadline, f"version {version} not produced: {status}"
        time.sleep(0.05)
    return status


def _started(agg: AggregatorProcess, document: dict[str, object]) -> tuple[Client, Client, Client]:
    """The job created, alpha and beta joined, and alpha's initial adapter `_v0` in place."""
    admin = Client(agg.url, "demo", agg.admin, retries=0)
    assert admin.create_job(parse_job(document), TOKENS).created
    alpha, beta = (Client(agg.url, "demo", TOKENS[n], n, retries=0) for n in ("alpha", "beta"))
    for silo in (alpha, beta):
        silo.join(m.JoinRequest(n_train_examples=100, n_eval_examples=10))
    alpha.put_initial(to_bytes(_v0()))
    return admin, alpha, beta


def test_coded_ffa_lora_rounds_complete_and_only_coded_bytes_travel(aggregator: AggregatorProcess) -> None:
    """int8 + topK + zstd for alpha, an fp16 override for beta, ffa-lora: no lora_A on the wire."""
    spec = job_document(
        aggregation={"strategy": "ffa-lora", "minSilos": 2, "roundTimeoutSeconds": 60, "codec": COMPACT.model_dump()},
        silos=[
            {"name": "alpha", "data": {"path": "alpha.csv"}},
            {"name": "beta", "data": {"path": "beta.csv"}, "codec": {"dtype": "fp16"}},
        ],
    )
    admin, alpha, beta = _started(aggregator, spec)
    schema, sent_names = schema_of(_v0()), [B, HEAD]

    # what the spec does not say for this silo is refused, and nothing is counted
    full, _ = encode(_delta(1), COMPACT, sorted(_v0()))  # lora_A included
    refusals = [
        (_put(aggregator, "alpha", 1, to_bytes(_delta(1))), "bad_codec"),  # plain, where int8+zstd is due
        (_put(aggregator, "alpha", 1, full), "wrong_names"),  # ffa-lora's A must not travel
        (_put(aggregator, "beta", 1, encode(_delta(1), COMPACT, sent_names)[0]), "bad_codec"),  # beta sends fp16
        (_put(aggregator, "alpha", 1, zstandard.ZstdCompressor().compress(b"\0" * (32 << 20))), "too_large"),
    ]
    for response, reason in refusals:
        assert response.status_code in (413, 422) and response.json()["reason"] == reason, response.text
    assert admin.rounds()[0].updates == 0

    global_state, received, since_restart, residual = _v0(), 0, 0, {}
    for round_ in (1, 2):
        a, residual = encode(_delta(10 * round_), COMPACT, sent_names, residual)
        b, _ = encode(_delta(10 * round_ + 1), HALF, sent_names)
        assert len(a) < len(to_bytes(_delta(0))) / 8  # int8 + 10% + zstd, and no A
        for blob in (zstandard.ZstdDecompressor().decompress(a), b):
            assert b"lora_A" not in blob
        assert alpha.put_update(round_, a, n_examples=30, train_seconds=1.0).outcome.value == "accepted"
        if round_ == 1:  # the restarted aggregator rebuilds the round's accumulator from the stored coded bytes
            aggregator.stop()
            aggregator.start()
            since_restart = -len(a)  # the restarted process counts from zero
        assert beta.put_update(round_, b, n_examples=10, train_seconds=1.0).outcome.value == "accepted"
        received += len(a) + len(b)
        since_restart += len(a) + len(b)
        _wait_version(admin, round_)
        decoded = [decode(a, COMPACT, schema, len(a), {A}), decode(b, HALF, schema, len(b), {A})]
        expected = {n: global_state[n] + (30 * decoded[0][n] + 10 * decoded[1][n]) / 40 for n in global_state}
        global_state = from_bytes(alpha.adapter(round_))
        assert torch.equal(global_state[A], _v0()[A])  # frozen: exactly the initial A
        for name in (B, HEAD):
            assert torch.allclose(global_state[name], expected[name], atol=1e-6), name
    assert admin.status().phase == "Succeeded"

    metrics = httpx.get(f"{aggregator.url}/metrics", headers={"Authorization": f"Bearer {aggregator.admin}"}).text
    counted = re.search(r'fedsilo_received_bytes_total\{job="demo"\} ([0-9.e+]+)', metrics)
    assert counted is not None and float(counted.group(1)) == since_restart  # coded bytes, not decoded
    history = admin.rounds()
    assert sum(r.bytes_received for r in history) == received


def test_a_silo_codec_change_waits_for_the_next_round(aggregator: AggregatorProcess) -> None:
    """alpha's codec changes after its int8 update was accepted: the round still decodes that update
    (also when a restarted aggregator rebuilds the round from the stored bytes) and still expects the
    old codec from alpha's own task; the new codec is in force from round 2."""
    silos = [{"name": n, "data": {"path": f"{n}.csv"}} for n in ("alpha", "beta")]
    plain = {"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 60}
    document = job_document(aggregation=plain, silos=[{**silos[0], "codec": COMPACT.model_dump()}, silos[1]])
    admin, alpha, beta = _started(aggregator, document)
    names = sorted(_v0())
    a, _ = encode(_delta(1), COMPACT, names)
    assert alpha.put_update(1, a, n_examples=30, train_seconds=1.0).outcome.value == "accepted"

    changed = job_document(aggregation=plain, silos=[{**silos[0], "codec": HALF.model_dump()}, silos[1]])
    admin.patch_job(job=parse_job(changed))
    assert admin.spec().spec.silo("alpha").codec == COMPACT  # in force for the rest of round 1
    aggregator.stop()
    aggregator.start()
    b = to_bytes(_delta(2))
    assert beta.put_update(1, b, n_examples=10, train_seconds=1.0).outcome.value == "accepted"
    _wait_version(admin, 1)
    decoded = decode(a, COMPACT, schema_of(_v0()), len(a), set())
    expected = {n: _v0()[n] + (30 * decoded[n] + 10 * _delta(2)[n]) / 40 for n in names}
    got = from_bytes(alpha.adapter(1))
    for name in names:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name

    assert admin.spec().spec.silo("alpha").codec == HALF  # round 2: the new codec, and only it
    assert _put(aggregator, "alpha", 2, encode(_delta(3), COMPACT, names)[0]).json()["reason"] == "bad_codec"
    half, _ = encode(_delta(3), HALF, names)
    assert alpha.put_update(2, half, n_examples=30, train_seconds=1.0).outcome.value == "accepted"
