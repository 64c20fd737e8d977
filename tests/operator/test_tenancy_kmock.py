"""The operator refuses what the tenancy policy forbids, end to end against kmock.

A refused job gets no children at all (not one write of a child kind), the condition
`Admitted=False` with the reasons, a Warning Event and phase Failed; fixed, it is admitted.
An admitted job edited into a forbidden one runs on as it was: no new child, the spec not
sent to the aggregator. A namespace that opts in by label admits the job (here at the next
resync: kmock serves no Namespace watch; the real-server test shows the watch).
"""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
from tests.operator.test_handlers_kmock import (
    JOB_API,
    NS,
    NS_B,
    FakeAggregator,
    all_children_of,
    condition,
    eventually,
    job_manifest,
    kmock_cluster,
    operator_settings,
    posted_events,
    running_operator,
    silo,
)

from fedsilo.operator.kube import CHILD_KINDS, KINDS

HOSPITAL = "hospital-h"
LABEL = "fedsilo.io/silos"


def written(emulator: kmock.KubernetesEmulator) -> set[tuple[Any, ...]]:
    """(resource, namespace, name) of every child object written so far."""
    return {(r.resource, r.namespace, r.name) for r in child_writes(emulator)}


def child_writes(emulator: kmock.KubernetesEmulator) -> list[Any]:
    """Every POST, PATCH or PUT the emulator saw on a kind the operator creates."""
    writes = []
    for api_version, kind in CHILD_KINDS:
        for request in emulator[kmock.resource(f"{api_version}/{KINDS[kind][0]}")]:
            if request.method in ("POST", "PATCH", "PUT"):
                writes.append(request)
    return writes


def forbidden_job() -> dict[str, Any]:
    """Silo b in a namespace nobody opened, silo a on a node's folder, an unknown aggregator image."""
    manifest = job_manifest()
    spec = manifest["spec"]
    spec["silos"][0]["volume"] = {"hostPath": "/var/lib/hospital-a"}
    spec["silos"][1]["namespace"] = HOSPITAL
    spec["aggregator"] = {"image": "attacker.example/aggregator:1"}
    return manifest


async def refused_then_fixed() -> None:
    fake = FakeAggregator()
    async with kmock_cluster() as cluster, running_operator(cluster, fake, operator_settings()):
        kube, emulator = cluster.kube, cluster.emulator
        assert emulator is not None
        await cluster.create_job(forbidden_job())

        async def refused() -> dict[str, Any] | None:
            found = await condition(cluster, "Admitted")
            return found if found.get("status") == "False" else None

        admitted = await eventually(refused, "Admitted=False")
        assert admitted["reason"] == "Refused"
        for words in (f"silo b: namespace {HOSPITAL} is not open", "silo a: hostPath volumes are refused",
                      "spec.aggregator.image attacker.example/aggregator:1 is not allowed"):
            assert words in admitted["message"], admitted["message"]
        status = ((await cluster.job()) or {})["status"]
        assert status["phase"] == "Failed" and status["message"].startswith("refused by the operator's tenancy")

        async def refusals() -> list[dict[str, Any]]:  # kopf posts Events from a queue, after the status
            return [e for e in posted_events(emulator) if e.get("reason") == "Refused"]

        warnings = await eventually(refusals, "the Refused Event")
        assert warnings[0]["type"] == "Warning"
        await asyncio.sleep(1.0)  # the status timer and the resync have had their chance
        assert child_writes(emulator) == []
        assert fake.tokens_seen == set()  # no aggregator is asked about a job that never ran

        # Fixed by an edit: admitted, children created, Pending until the aggregator answers.
        spec = job_manifest()["spec"]
        await kube.patch(*JOB_API, NS, "demo", {"spec": {"silos": spec["silos"], "aggregator": None}})
        await eventually(lambda: all_children_of(kube), "all children once admitted")

        async def admitted_event() -> list[dict[str, Any]]:
            return [e for e in posted_events(emulator) if e.get("reason") == "Admitted"]

        (event,) = await eventually(admitted_event, "a Normal Admitted Event")
        assert event["type"] == "Normal"
        assert (await condition(cluster, "Admitted"))["status"] == "True"

        async def running() -> bool:
            return ((await cluster.job()) or {}).get("status", {}).get("phase") == "Running"

        await eventually(running, "the aggregator's phase")


def test_a_forbidden_job_gets_no_children_until_fixed() -> None:
    asyncio.run(refused_then_fixed())


async def change_refused_then_opted_in() -> None:
    fake = FakeAggregator()
    settings = operator_settings(silo_namespace_label=f"{LABEL}=allowed", resync_seconds=1.0)
    async with kmock_cluster() as cluster:
        kube, emulator = cluster.kube, cluster.emulator
        assert emulator is not None
        # kmock parses /api/v1/namespaces/<name> as a namespace, not an object: served by hand.
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": HOSPITAL, "labels": {}}}
        emulator[f"get /api/v1/namespaces/{HOSPITAL}"] << (lambda: namespace)
        async with running_operator(cluster, fake, settings):
            await cluster.create_job(job_manifest())
            await eventually(lambda: all_children_of(kube), "all children")

            async def running() -> bool:
                return ((await cluster.job()) or {}).get("status", {}).get("phase") == "Running"

            await eventually(running, "Running")
            before = written(emulator)

            # An edit puts a silo in a namespace that has not opted in: refused, the job runs on.
            silos = [*job_manifest()["spec"]["silos"], silo("h", namespace=HOSPITAL)]
            await kube.patch(*JOB_API, NS, "demo", {"spec": {"silos": silos}})

            async def change_refused() -> dict[str, Any] | None:
                found = await condition(cluster, "Admitted")
                return found if found.get("reason") == "ChangeRefused" else None

            found = await eventually(change_refused, "Admitted=False ChangeRefused")
            assert found["status"] == "False" and f"namespace {HOSPITAL}" in found["message"]
            assert f"labelled {LABEL}=allowed" in found["message"]

            async def not_sent() -> dict[str, Any] | None:
                found = await condition(cluster, "ConfigApplied")
                return found if found.get("reason") == "NotAdmitted" else None

            await eventually(not_sent, "ConfigApplied=False NotAdmitted")
            await asyncio.sleep(1.5)  # a resync and a spec retry later: still nothing new
            assert written(emulator) == before  # resyncs re-apply, but nothing new
            assert not [p for p in fake.patches if "job" in p]
            assert ((await cluster.job()) or {})["status"]["phase"] == "Running"

            async def change_refusals() -> list[str]:
                return [e["type"] for e in posted_events(emulator) if e.get("reason") == "ChangeRefused"]

            assert await eventually(change_refusals, "the ChangeRefused Event") == ["Warning"]

            # The namespace opts in: admitted, the new silo's children follow, the spec is sent.
            namespace["metadata"]["labels"] = {LABEL: "allowed"}

            async def silo_h() -> bool:
                return bool(await kube.get("batch/v1", "Job", HOSPITAL, "demo-silo-h")) and bool(
                    await kube.get("v1", "Secret", HOSPITAL, "demo-silo-h-token")
                )

            await eventually(silo_h, "silo h's Job and token Secret")

            async def admitted() -> bool:
                return (await condition(cluster, "Admitted")).get("status") == "True"

            await eventually(admitted, "Admitted=True")

            async def sent() -> bool:
                return any("h" in {s["name"] for s in p["job"]["spec"]["silos"]} for p in fake.patches if "job" in p)

            await eventually(sent, "the admitted spec sent to the aggregator")
            assert await kube.get("batch/v1", "Job", NS_B, "demo-silo-b")
            assert {ns for _, ns, _ in written(emulator) - before} == {HOSPITAL, NS}  # silo h + its policy


def test_an_edit_into_a_forbidden_namespace_creates_nothing_until_it_opts_in() -> None:
    asyncio.run(change_refused_then_opted_in())
