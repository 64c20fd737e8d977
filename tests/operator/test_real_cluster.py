"""The operator and both charts against a real kube-apiserver (with the controller manager).

The control plane is `../shared/k8s` (etcd, kube-apiserver, kube-controller-manager 1.36),
started once for this module and stopped after it; FEDSILO_TEST_KUBECONFIG points the module
at any other cluster instead (kind, a test cluster: see the README). Skipped, with the reason,
where neither is available. Pods stay Pending (no kubelet); the aggregator is faked at the
HTTP boundary, as in the kmock tests.

Proved here and not with kmock: the hub chart installs and its ServiceAccount's RBAC suffices
for every watch and write of the operator; a deleted Deployment or NetworkPolicy comes back
within seconds; an edited one is restored by server-side apply; a rounds change shows in
`ConfigApplied` for the new generation; a missing silo namespace shows as a condition and a
Warning Event and heals once created; Events are real `v1/Event` objects; the silo chart
upgrades across a version bump; a ServiceMonitor without its CRD and dashboards for a missing
namespace fail with a message that says what to do.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from tests.operator.test_handlers_kmock import JOB_API, Cluster, FakeAggregator, eventually, running_operator

from fedsilo.operator.crd import build_crd
from fedsilo.operator.kube import FIELD_MANAGER, KubeClient
from fedsilo.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"
NS, NS_B, HUB_NS = "fedsilo-real", "fedsilo-real-b", "fedsilo-system"
NS_LATE = f"fedsilo-late-{uuid.uuid4().hex[:6]}"  # created mid-test: new on every run
pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(300)]
# The demo job's silos live in fedsilo-real-b and fedsilo-late-*: opened by the tenancy allow-list.
SILO_NAMESPACES = "fedsilo-*"
HUB_VALUES = ("--set", f"tenancy.siloNamespaces={{{SILO_NAMESPACES}}}")


def tool(name: str) -> str:
    local = TOOLS / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed: run scripts/install-tools.sh")
    return found


def run(*args: str, config: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KUBECONFIG": config,
        "HELM_CACHE_HOME": "/tmp/fedsilo-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/fedsilo-helm/config",
        "HELM_DATA_HOME": "/tmp/fedsilo-helm/data",
    }
    result = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120, check=False)
    if check:
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def hub(kubeconfig: str) -> str:
    """The hub chart installed (CRD, ClusterRole, ServiceAccount); returns the release name."""
    helm, kubectl = tool("helm"), tool("kubectl")
    for ns in (HUB_NS, NS, NS_B):
        run(kubectl, "create", "namespace", ns, config=kubeconfig, check=False)
    run(helm, "upgrade", "--install", "fedsilo", str(ROOT / "charts" / "fedsilo"), "-n", HUB_NS, *HUB_VALUES,
        config=kubeconfig)
    run(kubectl, "wait", "--for=condition=Established", "crd/federatedjobs.fedsilo.io", "--timeout=60s",
        config=kubeconfig)
    return "fedsilo"


def service_account_login(kubeconfig: str) -> kopf.ConnectionInfo:
    """Log in as the hub chart's ServiceAccount: the operator runs with exactly the chart's RBAC."""
    token = run(tool("kubectl"), "-n", HUB_NS, "create", "token", "fedsilo", "--duration=1h", config=kubeconfig)
    config = yaml.safe_load(Path(kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    ca = cluster.get("certificate-authority")
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=ca,
        ca_data=cluster.get("certificate-authority-data"),
        token=token.stdout.strip(),
    )


def demo_job() -> dict[str, Any]:
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


async def events_of(kube: KubeClient, name: str) -> list[dict[str, Any]]:
    listing = await kube._request("GET", f"/api/v1/namespaces/{NS}/events?fieldSelector=involvedObject.name%3D{name}")
    return list((listing or {}).get("items", []))


async def condition(kube: KubeClient, type_: str) -> dict[str, Any]:
    job = await kube.get(*JOB_API, NS, "demo") or {}
    return next((c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


async def remove_leftover(kube: KubeClient) -> None:
    """A job left by an interrupted run on a reused cluster (its finalizer has no operator)."""
    if await kube.get(*JOB_API, NS, "demo") is None:
        return
    await kube.patch(*JOB_API, NS, "demo", {"metadata": {"finalizers": None}})
    await kube.delete(*JOB_API, NS, "demo")

    async def gone() -> bool:
        return await kube.get(*JOB_API, NS, "demo") is None

    await eventually(gone, "leftover job deleted")


async def timed_repair(kube: KubeClient, api_version: str, kind: str, namespace: str, name: str) -> float:
    """Delete a child; seconds until the operator has recreated it (a new uid)."""
    old = await kube.get(api_version, kind, namespace, name)
    assert old is not None
    started = time.monotonic()
    await kube.delete(api_version, kind, namespace, name)

    async def back() -> bool:
        new = await kube.get(api_version, kind, namespace, name)
        return new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]

    await eventually(back, f"{kind} {namespace}/{name} recreated")
    return time.monotonic() - started


async def operator_scenario(kubeconfig: str) -> dict[str, float]:
    os.environ["KUBECONFIG"] = kubeconfig
    admin_info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert admin_info is not None
    kube = KubeClient.from_connection(admin_info)  # the test's own (admin) view
    timings: dict[str, float] = {}
    info = service_account_login(kubeconfig)
    cluster = Cluster(kube, lambda **_: info)
    settings = OperatorSettings(silo_namespaces=SILO_NAMESPACES, poll_seconds=0.5, resync_seconds=20)
    fake = FakeAggregator()
    try:
        await kube.apply(build_crd())
        await remove_leftover(kube)
        async with running_operator(cluster, fake, settings):
            await kube.create(demo_job())

            async def children() -> bool:
                return all(
                    [
                        await kube.get("apps/v1", "Deployment", NS, "demo-aggregator"),
                        await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b"),
                        await kube.get("batch/v1", "Job", NS_B, "demo-silo-b"),
                    ]
                )

            await eventually(children, "children")
            deployment = await kube.get("apps/v1", "Deployment", NS, "demo-aggregator") or {}
            managers = {m["manager"] for m in deployment["metadata"]["managedFields"]}
            assert FIELD_MANAGER in managers and "python-httpx" not in managers
            requests = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
            assert requests == {"cpu": "250m", "memory": "512Mi"}

            # Repair: deleted children come back within seconds (watch, not the 20 s resync).
            timings["deployment"] = await timed_repair(kube, "apps/v1", "Deployment", NS, "demo-aggregator")
            timings["networkpolicy"] = await timed_repair(
                kube, "networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b"
            )
            timings["job"] = await timed_repair(kube, "batch/v1", "Job", NS, "demo-silo-a")
            assert max(timings.values()) < 10, timings

            # An edit is undone (server-side apply restores the operator's fields).
            started = time.monotonic()
            await kube.patch("apps/v1", "Deployment", NS, "demo-aggregator", {"spec": {"replicas": 0}})

            async def restored() -> bool:
                found = await kube.get("apps/v1", "Deployment", NS, "demo-aggregator") or {}
                return found.get("spec", {}).get("replicas") == 1

            await eventually(restored, "replicas restored to 1")
            timings["edit"] = time.monotonic() - started

            async def repaired_events() -> list[str]:
                return [e["message"] for e in await events_of(kube, "demo") if e["reason"] == "Repaired"]

            messages = await eventually(repaired_events, "Repaired Events")
            assert any("Deployment fedsilo-real/demo-aggregator was deleted" in m for m in messages), messages
            created = [e["message"] for e in await events_of(kube, "demo") if e["reason"] == "Created"]
            assert any("Deployment fedsilo-real/demo-aggregator" in m for m in created), created
            reasons = {e["reason"]: e["type"] for e in await events_of(kube, "demo")}
            assert reasons.get("Created") == "Normal" and reasons.get("ExternalUrlMissing") == "Warning", reasons

            # A rounds change reaches the aggregator; ConfigApplied follows the generation.
            patched = await kube.patch(*JOB_API, NS, "demo", {"spec": {"training": {"rounds": 6}}})
            generation = (patched or {})["metadata"]["generation"]

            async def applied() -> dict[str, Any] | None:
                found = await condition(kube, "ConfigApplied")
                ok = found.get("status") == "True" and found.get("observedGeneration") == generation
                return found if ok else None

            await eventually(applied, f"ConfigApplied for generation {generation}")
            assert fake.rounds == 6

            # A silo in a namespace that does not exist: visible, then healed once it exists.
            silos = [*demo_job()["spec"]["silos"], {"name": "late", "namespace": NS_LATE, "data": {"path": "l.csv"}}]
            await kube.patch(*JOB_API, NS, "demo", {"spec": {"silos": silos}})

            async def missing() -> dict[str, Any] | None:
                found = await condition(kube, "ChildrenReady")
                return found if found.get("reason") == "NamespaceNotFound" else None

            found = await eventually(missing, "ChildrenReady=False NamespaceNotFound")
            assert found["status"] == "False" and NS_LATE in found["message"]

            # kopf posts Events from a queue, after the status write: wait for it.
            async def namespace_warnings() -> list[dict[str, Any]]:
                return [e for e in await events_of(kube, "demo") if e["reason"] == "NamespaceNotFound"]

            warnings = await eventually(namespace_warnings, "NamespaceNotFound Event")
            assert warnings[0]["type"] == "Warning"
            await kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS_LATE}})

            async def healed() -> bool:
                return (await condition(kube, "ChildrenReady")).get("status") == "True" and bool(
                    await kube.get("batch/v1", "Job", NS_LATE, "demo-silo-late")
                )

            started = time.monotonic()
            await eventually(healed, "children in the new namespace")
            timings["namespace-created"] = time.monotonic() - started

            # Deletion: every child in every namespace goes, and nothing is "repaired".
            await kube.delete(*JOB_API, NS, "demo")

            async def gone() -> bool:
                return not any(
                    [
                        await kube.get(*JOB_API, NS, "demo"),
                        await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b"),
                        await kube.get("batch/v1", "Job", NS_LATE, "demo-silo-late"),
                    ]
                )

            await eventually(gone, "job and children deleted")
            await asyncio.sleep(2)
            assert await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS_B, "demo-silo-b") is None
    finally:
        await kube.aclose()
    return timings


def test_operator_repairs_and_reports_on_a_real_api_server(kubeconfig: str, hub: str) -> None:
    timings = asyncio.run(operator_scenario(kubeconfig))
    print("\nseconds from deletion (or edit) to repair:", {k: round(v, 2) for k, v in timings.items()})


# ---------------------------------------------------------------- charts


def silo_values(tmp_path: Path) -> Path:
    values = {
        "job": "sentiment-demo",
        "silo": "hospital-a",
        "aggregator": {"url": "https://fl.hub.example.org", "egress": {"cidrs": ["203.0.113.10/32"]}},
        "token": {"existingSecret": "fedsilo-token"},
        "data": {"existingClaim": "hospital-a-data"},
    }
    path = tmp_path / "silo.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def bumped_chart(tmp_path: Path, version: str, app_version: str) -> Path:
    chart = tmp_path / f"fedsilo-silo-{version}"
    shutil.copytree(ROOT / "charts" / "fedsilo-silo", chart)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta.update(version=version, appVersion=app_version)
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return chart


def test_silo_chart_upgrades_across_a_version_bump(kubeconfig: str, tmp_path: Path) -> None:
    helm, kubectl = tool("helm"), tool("kubectl")
    run(kubectl, "create", "namespace", "hospital", config=kubeconfig, check=False)
    values = silo_values(tmp_path)
    install = ["-n", "hospital", "-f", str(values)]
    run(helm, "upgrade", "--install", "hospital-a", str(ROOT / "charts" / "fedsilo-silo"), *install,
        config=kubeconfig)
    # Same app, new chart version: the Job (pod template immutable) is left as it is.
    before = run(kubectl, "-n", "hospital", "get", "job", "-o", "name", config=kubeconfig).stdout.split()
    run(helm, "upgrade", "hospital-a", str(bumped_chart(tmp_path, "0.1.1", "0.1.0")), *install, config=kubeconfig)
    after = run(kubectl, "-n", "hospital", "get", "job", "-o", "name", config=kubeconfig).stdout.split()
    assert before == after and len(after) == 1
    # A new app version (a new image): the Job is replaced, the upgrade does not fail.
    run(helm, "upgrade", "hospital-a", str(bumped_chart(tmp_path, "0.2.0", "0.2.0")), *install, config=kubeconfig)
    replaced = run(kubectl, "-n", "hospital", "get", "job", "-o", "name", config=kubeconfig).stdout.split()
    assert len(replaced) == 1 and replaced != after
    image = run(kubectl, "-n", "hospital", "get", *replaced, "-o", "jsonpath={.spec.template.spec.containers[0].image}",
                config=kubeconfig).stdout
    assert image.endswith(":0.2.0")
    status = run(helm, "status", "hospital-a", "-n", "hospital", "-o", "json", config=kubeconfig).stdout
    assert '"status":"deployed"' in status.replace(" ", "")
    run(helm, "uninstall", "hospital-a", "-n", "hospital", config=kubeconfig)


def test_hub_chart_refuses_what_the_cluster_cannot_take(kubeconfig: str, hub: str) -> None:
    helm = tool("helm")
    chart = str(ROOT / "charts" / "fedsilo")
    monitoring = run(helm, "upgrade", "fedsilo", chart, "-n", HUB_NS, "--set", "monitoring.serviceMonitor.enabled=true",
                     config=kubeconfig, check=False)
    assert monitoring.returncode != 0
    assert "monitoring.serviceMonitor.enabled needs the Prometheus Operator" in monitoring.stderr, monitoring.stderr
    dashboards = run(helm, "upgrade", "fedsilo", chart, "-n", HUB_NS, "--set", "grafana.dashboards.namespace=nowhere",
                     config=kubeconfig, check=False)
    assert dashboards.returncode != 0
    assert "namespace nowhere does not exist" in dashboards.stderr, dashboards.stderr
    # The release still works after the refused upgrades.
    run(helm, "upgrade", "fedsilo", chart, "-n", HUB_NS, *HUB_VALUES, config=kubeconfig)
