"""The operator end to end against the kmock Kubernetes emulator (or a real cluster).

Set FEDSILO_TEST_KUBECONFIG to a kubeconfig to run the same scenario against a real
cluster (the CRD is applied, namespaces fedsilo-test and fedsilo-test-b are created).
The aggregator is faked at the HTTP boundary with an httpx.MockTransport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import kmock
import kopf
import pytest
import yaml

from fedsilo.operator import naming
from fedsilo.operator.children import reconcile
from fedsilo.operator.crd import build_crd
from fedsilo.operator.handlers import build_registry
from fedsilo.operator.kube import CHILD_KINDS, KINDS, KubeClient
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tokens import decode, tokens_from_secret

KUBECONFIG = os.environ.get("FEDSILO_TEST_KUBECONFIG")
NS, NS_B = "fedsilo-test", "fedsilo-test-b"
JOB_API = ("fedsilo.io/v1alpha1", "FederatedJob")
TIMEOUT = 300.0  # generous: kmock serves ~10 requests/s on a loaded machine, and the operator backs off


def job_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "demo", "namespace": NS},
        "spec": {
            "baseModel": {"path": "/data/models/minilm"},
            "task": {"labels": ["neg", "pos"]},
            "training": {"rounds": 3},
            "silos": [
                {"name": "a", "data": {"path": "a.csv"}, "volume": {"emptyDir": True}},
                {"name": "b", "namespace": NS_B, "data": {"path": "b.csv"}},
                {"name": "c", "external": True, "data": {"path": "c.csv"}},
            ],
        },
    }


def operator_settings(**extra: Any) -> OperatorSettings:
    """Quick polls; silo b's namespace on the tenancy allow-list (the default admits only the job's own)."""
    return OperatorSettings(**{"silo_namespaces": NS_B, "poll_seconds": 0.3, **extra})


@dataclass
class FakeAggregator:
    """The aggregator's /v1 admin API at the HTTP boundary.

    It runs `document` (the job's FederatedJob document), answers spec changes and resumes
    as the real one does (422 `immutable`, 409 `not_failed`), and is down (503) while
    `available` is false.
    """

    phase: str = "Running"
    round: int = 2
    rounds: int = 3
    document: dict[str, Any] = field(default_factory=lambda: job_manifest())
    patches: list[dict[str, Any]] = field(default_factory=list)
    tokens_seen: set[str] = field(default_factory=set)
    admitted: dict[str, str] = field(default_factory=dict)
    available: bool = True
    refused: int = 0  # requests answered 503 while down
    immutable: str | None = None  # detail of a 422 answer to every spec change

    def problem(self, status: int, detail: str, reason: str | None) -> httpx.Response:
        return httpx.Response(status, json={"detail": detail, "reason": reason})

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.tokens_seen.add(request.headers.get("Authorization", ""))
        if not self.available:
            self.refused += 1
            return self.problem(503, "aggregator restarting", None)
        if request.method == "PATCH":
            body = json.loads(request.content)
            self.patches.append(body)
            if body.get("resume"):
                if self.phase != "Failed":
                    return self.problem(409, f"job demo is {self.phase}, not Failed", "not_failed")
                self.phase = "Running"
            if body.get("job"):
                if self.immutable:
                    return self.problem(422, self.immutable, "immutable")
                self.document = body["job"]
                self.rounds = body["job"]["spec"]["training"]["rounds"]
                self.admitted.update(body.get("silo_tokens") or {})
            if body.get("rounds"):
                self.rounds = body["rounds"]
        if request.url.path.endswith("/spec"):
            return httpx.Response(200, json=self.document)
        silos = [
            {
                "name": n,
                "role": "trainer",
                "state": "training",
                "joined": n != "c",
                "last_seen": "2026-01-01T00:00:05Z",
                "rounds_completed": 1,
            }
            for n in (s["name"] for s in self.document["spec"]["silos"])
        ]
        return httpx.Response(
            200,
            json={
                "name": "demo",
                "phase": self.phase,
                "message": "",
                "round": self.round,
                "rounds": self.rounds,
                "version": self.round,
                "accuracy": 0.81,
                "loss": 0.42,
                "silos": silos,
                "created_at": "2026-01-01T00:00:00Z",
                "started_at": "2026-01-01T00:00:01Z",
                "finished_at": "2026-01-01T00:09:00Z" if self.phase == "Succeeded" else None,
            },
        )


@dataclass
class Cluster:
    kube: KubeClient
    login: Callable[..., kopf.ConnectionInfo | None]
    emulator: kmock.KubernetesEmulator | None = None

    async def create_job(self, manifest: dict[str, Any]) -> None:
        if self.emulator is not None:  # kmock assigns no uid; ownerReferences need one
            manifest["metadata"].update(uid="2d1c0e7a-uid", generation=1)
        await self.kube.create(manifest)

    async def job(self) -> dict[str, Any] | None:
        return await self.kube.get(*JOB_API, NS, "demo")


class VersionedEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus a resourceVersion bumped on every write (and metadata.generation
    on every change of spec), as a real server does.

    kopf waits for the echo of its own patches by resourceVersion; without it, every
    handler sees a stale body (and re-runs) until kopf's consistency timeout. JSON patches
    carry kopf's resourceVersion test and are refused (422) when the object changed since, and
    merge patches naming a resourceVersion are refused (409) likewise, so the operator's status
    writes (conditions merged into the freshest body) are checked.
    """

    _version = 1

    async def _handle(self, request: Any) -> Any:
        if request.method == "PATCH" and "apply-patch" in request.headers.get("Content-Type", ""):
            await self._apply_creates(request)
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE) and request.data is not None:
            self._version += 1
            version = str(self._version)
            key = (request.resource, request.namespace, request.name)
            stored = self.objects[key].get("metadata", {}).get("resourceVersion") if key in self.objects else None
            if isinstance(request.data, dict):
                # A write that names a resourceVersion is a precondition, as on a real server.
                expected = (request.data.get("metadata") or {}).get("resourceVersion")
                stale = expected is not None and stored is not None and expected != stored
                if request.action == kmock.action.UPDATE and stale:
                    raise kmock.KubernetesError(409, "Conflict", "the object has been modified")
                request.data.setdefault("metadata", {})["resourceVersion"] = version
                if request.action == kmock.action.UPDATE and "spec" in request.data and key in self.objects:
                    # A change of spec bumps metadata.generation, as a real server does.
                    generation = self.objects[key].get("metadata", {}).get("generation") or 1
                    request.data["metadata"]["generation"] = generation + 1
            elif isinstance(request.data, list):  # JSON patch: the optimistic lock kopf relies on
                tests = [
                    op
                    for op in request.data
                    if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion"
                ]
                if any(op.get("value") != stored for op in tests):
                    raise kmock.KubernetesError(422, "Invalid", "the object has been modified")
                request.data[:] = [op for op in request.data if op not in tests]
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        elif request.action == kmock.action.DELETE and request.name is not None:
            # Soft deletion (finalizers) is a write too: the MODIFIED event needs a new version.
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                self._version += 1
                self.objects[key].patch({"metadata": {"resourceVersion": str(self._version)}})
        return await super()._handle(request)


    async def _apply_creates(self, request: Any) -> None:
        """Server-side apply creates a missing object (kmock's PATCH answers 404); the apply
        itself then proceeds as kmock's merge patch."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key in self._objects and not self._objects[key].deleted:
                return
            body = {**request.data, "metadata": {**request.data["metadata"], "uid": f"uid-{request.name}"}}
            if key in self._objects:
                self._objects[key].create(body)
            else:
                self._objects[key] = body
            await self._buses[request.resource].put({"type": "ADDED", "object": self._objects[key].raw})


@contextlib.asynccontextmanager
async def kmock_cluster() -> AsyncIterator[Cluster]:
    emulator = VersionedEmulator()
    emulator.resources["fedsilo.io/v1alpha1/federatedjobs"] = kmock.ResourceInfo(
        kind="FederatedJob",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )
    emulator.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False)
    for api_version, kind in CHILD_KINDS:  # watched by the operator (repairs)
        emulator.resources[f"{api_version}/{KINDS[kind][0]}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
        )
    emulator.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True)
    async with emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        kube = KubeClient.from_url(url)
        try:
            yield Cluster(kube, lambda **_: kopf.ConnectionInfo(server=url), emulator)
        finally:
            await kube.aclose()


@contextlib.asynccontextmanager
async def real_cluster() -> AsyncIterator[Cluster]:
    os.environ["KUBECONFIG"] = str(KUBECONFIG)
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert info is not None
    kube = KubeClient.from_connection(info)
    await kube.apply(build_crd())
    for ns in (NS, NS_B):
        await kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    await asyncio.sleep(2)  # CRD establishment
    try:
        yield Cluster(kube, kopf.login_with_kubeconfig)
    finally:
        await kube.aclose()


BACKENDS = [
    pytest.param(kmock_cluster, id="kmock"),
    pytest.param(
        real_cluster,
        id="cluster",
        marks=[
            pytest.mark.kubernetes,
            pytest.mark.skipif(not KUBECONFIG, reason="FEDSILO_TEST_KUBECONFIG unset"),
        ],
    ),
]


async def eventually(check: Callable[[], Awaitable[Any]], what: str, detail: Callable[[], Any] = lambda: "") -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what} {detail()}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_operator(
    cluster: Cluster,
    fake: FakeAggregator,
    settings: OperatorSettings,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[None]:
    """The operator in this process; the aggregator is `fake` (or `transport`, in front of it)."""
    transport = transport or httpx.MockTransport(fake.handle)
    registry = build_registry(settings, login=cluster.login, aggregator_transport=transport)

    @kopf.on.startup(registry=registry)
    def quick(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.scanning.disabled = True
        settings.watching.server_timeout = 30

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            clusterwide=not settings.namespaces(),  # as run_operator: the watched namespaces, else all
            namespaces=settings.namespaces(),
            standalone=True,
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    await asyncio.wait_for(ready.wait(), TIMEOUT)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


EXPECTED = [
    ("v1", "Secret", NS, "demo-tokens"),
    ("v1", "ConfigMap", NS, "demo-job"),
    ("v1", "PersistentVolumeClaim", NS, "demo-checkpoints"),
    ("v1", "Service", NS, "demo-aggregator"),
    ("apps/v1", "Deployment", NS, "demo-aggregator"),
    ("batch/v1", "Job", NS, "demo-silo-a"),
    ("batch/v1", "Job", NS_B, "demo-silo-b"),
    ("v1", "Secret", NS, "demo-silo-a-token"),
    ("v1", "Secret", NS_B, "demo-silo-b-token"),
    ("v1", "Secret", NS, "demo-silo-c-token"),
    ("networking.k8s.io/v1", "NetworkPolicy", NS, "demo-aggregator"),
    ("networking.k8s.io/v1", "NetworkPolicy", NS, "demo-silo-a"),
    ("networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b"),
]


def document_in_configmap(config: dict[str, Any] | None) -> Any:
    return yaml.safe_load((config or {}).get("data", {}).get("job.yaml", "{}"))


def stale_silo_deployment() -> dict[str, Any]:
    """A silo agent Deployment as an older operator made it (now replaced by a Job)."""
    labels = {naming.LABEL_JOB: "demo", naming.LABEL_JOB_NAMESPACE: NS, naming.LABEL_SILO: "a"}
    container = {"name": "silo-agent", "image": "ghcr.io/fedsilo/fedsilo:0.1.0"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "demo-silo-a", "namespace": NS, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def job_requests(emulator: kmock.KubernetesEmulator, method: str) -> list[Any]:
    """The requests of one HTTP method the emulator saw on batch/v1 Jobs."""
    return [r for r in emulator[kmock.resource("batch/v1/jobs")] if r.method == method]


async def snapshot(kube: KubeClient) -> dict[tuple[str, ...], Any]:
    """What matters of every child: labels, owners, spec/data (not server bookkeeping)."""
    out: dict[tuple[str, ...], Any] = {}
    for api_version, kind, ns, name in EXPECTED:
        obj = await kube.get(api_version, kind, ns, name) or {}
        meta = obj.get("metadata", {})
        out[(kind, ns, name)] = {
            "labels": meta.get("labels"),
            "owners": meta.get("ownerReferences"),
            "spec": obj.get("spec"),
            "data": obj.get("data"),
        }
    return out


async def scenario(backend: Callable[[], contextlib.AbstractAsyncContextManager[Cluster]]) -> None:
    fake = FakeAggregator()
    settings = operator_settings()
    async with backend() as cluster, running_operator(cluster, fake, settings):
        kube = cluster.kube
        await kube.create(stale_silo_deployment())
        await cluster.create_job(job_manifest())

        # 1. Every child appears, owned in the job's namespace, labelled in the other.
        async def all_children() -> bool:
            return all([await kube.get(a, k, ns, n) for a, k, ns, n in EXPECTED])

        await eventually(all_children, "all children")
        assert await kube.get("batch/v1", "Job", NS, "demo-silo-c") is None  # external
        # The silo agent of an older operator version (a Deployment) is pruned (after the apply).
        async def stale_pruned() -> bool:
            return await kube.get("apps/v1", "Deployment", NS, "demo-silo-a") is None

        await eventually(stale_pruned, "the old silo Deployment pruned")
        job = await cluster.job()
        assert job is not None
        for (_, ns, _), state in (await snapshot(kube)).items():
            assert state["labels"][naming.LABEL_JOB] == "demo"
            assert bool(state["owners"]) == (ns == NS)
            if ns == NS:
                assert state["owners"][0]["uid"] == job["metadata"]["uid"]

        # 2. Idempotence: the create delivered twice (or thrice) changes nothing; no rotation.
        before = await snapshot(kube)
        await reconcile(kube, job, settings)
        await reconcile(kube, job, settings)
        assert await snapshot(kube) == before
        if cluster.emulator is not None:  # a Job's pod template is immutable: never patched
            assert not job_requests(cluster.emulator, "PATCH")
            assert len(job_requests(cluster.emulator, "POST")) >= 2 * 3  # 409 on re-runs
        tokens = tokens_from_secret(await kube.get("v1", "Secret", NS, "demo-tokens"))
        assert tokens is not None and set(tokens.silos) == {"a", "b", "c"}

        # 3. Status from the aggregator (admin token), external silo join info.
        async def running() -> dict[str, Any] | None:
            status = ((await cluster.job()) or {}).get("status") or {}
            return status if status.get("phase") == "Running" and status.get("accuracy") else None

        status = await eventually(running, "Running status")
        assert f"Bearer {tokens.admin}" in fake.tokens_seen
        assert status["round"] == 2 and status["rounds"] == 3 and status["loss"] == 0.42
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["AggregatorReady"]["status"] == "True"
        assert conditions["SilosReady"]["status"] == "False" and "c" in conditions["SilosReady"]["message"]
        # No public URL yet: the external silo is told nothing rather than the in-cluster URL.
        assert status["externalSilos"] == [{"name": "c", "tokenSecret": "demo-silo-c-token"}]
        assert conditions["ExternalSilosReady"]["status"] == "False"
        assert conditions["ExternalSilosReady"]["reason"] == "ExternalUrlMissing"
        c_secret = await kube.get("v1", "Secret", NS, "demo-silo-c-token") or {}
        assert "aggregator-url" not in c_secret["data"]
        # The annotation, added after creation, is published without an operator restart.
        url = "https://fl.example.org"
        await kube.patch(*JOB_API, NS, "demo", {"metadata": {"annotations": {"fedsilo.io/external-url": url}}})

        async def published() -> dict[str, Any] | None:
            status = ((await cluster.job()) or {}).get("status") or {}
            secret = await kube.get("v1", "Secret", NS, "demo-silo-c-token") or {}
            in_secret = decode(secret.get("data", {}).get("aggregator-url", ""))
            return status if status.get("externalSilos", [{}])[0].get("aggregatorUrl") == url == in_secret else None

        status = await eventually(published, "external URL in status and in silo c's Secret")
        ready = {c["type"]: c for c in status["conditions"]}["ExternalSilosReady"]
        assert ready["status"] == "True" and ready["reason"] == "UrlPublished"
        assert status["startTime"] == "2026-01-01T00:00:01Z"

        # 4. Raising rounds reaches the aggregator and the ConfigMap.
        await kube.patch(*JOB_API, NS, "demo", {"spec": {"training": {"rounds": 5}}})

        async def rounds_applied() -> bool:
            config = await kube.get("v1", "ConfigMap", NS, "demo-job") or {}
            document = yaml.safe_load(config.get("data", {}).get("job.yaml", "{}"))
            return fake.rounds == 5 and document["spec"]["training"]["rounds"] == 5

        await eventually(rounds_applied, "rounds=5 at the aggregator and in the ConfigMap")
        # The whole document (the ConfigMap's) goes to the aggregator; no silo was added.
        sent = [p for p in fake.patches if "job" in p]
        assert sent[-1] == {
            "job": document_in_configmap(await kube.get("v1", "ConfigMap", NS, "demo-job")),
            "silo_tokens": {},
        }
        assert (await snapshot(kube))[("Secret", NS, "demo-tokens")] == before[("Secret", NS, "demo-tokens")]

        # 5. Completion: phase, condition, completion time, an Event.
        fake.phase, fake.round = "Succeeded", 5

        async def succeeded() -> dict[str, Any] | None:
            status = ((await cluster.job()) or {}).get("status") or {}
            return status if status.get("phase") == "Succeeded" else None

        status = await eventually(succeeded, "Succeeded status")
        assert status["completionTime"] == "2026-01-01T00:09:00Z"
        assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
        if cluster.emulator is not None:  # Events are posted in the background
            emulator = cluster.emulator

            async def completion_event() -> bool:
                events = emulator[kmock.resource("v1/events")]
                return "Succeeded" in [r.data.get("reason") for r in events if r.method == "POST"]

            await eventually(completion_event, "a Succeeded Event")

        # 6. Deletion removes every child in every namespace, then the job itself.
        await kube.delete(*JOB_API, NS, "demo")

        left: list[Any] = []

        async def all_gone() -> bool:
            labels = {naming.LABEL_JOB: "demo"}
            left[:] = [await kube.list(a, k, None, labels) for a, k in CHILD_KINDS]
            left[:] = [o["metadata"]["name"] for items in left for o in items]
            job = await cluster.job()
            if job is not None:
                left.append(job["metadata"])
            return not left

        await eventually(all_gone, "children and job deleted", lambda: left)
        if cluster.emulator is not None:
            # Silo Jobs in both namespaces went with their pods (the default would orphan them).
            deletes = job_requests(cluster.emulator, "DELETE")
            assert {(r.namespace, r.name) for r in deletes} == {
                (NS, "demo-silo-a"),
                (NS_B, "demo-silo-b"),
            }
            assert all(r.data["propagationPolicy"] == "Background" for r in deletes)
            assert not job_requests(cluster.emulator, "PATCH")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_lifecycle(backend: Any) -> None:
    asyncio.run(scenario(backend))


# ---- spec changes and resumes reach the aggregator (kmock: Job status is set by hand) ----


def posted_events(emulator: kmock.KubernetesEmulator) -> list[dict[str, Any]]:
    """The Events the operator posted (kopf posts them in the background)."""
    return [r.data for r in emulator[kmock.resource("v1/events")] if r.method == "POST"]


async def condition(cluster: Cluster, type_: str) -> dict[str, Any]:
    status = ((await cluster.job()) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


async def all_children_of(kube: KubeClient) -> bool:
    return all([await kube.get(a, k, ns, n) for a, k, ns, n in EXPECTED])


def silo(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "data": {"path": f"{name}.csv"}, **extra}


async def silos_added_and_removed() -> None:
    fake = FakeAggregator()
    async with kmock_cluster() as cluster, running_operator(cluster, fake, operator_settings()):
        kube, emulator = cluster.kube, cluster.emulator
        assert emulator is not None
        await cluster.create_job(job_manifest())
        await eventually(lambda: all_children_of(kube), "all children")
        before = tokens_from_secret(await kube.get("v1", "Secret", NS, "demo-tokens"))
        assert before is not None

        # Silo b leaves, silo d joins (in the job's namespace).
        silos = [silo("a", volume={"emptyDir": True}), silo("c", external=True), silo("d")]
        await kube.patch(*JOB_API, NS, "demo", {"spec": {"silos": silos}})

        async def applied() -> dict[str, Any] | None:
            found = await condition(cluster, "ConfigApplied")
            return found if found.get("status") == "True" and found.get("observedGeneration") == 2 else None

        found = await applied_condition(applied)
        assert found["observedGeneration"] == 2 and found["reason"] == "Applied"
        tokens = tokens_from_secret(await kube.get("v1", "Secret", NS, "demo-tokens"))
        assert tokens is not None and set(tokens.silos) == {"a", "c", "d"}
        assert tokens.admin == before.admin and tokens.silos["a"] == before.silos["a"]
        sent = [p for p in fake.patches if "job" in p]
        assert sent[-1]["silo_tokens"] == {"d": tokens.silos["d"]}
        assert [s["name"] for s in sent[-1]["job"]["spec"]["silos"]] == ["a", "c", "d"]
        assert sent[-1]["job"] == document_in_configmap(await kube.get("v1", "ConfigMap", NS, "demo-job"))
        assert fake.admitted == {"d": tokens.silos["d"]}

        # d gets its token Secret and Job; b's are gone.
        async def children_follow() -> bool:
            return (
                await kube.get("v1", "Secret", NS, "demo-silo-d-token") is not None
                and await kube.get("batch/v1", "Job", NS, "demo-silo-d") is not None
                and await kube.get("v1", "Secret", NS_B, "demo-silo-b-token") is None
                and await kube.get("batch/v1", "Job", NS_B, "demo-silo-b") is None
            )

        await eventually(children_follow, "silo d's children created, silo b's deleted")
        d_secret = await kube.get("v1", "Secret", NS, "demo-silo-d-token") or {}
        assert decode(d_secret["data"]["token"]) == tokens.silos["d"]

        async def applied_event() -> list[dict[str, Any]]:
            return [e for e in posted_events(emulator) if e.get("reason") == "ConfigApplied"]

        (event,) = await eventually(applied_event, "a ConfigApplied Event")
        assert event["type"] == "Normal"
        assert "silos added: d" in event["message"] and "silos removed: b" in event["message"]


async def applied_condition(check: Callable[[], Awaitable[Any]]) -> Any:
    return await eventually(check, "ConfigApplied=True")


async def refused_then_unreachable() -> None:
    fake = FakeAggregator()
    async with kmock_cluster() as cluster, running_operator(cluster, fake, operator_settings()):
        kube, emulator = cluster.kube, cluster.emulator
        assert emulator is not None
        await cluster.create_job(job_manifest())
        await eventually(lambda: all_children_of(kube), "all children")

        # 1. A change the aggregator cannot apply mid-job: refused, visible, not retried.
        fake.immutable = "spec.peft.r cannot change while the job runs"
        await kube.patch(*JOB_API, NS, "demo", {"spec": {"peft": {"r": 16}}})

        async def refused() -> dict[str, Any] | None:
            found = await condition(cluster, "ConfigApplied")
            return found if found.get("status") == "False" else None

        found = await eventually(refused, "ConfigApplied=False")
        assert found["reason"] == "Immutable" and found["message"] == fake.immutable
        assert found["observedGeneration"] == 2

        async def warning() -> list[dict[str, Any]]:
            return [e for e in posted_events(emulator) if e.get("reason") == "Immutable"]

        (event,) = await eventually(warning, "an Immutable Warning Event")
        assert event["type"] == "Warning" and event["message"] == fake.immutable
        attempts = len([p for p in fake.patches if "job" in p])
        await asyncio.sleep(1.0)
        assert len([p for p in fake.patches if "job" in p]) == attempts == 1  # no retry

        # 2. The admin reverts it and raises rounds while the aggregator is down: retried until up.
        fake.immutable, fake.available = None, False
        await kube.patch(*JOB_API, NS, "demo", {"spec": {"peft": {"r": 8}, "training": {"rounds": 7}}})

        async def unknown() -> dict[str, Any] | None:
            found = await condition(cluster, "ConfigApplied")
            return found if found.get("status") == "Unknown" else None

        found = await eventually(unknown, "ConfigApplied=Unknown")
        assert found["reason"] == "AggregatorUnreachable" and found["observedGeneration"] == 3
        spec_reads = len(fake.patches)
        await asyncio.sleep(1.5)  # backoff 0.3 s, 0.6 s, ...: at least two more tries
        assert fake.refused >= 3 and not [p for p in fake.patches[spec_reads:] if "job" in p]
        fake.available = True

        async def applied() -> dict[str, Any] | None:
            found = await condition(cluster, "ConfigApplied")
            return found if found.get("status") == "True" and found.get("observedGeneration") == 3 else None

        await eventually(applied, "ConfigApplied=True for generation 3")
        assert fake.rounds == 7
        assert fake.patches[-1]["job"]["spec"]["peft"]["r"] == 8


async def finish(kube: KubeClient, namespace: str, name: str, how: str) -> None:
    """Mark a silo Job finished, as the Job controller would (`how`: `Failed` or `Complete`)."""
    conditions = [{"type": how, "status": "True"}]
    await kube.patch("batch/v1", "Job", namespace, name, {"status": {"conditions": conditions}})


async def resume_by_annotation() -> None:
    fake = FakeAggregator(phase="Failed")
    settings = operator_settings()
    async with kmock_cluster() as cluster:
        kube, emulator = cluster.kube, cluster.emulator
        assert emulator is not None

        def resumes() -> list[dict[str, Any]]:
            return [p for p in fake.patches if p.get("resume")]

        async def request(value: str) -> dict[str, Any] | None:
            status = ((await cluster.job()) or {}).get("status") or {}
            handled = status.get("resumeRequest") or {}
            return handled if handled.get("value") == value else None

        async with running_operator(cluster, fake, settings):
            await cluster.create_job(job_manifest())
            await eventually(lambda: all_children_of(kube), "all children")

            async def failed() -> bool:
                return ((await cluster.job()) or {}).get("status", {}).get("phase") == "Failed"

            await eventually(failed, "phase Failed")
            # Silo a's Job gave up (backoffLimit) while the job was Failed; silo b's agent waits.
            await finish(kube, NS, "demo-silo-a", "Failed")

            await kube.patch(*JOB_API, NS, "demo", {"metadata": {"annotations": {"fedsilo.io/resume": "1"}}})
            handled = await eventually(lambda: request("1"), "resumeRequest 1 handled")
            assert handled["outcome"] == "Resumed"
            assert resumes() == [{"resume": True}]
            deleted = [(r.namespace, r.name) for r in job_requests(emulator, "DELETE")]
            assert deleted == [(NS, "demo-silo-a")]
            job = await kube.get("batch/v1", "Job", NS, "demo-silo-a")  # created again, fresh
            assert job is not None and not (job.get("status") or {}).get("conditions")

            async def resumed_event() -> list[dict[str, Any]]:
                return [e for e in posted_events(emulator) if e.get("reason") == "Resumed"]

            (event,) = await eventually(resumed_event, "a Resumed Event")
            assert event["type"] == "Normal" and "demo-silo-a" in event["message"]

        # An operator restart does not resume again: the value is recorded in status.
        async with running_operator(cluster, fake, settings):
            await eventually(lambda: all_children_of(kube), "all children")
            await asyncio.sleep(1.5)  # several timer intervals
            assert resumes() == [{"resume": True}]

            # A new value while the job runs: the aggregator says not Failed; noted, not retried.
            await kube.patch(*JOB_API, NS, "demo", {"metadata": {"annotations": {"fedsilo.io/resume": "2"}}})
            handled = await eventually(lambda: request("2"), "resumeRequest 2 handled")
            assert handled["outcome"] == "NotFailed" and "not Failed" in handled["message"]

            async def not_resumed() -> list[dict[str, Any]]:
                return [e for e in posted_events(emulator) if e.get("reason") == "NotResumed"]

            (event,) = await eventually(not_resumed, "a NotResumed Event")
            assert event["type"] == "Normal"
            await asyncio.sleep(1.0)
            assert len(resumes()) == 2
            assert len(job_requests(emulator, "DELETE")) == 1  # no silo Job restarted this time


@pytest.mark.timeout(300)
def test_added_silo_gets_a_token_and_removed_silo_loses_it() -> None:
    asyncio.run(silos_added_and_removed())


@pytest.mark.timeout(300)
def test_refused_change_is_visible_and_unreachable_aggregator_is_retried() -> None:
    # In its own interpreter: after the whole suite's earlier modules in this process, kopf's
    # retries of this scenario stalled past 300 s in two CI runs, while it takes ~11 s alone
    # (also after the operator folder and the real control plane). Not yet explained.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import asyncio; from tests.operator.test_handlers_kmock import refused_then_unreachable; "
            "asyncio.run(refused_then_unreachable())")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.timeout(300)
def test_resume_annotation_resumes_once_and_restarts_silo_jobs_that_gave_up() -> None:
    asyncio.run(resume_by_annotation())


# ---- level-triggered repair: the operator watches what it owns ----


async def repairs_and_events() -> None:
    fake = FakeAggregator()
    settings = operator_settings(resync_seconds=300)  # repairs come from watches, not the resync
    async with kmock_cluster() as cluster, running_operator(cluster, fake, settings):
        kube, emulator = cluster.kube, cluster.emulator
        assert emulator is not None
        await cluster.create_job(job_manifest())
        await eventually(lambda: all_children_of(kube), "all children")

        def events(reason: str) -> list[dict[str, Any]]:
            return [e for e in posted_events(emulator) if e.get("reason") == reason]

        async def created_event() -> list[dict[str, Any]]:
            return events("Created")

        (created,) = await eventually(created_event, "a Created Event")
        # kmock answers a server-side apply that creates with 200 (a real server: 201, so the
        # applied kinds are named too; see test_real_cluster): here the created-once kinds.
        assert created["type"] == "Normal" and "Job fedsilo-test-b/demo-silo-b" in created["message"]

        for api_version, kind, ns, name in [
            ("apps/v1", "Deployment", NS, "demo-aggregator"),
            ("networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b"),
        ]:  # (a silo Job, and the time it takes, on a real API server: test_real_cluster)
            await kube.delete(api_version, kind, ns, name)

            async def back(api_version: str = api_version, kind: str = kind, ns: str = ns, name: str = name) -> bool:
                return await kube.get(api_version, kind, ns, name) is not None

            await eventually(back, f"{kind} {ns}/{name} recreated")
            message = f"{kind} {ns}/{name} was deleted: restored"

            async def repaired(message: str = message) -> list[dict[str, Any]]:
                return [e for e in events("Repaired") if e["message"] == message]

            (event,) = await eventually(repaired, f"a Repaired Event for {kind}")
            assert event["type"] == "Normal"

        # An edit is undone: the aggregator scaled to zero comes back, a silo's policy opened is closed.
        await kube.patch("apps/v1", "Deployment", NS, "demo-aggregator", {"spec": {"replicas": 0}})
        await kube.patch("networking.k8s.io/v1", "NetworkPolicy", NS, "demo-silo-a", {"spec": {"policyTypes": []}})

        async def undone() -> bool:
            deployment = await kube.get("apps/v1", "Deployment", NS, "demo-aggregator") or {}
            policy = await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "demo-silo-a") or {}
            return deployment["spec"]["replicas"] == 1 and policy["spec"]["policyTypes"] == ["Ingress", "Egress"]

        await eventually(undone, "edits undone")

        async def changed() -> list[str]:
            return [e["message"] for e in events("Repaired") if "was changed" in e["message"]]

        messages = await eventually(changed, "Repaired Events for the edits")
        assert "Deployment fedsilo-test/demo-aggregator was changed (spec.replicas): restored" in messages

        # The tokens Secret is the one child that cannot simply be restored: a Warning says what to do.
        await kube.delete("v1", "Secret", NS, "demo-tokens")

        async def regenerated() -> list[dict[str, Any]]:
            return events("TokensRegenerated")

        (warning,) = await eventually(regenerated, "a TokensRegenerated Warning")
        assert warning["type"] == "Warning" and "rollout restart" in warning["message"]
        assert await kube.get("v1", "Secret", NS, "demo-tokens") is not None

        # Children the job no longer wants are deleted, not "repaired".
        silos = [silo("a", volume={"emptyDir": True}), silo("c", external=True)]
        await kube.patch(*JOB_API, NS, "demo", {"spec": {"silos": silos}})

        async def b_gone() -> bool:
            return await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b") is None

        await eventually(b_gone, "silo b's policy deleted")
        await asyncio.sleep(1.0)
        assert await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b") is None
        assert not [e for e in events("Repaired") if "demo-silo-b" in e["message"] and "NetworkPolicy" in e["message"]
                    and e["message"] != "NetworkPolicy fedsilo-test-b/demo-silo-b was deleted: restored"]


@pytest.mark.timeout(300)
def test_deleted_and_edited_children_are_repaired_with_events() -> None:
    asyncio.run(repairs_and_events())
