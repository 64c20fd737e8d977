"""Secure aggregation and client-level DP over real HTTP against real aggregator processes.

Scripted silos run the silo agent's own SecAgg code (`silo_agent/secure.py`) with small
random deltas, concurrently, so every stage barrier is crossed for real; the expected
adapters are computed here from the plain deltas the aggregator never saw.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from tests.aggregator.conftest import AggregatorProcess, postgres_database
from tests.aggregator.test_reliability import Hub, State, combine, document, process, tokens_for, v0

from fedsilo.adapters import to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client, Outcome
from fedsilo.privacy import secagg
from fedsilo.silo_agent.secure import SecureRound, SitOut

SILOS = ["s1", "s2", "s3", "s4", "s5"]


def plain(silo: str, round_: int) -> State:
    g = torch.Generator().manual_seed(hash((silo, round_)) % 2**31)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in v0().items()}


def examples(silo: str) -> int:
    return 10 * (SILOS.index(silo) + 1)


def run_silo(agg: AggregatorProcess, token: str, silo: str, rounds: int, drop_in: int | None = None) -> None:
    """A scripted secure silo: `drop_in` = the round in which it stops after sharing its keys."""
    client = Client(agg.url, "demo", token, silo, retries=None)
    done = 0
    try:
        while done < rounds:
            task = client.task(wait=5)
            if task.action == "done":
                return
            if task.action != "train":
                time.sleep(0.1)
                continue
            assert task.secure
            secure = SecureRound(client, silo, task.round)
            try:
                secure.exchange_keys()
                if task.round == drop_in:
                    return  # crashed while training: its keys and shares are out, its update never comes
                data = secure.masked(plain(silo, task.round), task, examples(silo))
                upload = client.put_update(task.round, data, examples(silo), 0.1)
                assert upload.outcome is Outcome.ACCEPTED, upload
                secure.reveal()
                done += 1
            except SitOut:  # the round failed or went on without us: this script's part ends here
                return
    finally:
        client.close()


def secure_hub(tmp_path: Path, url: str, silos: list[str], **aggregation: Any) -> tuple[Hub, AggregatorProcess]:
    agg = process(tmp_path, url, "aggregator", FEDSILO_LEASE_SECONDS="2")  # a killed holder's lease expires fast
    agg.start()
    hub = Hub(agg.url, agg.admin, tokens_for(*silos))
    doc = document(silos, secure=True, minSilos=2, **aggregation)
    doc["spec"]["training"]["rounds"] = 2
    assert hub.create(doc).status_code == 201, hub.create(doc).text
    for silo in silos:
        r = hub.join(silo)
        assert r.status_code == 200, r.text
    assert hub.init(silos[0]).status_code == 200
    return hub, agg


def run_all(hub: Hub, agg: AggregatorProcess, silos: list[str], rounds: int, drops: dict[str, int]) -> None:
    threads = [
        threading.Thread(target=run_silo, args=(agg, hub.tokens[s], s, rounds, drops.get(s)), daemon=True)
        for s in silos
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a scripted silo hung"


def assert_close(got: State, want: State, silos: int) -> None:
    for k in want:  # fixed point: each silo's weighted value rounds to 2^-25, the mean divides by the weight
        assert torch.allclose(got[k], want[k], atol=silos * 2.0**-24, rtol=0), k


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_masked_sum_equals_the_plain_weighted_mean(tmp_path: Path, backend: str) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}" if backend == "sqlite" else postgres_database()
    silos = SILOS[:4]
    hub, agg = secure_hub(tmp_path, url, silos)
    try:
        run_all(hub, agg, silos, 2, {})
        hub.wait_for("the end", lambda s: s["phase"] == "Succeeded")
        v1 = combine(v0(), [(plain(s, 1), examples(s)) for s in silos])
        assert_close(hub.adapter(1), v1, len(silos))
        v2 = combine(v1, [(plain(s, 2), examples(s)) for s in silos])
        assert_close(hub.adapter(2), v2, len(silos))
        assert hub.status()["privacy"]["secure_aggregation"] is True
    finally:
        agg.stop()


@pytest.mark.parametrize("strategy", ["clipped-fedavg", "ffa-lora"])
def test_silo_side_strategy_contracts_hold_under_masking(tmp_path: Path, strategy: str) -> None:
    """clipped-fedavg: the silo clips (the hub cannot); ffa-lora: A is left out of the vector and stays exact."""
    silos = SILOS[:3]
    params = {"clip_norm": 0.3} if strategy == "clipped-fedavg" else {}
    hub, agg = secure_hub(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", silos, strategy=strategy, params=params)
    clients = {s: Client(agg.url, "demo", hub.tokens[s], s, retries=None) for s in silos}
    try:
        task = clients[silos[0]].task()  # the strategy's silo-side hooks ride on the task
        assert task.secure and task.client_config == (
            {"clip_norm": 0.3} if strategy == "clipped-fedavg" else {"freeze_lora_a": True}
        )
        rounds = exchanged(clients, 1)
        deltas = {s: plain(s, 1) for s in silos}
        if strategy == "ffa-lora":
            deltas = {s: {k: v * 0 if "lora_A" in k else v for k, v in d.items()} for s, d in deltas.items()}
        sizes = set()
        for s in silos:
            data = rounds[s].masked(deltas[s], task, examples(s))
            sizes.add(len(data))
            assert clients[s].put_update(1, data, examples(s), 0.1).outcome is Outcome.ACCEPTED
        parallel(lambda s: rounds[s].reveal(), silos)
        hub.wait_for("round 1 closed", lambda st: st["version"] >= 1)
        if strategy == "clipped-fedavg":
            want = combine(v0(), [(clip(deltas[s], 0.3), examples(s)) for s in silos])
            assert sizes == {8 * sum(v.numel() for v in v0().values())}
        else:
            want = combine(v0(), [(deltas[s], examples(s)) for s in silos])
            assert sizes == {8 * v0()["classifier.weight"].numel()}  # only what is trained travels
            assert torch.equal(hub.adapter(1)["m.lora_A.weight"], v0()["m.lora_A.weight"])
        assert_close(hub.adapter(1), want, len(silos))
    finally:
        for c in clients.values():
            c.close()
        agg.stop()


def test_round_completes_when_silos_drop_after_masking_keys(tmp_path: Path) -> None:
    """5 silos, t = ceil(0.6 * 5) = 3: two may drop after sharing, the sum is exact over the rest."""
    hub, agg = secure_hub(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", SILOS, roundTimeoutSeconds=10)
    try:
        run_all(hub, agg, SILOS, 1, {"s4": 1, "s5": 1})
        rounds = hub.wait_for("round 1 closed", lambda s: s["version"] >= 1)
        assert rounds["phase"] in ("Running", "Succeeded")
        survivors = ["s1", "s2", "s3"]
        assert_close(hub.adapter(1), combine(v0(), [(plain(s, 1), examples(s)) for s in survivors]), 3)
        first = hub.rounds()[0]
        assert first["updates"] == 3
    finally:
        agg.stop()


def test_too_many_dropouts_fail_the_round_and_resume_starts_it_over(tmp_path: Path) -> None:
    silos = SILOS[:3]  # t = ceil(0.6 * 3) = 2
    hub, agg = secure_hub(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", silos, roundTimeoutSeconds=8)
    try:
        run_all(hub, agg, silos, 1, {"s2": 1, "s3": 1})
        failed = hub.wait_for("failure", lambda s: s["phase"] == "Failed")
        assert "secure round 1" in failed["message"] and "resume" in failed["message"]
        assert hub.patch({"resume": True}).status_code == 200
        run_all(hub, agg, silos, 2, {})
        hub.wait_for("the end", lambda s: s["phase"] == "Succeeded")
        v1 = combine(v0(), [(plain(s, 1), examples(s)) for s in silos])
        assert_close(hub.adapter(1), v1, 3)
    finally:
        agg.stop()


def test_stored_bytes_hold_no_unmasked_update(tmp_path: Path) -> None:
    """Every file and the whole database, read while the round waits for reveals: no plain update."""
    silos = SILOS[:3]
    hub, agg = secure_hub(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", silos)
    clients = {s: Client(agg.url, "demo", hub.tokens[s], s, retries=None) for s in silos}
    try:
        rounds = exchanged(clients, 1)
        for s in silos:
            task = clients[s].task()
            assert task.action == "wait"  # it posted keys: no second training of this round
            data = rounds[s].masked(plain(s, 1), m.Task(action="train", round=1, secure=True), examples(s))
            assert clients[s].put_update(1, data, examples(s), 0.1).outcome is Outcome.ACCEPTED
        stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "aggregator.log")
        for s in silos:
            delta = plain(s, 1)
            weighted = np.concatenate([delta[k].double().reshape(-1).numpy() for k in sorted(delta)]) * examples(s)
            for needle in (
                to_bytes(delta),  # the delta as a plain upload
                delta["classifier.weight"].numpy().tobytes()[:32],  # its raw float32 values
                secagg.encode(weighted).astype("<u8").tobytes()[:32],  # its fixed-point encoding
            ):
                assert needle not in stored, f"{s}'s update is stored in the clear"
        parallel(lambda s: rounds[s].reveal(), silos)
        hub.wait_for("round 1 closed", lambda s: s["version"] >= 1)
    finally:
        for c in clients.values():
            c.close()
        agg.stop()


def test_a_restarted_silo_sits_the_round_out(tmp_path: Path) -> None:
    silos = SILOS[:3]
    hub, agg = secure_hub(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", silos)
    client = Client(agg.url, "demo", hub.tokens["s1"], "s1", retries=None)
    try:
        lost = secagg.RoundKeys.generate(secagg.context_for("demo", 1))
        client.secagg_put(1, "keys", m.SecAggKeys(**lost.public().to_wire()))
        assert client.task().action == "wait"  # keys are out, the private half is gone with the "old process"
        with pytest.raises(SitOut):
            SecureRound(client, "s1", 1).exchange_keys()
    finally:
        client.close()
        agg.stop()


@pytest.mark.parametrize("secure", [False, True])
def test_epsilon_after_each_round_matches_the_accountant(tmp_path: Path, secure: bool) -> None:
    silos = SILOS[:3]
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", "aggregator")
    agg.start()
    hub = Hub(agg.url, agg.admin, tokens_for(*silos))
    doc = document(silos, secure=secure, minSilos=2)
    doc["spec"]["training"]["rounds"] = 3
    doc["spec"]["privacy"] = {"dp": {"clipNorm": 0.5, "noiseMultiplier": 1.3, "delta": 1e-5}}
    try:
        assert hub.create(doc).status_code == 201
        for s in silos:
            hub.join(s)
        hub.init(silos[0])
        if secure:
            run_all(hub, agg, silos, 3, {})
        else:
            for r in (1, 2, 3):
                hub.wait_for(f"round {r}", lambda st, r=r: st["round"] == r and st["phase"] == "Running")
                for s in silos:
                    assert hub.upload(s, r, plain(s, r), examples(s)).status_code == 200
                hub.wait_for(f"version {r}", lambda st, r=r: st["version"] >= r)
        status = hub.wait_for("the end", lambda s: s["phase"] == "Succeeded")
        accountant = RDPAccountant()
        accountant.history = [(1.3, 1.0, 3)]
        assert status["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        per_round = [r["metrics"]["epsilon"] for r in hub.rounds()]
        assert per_round == sorted(per_round) and len(per_round) == 3
        metrics = httpx_get(f"{agg.url}/metrics", agg.admin)
        assert f'fedsilo_privacy_epsilon{{job="demo"}} {status["privacy"]["epsilon"]}' in metrics
        noise = []
        for r in (1, 2, 3):
            before, after = hub.adapter(r - 1), hub.adapter(r)
            noiseless = combine(before, [(clip(plain(s, r), 0.5), 1.0) for s in silos])
            noise += [(after[k] - noiseless[k]).reshape(-1) for k in after]
        # The mean carries noise of std sigma * C / 3 per coordinate; under secure aggregation each of
        # the 3 silos adds variance (sigma * C)^2 / t with t = 2, so sqrt(3 / 2) times that. 108 samples:
        # the sample std is within 25 % of the truth with overwhelming probability (> 3.6 sd).
        expected = 1.3 * 0.5 / 3 * (math.sqrt(3 / 2) if secure else 1.0)
        assert 0.75 * expected < float(torch.cat(noise).std()) < 1.25 * expected
    finally:
        agg.stop()


def test_target_epsilon_stops_the_job_inside_the_budget(tmp_path: Path) -> None:
    silos = SILOS[:2]
    agg = process(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", "aggregator")
    agg.start()
    hub = Hub(agg.url, agg.admin, tokens_for(*silos))
    doc = document(silos, minSilos=2)
    doc["spec"]["training"]["rounds"] = 10
    one, two = (epsilon_after(2.0, k) for k in (1, 2))
    doc["spec"]["privacy"] = {"dp": {"clipNorm": 1, "noiseMultiplier": 2.0, "targetEpsilon": (one + two) / 2}}
    try:
        assert hub.create(doc).status_code == 201
        for s in silos:
            hub.join(s)
        hub.init(silos[0])
        for s in silos:
            assert hub.upload(s, 1, plain(s, 1), examples(s)).status_code == 200
        status = hub.wait_for("the stop", lambda st: st["phase"] == "Succeeded")
        assert status["version"] == 1 and "privacy budget" in status["message"]
        assert status["privacy"]["epsilon"] == pytest.approx(one) and one <= status["privacy"]["target_epsilon"]
        more = hub.patch({"rounds": 20})
        assert more.status_code == 409 and more.json()["reason"] == "budget_exhausted"
        assert hub.status()["phase"] == "Succeeded"
        too_tight = document(silos, minSilos=2)
        too_tight["metadata"]["name"] = "tight"
        too_tight["spec"]["privacy"] = {"dp": {"clipNorm": 1, "noiseMultiplier": 2.0, "targetEpsilon": one / 2}}
        refused = hub.create(too_tight)
        assert refused.status_code == 422 and "targetEpsilon" in refused.json()["detail"]
    finally:
        agg.stop()


def epsilon_after(sigma: float, rounds: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, rounds)]
    return float(accountant.get_epsilon(1e-5))


def clip(state: State, norm: float) -> State:
    total = float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())))
    return {k: v * min(1.0, norm / total) for k, v in state.items()}


def exchanged(clients: dict[str, Client], round_: int) -> dict[str, SecureRound]:
    """Every silo's secure round for `round_`, past the key and share stages (run concurrently)."""
    rounds = {s: SecureRound(c, s, round_) for s, c in clients.items()}
    parallel(lambda s: rounds[s].exchange_keys(), list(clients))
    return rounds


def parallel(fn: Callable[[str], None], silos: list[str]) -> None:
    errors: list[BaseException] = []

    def run(s: str) -> None:
        try:
            fn(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in silos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def httpx_get(url: str, token: str) -> str:
    import httpx

    return httpx.get(url, headers={"Authorization": f"Bearer {token}"}).text


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_aggregator_killed_mid_round_recovers_the_masked_sum_exactly(tmp_path: Path, backend: str) -> None:
    """SIGKILL between masked uploads and again between reveals: every fold counts exactly once."""
    url = f"sqlite:///{tmp_path / 'f.db'}" if backend == "sqlite" else postgres_database()
    silos = SILOS[:4]
    hub, agg = secure_hub(tmp_path, url, silos)
    clients = {s: Client(agg.url, "demo", hub.tokens[s], s, retries=None, backoff_cap=0.5) for s in silos}
    try:
        rounds = exchanged(clients, 1)
        task = m.Task(action="train", round=1, secure=True)
        masked = {s: rounds[s].masked(plain(s, 1), task, examples(s)) for s in silos}
        for s in silos[:2]:
            assert clients[s].put_update(1, masked[s], examples(s), 0.1).outcome is Outcome.ACCEPTED
        agg.kill()
        agg.start()  # same store, same port: the silos' clients retry into the new process
        assert clients[silos[0]].put_update(1, masked[silos[0]], examples(silos[0]), 0.1).outcome is Outcome.DUPLICATE
        for s in silos[2:]:
            assert clients[s].put_update(1, masked[s], examples(s), 0.1).outcome is Outcome.ACCEPTED
        rounds[silos[0]].reveal()
        agg.kill()
        agg.start()
        parallel(lambda s: rounds[s].reveal(), silos[1:])
        hub.wait_for("round 1 closed", lambda st: st["version"] >= 1, timeout=60)
        assert_close(hub.adapter(1), combine(v0(), [(plain(s, 1), examples(s)) for s in silos]), len(silos))
    finally:
        for c in clients.values():
            c.close()
        agg.stop()
