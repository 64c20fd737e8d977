"""Token rotation through the FederatedJob: the operator against kmock and a REAL aggregator process.

The aggregator (`python -m fedsilo aggregator`, SQLite) is started as its pod would be: with
the job's ConfigMap document, the tokens Secret's admin token and silo tokens. The operator
reaches it at its in-cluster URL through a transport that forwards to 127.0.0.1 (the network
boundary); the transport also counts the rotation calls.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.aggregator.conftest import AggregatorProcess
from tests.operator.test_handlers_kmock import (
    JOB_API,
    NS,
    NS_B,
    all_children_of,
    condition,
    eventually,
    job_manifest,
    kmock_cluster,
    operator_settings,
    posted_events,
    running_operator,
)

from fedsilo.local.runner import free_port
from fedsilo.operator import rotation
from fedsilo.operator.kube import KubeClient
from fedsilo.operator.tokens import decode, tokens_from_secret

SILO_SECRETS = {"a": (NS, "demo-silo-a-token"), "b": (NS_B, "demo-silo-b-token"), "c": (NS, "demo-silo-c-token")}


@dataclass
class Forward:
    """The operator's aggregator transport: every request goes to the real process on 127.0.0.1."""

    port: int
    calls: list[tuple[str, str]] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)  # paths whose next request the network drops

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        if request.url.path in self.cut_once:
            self.cut_once.discard(request.url.path)
            raise httpx.ConnectError("connection cut (injected)", request=request)
        url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.request(request.method, url, headers=headers, content=request.content)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-encoding", "content-length")}
        return httpx.Response(answer.status_code, headers=kept, content=answer.content)

    def rotations(self) -> list[str]:
        return [path for method, path in self.calls if method == "POST" and path.endswith("/token")]


async def silo_tokens(kube: KubeClient) -> dict[str, str]:
    """The token each silo's Secret holds."""
    found = {}
    for silo, (namespace, name) in SILO_SECRETS.items():
        secret = await kube.get("v1", "Secret", namespace, name) or {}
        found[silo] = decode(secret["data"]["token"])
    return found


async def accepted(agg: AggregatorProcess, silo: str, token: str) -> bool:
    """Whether the aggregator lets `token` act as `silo` (a silo-only route: 409 `not_joined` is past
    authentication, 401 is not)."""
    async with httpx.AsyncClient(base_url=agg.url, timeout=5) as client:
        response = await client.get(f"/v1/jobs/demo/silos/{silo}/task", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code in (200, 401, 409), response.text
    return response.status_code != 401


async def start_aggregator(kube: KubeClient, forward: Forward, tmp_path: Path) -> AggregatorProcess:
    """The aggregator as its pod starts it: the ConfigMap's document, the tokens Secret's tokens."""
    config = await kube.get("v1", "ConfigMap", NS, "demo-job") or {}
    secret = await kube.get("v1", "Secret", NS, "demo-tokens")
    tokens = tokens_from_secret(secret)
    assert tokens is not None
    (tmp_path / "job.yaml").write_text(config["data"]["job.yaml"])
    (tmp_path / "silo-tokens.json").write_text(json.dumps(tokens.silos))
    agg = AggregatorProcess(
        f"http://127.0.0.1:{forward.port}",
        tokens.admin,
        f"sqlite:///{tmp_path / 'fedsilo.db'}",
        tmp_path / "checkpoints",
        tmp_path / "aggregator.log",
        env={
            "FEDSILO_JOB_FILE": str(tmp_path / "job.yaml"),
            "FEDSILO_SILO_TOKENS_FILE": str(tmp_path / "silo-tokens.json"),
            "FEDSILO_INSECURE_HTTP": "true",  # plain HTTP on 127.0.0.1 (TLS may become the default)
        },
    )
    await asyncio.to_thread(agg.start)
    return agg


async def annotate(kube: KubeClient, value: str) -> None:
    await kube.patch(*JOB_API, NS, "demo", {"metadata": {"annotations": {rotation.ROTATE_ANNOTATION: value}}})


async def rotation_of(kube: KubeClient) -> dict[str, Any]:
    return ((await kube.get(*JOB_API, NS, "demo") or {}).get("status") or {}).get(rotation.STATUS_FIELD) or {}


async def rotate_through_the_resource(tmp_path: Path) -> None:
    forward = Forward(free_port())
    settings = operator_settings(token_grace_seconds=600)
    async with kmock_cluster() as cluster:
        kube, emulator = cluster.kube, cluster.emulator
        assert emulator is not None
        async with running_operator(cluster, forward, settings):  # type: ignore[arg-type]
            await cluster.create_job(job_manifest())
            await eventually(lambda: all_children_of(kube), "all children")
            agg = await start_aggregator(kube, forward, tmp_path)
            try:
                before = tokens_from_secret(await kube.get("v1", "Secret", NS, "demo-tokens"))
                assert before is not None and await silo_tokens(kube) == before.silos
                assert await accepted(agg, "a", before.silos["a"])

                # 1. Annotate: every silo's token is rotated at the aggregator and in its Secret. The
                # network drops silo b's rotation once: the retry sends the same tokens again (silo a's
                # is already in force: its grace period is not cut short).
                forward.cut_once.add("/v1/jobs/demo/silos/b/token")
                await annotate(kube, "1")

                async def handled(value: str) -> dict[str, Any] | None:
                    done = await rotation_of(kube)
                    found = await condition(cluster, rotation.TOKENS_ROTATED)
                    return done if done.get("value") == value and found.get("status") == "True" else None

                done = await eventually(lambda: handled("1"), "rotation 1 handled")
                assert done["silos"] == ["a", "b", "c"]
                after = tokens_from_secret(await kube.get("v1", "Secret", NS, "demo-tokens"))
                assert after is not None and after.admin == before.admin
                assert set(after.silos) == {"a", "b", "c"}
                assert all(after.silos[s] != before.silos[s] for s in after.silos)
                assert await silo_tokens(kube) == after.silos
                for silo in ("a", "b", "c"):
                    assert await accepted(agg, silo, after.silos[silo])  # the new token
                    assert await accepted(agg, silo, before.silos[silo])  # the old one, in its grace period
                assert not await accepted(agg, "a", after.silos["b"])
                secret = await kube.get("v1", "Secret", NS, "demo-tokens") or {}
                assert secret["metadata"]["annotations"][rotation.HANDLED_ANNOTATION] == "1"
                assert rotation.rotation_state(secret) == rotation.RotationState(handled="1")
                assert forward.rotations() == [f"/v1/jobs/demo/silos/{s}/token" for s in ("a", "b", "a", "b", "c")]

                async def rotated_event() -> list[dict[str, Any]]:
                    return [e for e in posted_events(emulator) if e.get("reason") == rotation.TOKENS_ROTATED]

                (event,) = await eventually(rotated_event, "a TokensRotated Event")
                assert event["type"] == "Normal" and "previous tokens work until" in event["message"]

                def warnings() -> list[dict[str, Any]]:
                    return [e for e in posted_events(emulator) if e.get("reason") == "TokensNotRotated"]

                (cut,) = warnings()  # the dropped request, while it lasted
                assert cut["type"] == "Warning" and "connection cut (injected)" in cut["message"]

                # 2. The same value again (timer ticks, a reconcile): nothing rotates.
                await kube.patch(*JOB_API, NS, "demo", {"spec": {"training": {"rounds": 4}}})
                await asyncio.sleep(2.0)  # several timer intervals and the spec change's reconcile
                assert forward.rotations() == [f"/v1/jobs/demo/silos/{s}/token" for s in ("a", "b", "a", "b", "c")]
                assert await silo_tokens(kube) == after.silos
            finally:
                await asyncio.to_thread(agg.stop)

            # 3. A new value while the aggregator is down: visible, retried, the new tokens pending.
            await annotate(kube, "2")

            async def unreachable() -> dict[str, Any] | None:
                found = await condition(cluster, rotation.TOKENS_ROTATED)
                return found if found.get("status") == "False" else None

            found = await eventually(unreachable, "TokensRotated=False")
            assert found["reason"] == "AggregatorUnreachable"

            async def warning() -> list[dict[str, Any]]:
                return [e for e in warnings() if "All connection attempts failed" in e["message"]]

            (event,) = await eventually(warning, "a TokensNotRotated Warning")
            assert event["type"] == "Warning"
            pending = rotation.rotation_state(await kube.get("v1", "Secret", NS, "demo-tokens"))
            assert pending.handled == "1" and pending.pending_value == "2" and set(pending.pending) == {"a", "b", "c"}
            assert await silo_tokens(kube) == after.silos  # nothing handed out before the aggregator has it

        # 4. The aggregator comes back and the operator restarts (as after a crash): the pending
        # tokens are the ones rotated in, not a second set.
        agg = await start_aggregator(kube, forward, tmp_path)
        async with running_operator(cluster, forward, settings):  # type: ignore[arg-type]
            try:
                await eventually(lambda: handled("2"), "rotation 2 handled after the restart")
                assert await silo_tokens(kube) == pending.pending
                assert rotation.rotation_state(await kube.get("v1", "Secret", NS, "demo-tokens")) == (
                    rotation.RotationState(handled="2")
                )
                for silo in ("a", "b", "c"):
                    assert await accepted(agg, silo, pending.pending[silo])
                    assert await accepted(agg, silo, after.silos[silo])  # rotation 1's token, in its grace
                    assert not await accepted(agg, silo, before.silos[silo])  # two rotations ago: refused
            finally:
                await asyncio.to_thread(agg.stop)


@pytest.mark.timeout(300)
def test_annotation_rotates_silo_tokens_once_with_a_grace_period(tmp_path: Path) -> None:
    asyncio.run(rotate_through_the_resource(tmp_path))
