"""The hub chart's tenancy on a real kube-apiserver (`../shared/k8s`, the session's cluster).

Proved here and not with kmock: the chart's ValidatingAdmissionPolicy (its CEL compiled and run by
the API server) refuses the same jobs the operator refuses, with a readable message, and admits an
allowed one; in namespaced mode the chart's RBAC gives the operator's ServiceAccount no Secret or
Job rights outside the watched and silo namespaces (`kubectl auth can-i --as`), and the operator
runs with exactly those rights: children in both namespaces, pruned on deletion.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from tests.operator.test_handlers_kmock import JOB_API, Cluster, FakeAggregator, eventually, running_operator
from tests.operator.test_real_cluster import ROOT, run, tool

from fedsilo.operator.kube import KubeClient, KubeError
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tenancy import TenancyPolicy
from fedsilo.spec import parse_job

JOBS, HOSPITAL, OTHER, HUB_NS = "tenancy-jobs", "tenancy-hospital", "tenancy-other", "tenancy-hub"
RELEASE = "tenancy"
SERVICE_ACCOUNT = f"system:serviceaccount:{HUB_NS}:{RELEASE}-fedsilo"
IMAGES = "registry.example.org/fl/*"
# The chart's values and the operator's settings say the same thing.
VALUES = (
    "--set", f"operator.watchNamespaces={{{JOBS}}}",
    "--set", f"tenancy.siloNamespaces={{{HOSPITAL}}}",
    "--set", f"tenancy.aggregatorImages={{{IMAGES}}}",
)
SETTINGS = OperatorSettings(
    watch_namespaces=JOBS,
    silo_namespaces=HOSPITAL,
    aggregator_images=IMAGES,
    poll_seconds=0.5,
    resync_seconds=30,
    operator_namespace=HUB_NS,  # as the chart's Deployment sets it: the operator's CA Secret lives there
)
pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tenancy_hub(kubeconfig: str) -> Iterator[str]:
    """The hub chart in namespaced mode (its CRD, Roles, admission policy); uninstalled after the
    module, so other modules' jobs meet only their own release's policy."""
    helm, kubectl = tool("helm"), tool("kubectl")
    for ns in (HUB_NS, JOBS, HOSPITAL, OTHER):
        run(kubectl, "create", "namespace", ns, config=kubeconfig, check=False)
    chart = str(ROOT / "charts" / "fedsilo")
    run(helm, "upgrade", "--install", RELEASE, chart, "-n", HUB_NS, *VALUES, config=kubeconfig)
    run(kubectl, "wait", "--for=condition=Established", "crd/federatedjobs.fedsilo.io", "--timeout=60s",
        config=kubeconfig)
    # The API server loads a new policy through an informer: wait until it refuses a probe.
    probe = job("probe", image="attacker.example/aggregator:1")
    deadline = time.monotonic() + 60
    while create(probe, kubeconfig, "--dry-run=server").returncode == 0:
        assert time.monotonic() < deadline, "the admission policy never took effect"
        time.sleep(0.5)
    # The API server type-checks the CEL against the CRD's schema: no warning.
    name = f"{RELEASE}-fedsilo-tenancy"
    while True:
        status = json.loads(run(kubectl, "get", "validatingadmissionpolicy", name, "-o", "json",
                                config=kubeconfig).stdout).get("status") or {}
        if status.get("observedGeneration") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status.get("observedGeneration"), "the API server never type-checked the policy"
    assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status
    try:
        yield RELEASE
    finally:
        run(helm, "uninstall", RELEASE, "-n", HUB_NS, "--wait", config=kubeconfig, check=False)


def job(name: str, **change: Any) -> dict[str, Any]:
    """An allowed job (silos in its own namespace, in the silo namespace, external) with `change`
    applied to silo b (keys of a silo) or to the aggregator (`image`)."""
    silo_b: dict[str, Any] = {"name": "b", "namespace": HOSPITAL, "data": {"path": "b.csv"},
                              "volume": {"persistentVolumeClaim": "hospital-data"}}
    aggregator = {"image": change.pop("image", "registry.example.org/fl/aggregator:1")}
    silo_b.update(change)
    return {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name, "namespace": JOBS},
        "spec": {
            "baseModel": {"path": "/data/models/minilm"},
            "task": {"labels": ["neg", "pos"]},
            "aggregator": aggregator,
            "silos": [
                {"name": "a", "data": {"path": "a.csv"}, "volume": {"emptyDir": True}},
                silo_b,
                {"name": "c", "external": True, "namespace": OTHER, "data": {"path": "c.csv"}},
            ],
        },
    }


def create(manifest: dict[str, Any], kubeconfig: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`kubectl create -f -`, as a job author would."""
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    return subprocess.run([tool("kubectl"), "create", *flags, "-f", "-"], input=json.dumps(manifest),
                          capture_output=True, text=True, env=env, timeout=60, check=False)


FORBIDDEN = [
    pytest.param({"namespace": OTHER}, f"silos b ({OTHER}): namespace not open to fedsilo silos", id="namespace"),
    pytest.param({"volume": {"hostPath": "/var/lib/hospital"}}, "silos b: hostPath volumes are refused",
                 id="hostPath"),
    pytest.param({"volume": {"persistentVolumeClaim": "hospital-data", "readOnly": False}},
                 "silos b: the data volume must be mounted read-only", id="writable"),
    pytest.param({"image": "attacker.example/aggregator:1"},
                 "spec.aggregator.image attacker.example/aggregator:1 is not allowed", id="image"),
]


@pytest.mark.parametrize(("change", "message"), FORBIDDEN)
def test_the_api_server_refuses_what_the_operator_refuses(
    kubeconfig: str, tenancy_hub: str, change: dict[str, Any], message: str
) -> None:
    manifest = job(f"forbidden-{len(message)}", **dict(change))
    result = create(manifest, kubeconfig)
    assert result.returncode != 0, result.stdout
    assert "denied request" in result.stderr and message in result.stderr, result.stderr
    # The operator's own check refuses the same job (its settings are the chart's values).
    assert TenancyPolicy.from_settings(SETTINGS).check(parse_job(manifest), {})


def test_an_allowed_job_is_admitted_and_a_forbidden_edit_refused(kubeconfig: str, tenancy_hub: str) -> None:
    manifest = job("allowed")
    # Explicit nulls (nullable fields) are absent to both checks.
    manifest["spec"]["silos"][0].update(namespace=None, volume={"emptyDir": True, "hostPath": None})
    assert TenancyPolicy.from_settings(SETTINGS).check(parse_job(manifest), {}) == []
    result = create(manifest, kubeconfig)
    assert result.returncode == 0, result.stderr
    kubectl = tool("kubectl")
    patch = json.dumps({"spec": {"aggregator": {"image": "attacker.example/aggregator:1"}}})
    edit = run(kubectl, "-n", JOBS, "patch", "federatedjob", "allowed", "--type=merge", "-p", patch,
               config=kubeconfig, check=False)
    assert edit.returncode != 0 and "spec.aggregator.image attacker.example" in edit.stderr, edit.stderr
    # Writes that leave the spec alone (the operator's finalizer, annotations) are not judged again.
    run(kubectl, "-n", JOBS, "annotate", "federatedjob", "allowed", "note=ok", config=kubeconfig)
    run(kubectl, "-n", JOBS, "delete", "federatedjob", "allowed", "--wait=false", config=kubeconfig)


def can_i(kubeconfig: str, verb: str, resource: str, *where: str) -> bool:
    result = run(tool("kubectl"), "auth", "can-i", verb, resource, *where, f"--as={SERVICE_ACCOUNT}",
                 config=kubeconfig, check=False)
    return result.stdout.strip() == "yes"


def test_namespaced_rbac_gives_no_secret_or_job_rights_elsewhere(kubeconfig: str, tenancy_hub: str) -> None:
    for resource in ("secrets", "jobs.batch", "networkpolicies.networking.k8s.io"):
        assert can_i(kubeconfig, "create", resource, "-n", JOBS), resource
        assert can_i(kubeconfig, "create", resource, "-n", HOSPITAL), resource
        for namespace in (OTHER, "default", "kube-system"):
            assert not can_i(kubeconfig, "create", resource, "-n", namespace), (resource, namespace)
            assert not can_i(kubeconfig, "get", resource, "-n", namespace), (resource, namespace)
        assert not can_i(kubeconfig, "list", resource, "--all-namespaces"), resource
    # The silo namespace gets silo children only; FederatedJobs are read where they are watched.
    assert can_i(kubeconfig, "create", "deployments.apps", "-n", JOBS)
    assert not can_i(kubeconfig, "create", "deployments.apps", "-n", HOSPITAL)
    assert can_i(kubeconfig, "watch", "federatedjobs.fedsilo.io", "-n", JOBS)
    assert not can_i(kubeconfig, "watch", "federatedjobs.fedsilo.io", "-n", OTHER)
    assert can_i(kubeconfig, "watch", "namespaces")  # cluster-scoped: kopf observes them


def service_account_login(kubeconfig: str) -> kopf.ConnectionInfo:
    token = run(tool("kubectl"), "-n", HUB_NS, "create", "token", f"{RELEASE}-fedsilo", "--duration=1h",
                config=kubeconfig)
    cluster = yaml.safe_load(Path(kubeconfig).read_text())["clusters"][0]["cluster"]
    return kopf.ConnectionInfo(server=cluster["server"], ca_path=cluster.get("certificate-authority"),
                               ca_data=cluster.get("certificate-authority-data"), token=token.stdout.strip())


async def namespaced_operator(kubeconfig: str) -> None:
    os.environ["KUBECONFIG"] = kubeconfig
    admin = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert admin is not None
    kube = KubeClient.from_connection(admin)
    info = service_account_login(kubeconfig)
    try:
        async with running_operator(Cluster(kube, lambda **_: info), FakeAggregator(), SETTINGS):
            await kube.create(job("demo"))

            async def children() -> bool:
                return all([await kube.get("apps/v1", "Deployment", JOBS, "demo-aggregator"),
                            await kube.get("batch/v1", "Job", HOSPITAL, "demo-silo-b"),
                            await kube.get("v1", "Secret", HOSPITAL, "demo-silo-b-token")])

            await eventually(children, "children in the watched and the silo namespace")

            async def admitted() -> bool:
                found = await kube.get(*JOB_API, JOBS, "demo") or {}
                conditions = {c["type"]: c for c in found.get("status", {}).get("conditions", [])}
                return conditions.get("Admitted", {}).get("status") == "True"

            await eventually(admitted, "Admitted=True")
            await kube.delete(*JOB_API, JOBS, "demo")

            async def gone() -> bool:  # the cleanup lists children namespace by namespace
                return not any([await kube.get(*JOB_API, JOBS, "demo"),
                                await kube.get("batch/v1", "Job", HOSPITAL, "demo-silo-b")])

            await eventually(gone, "job and children deleted")
    except KubeError as exc:
        pytest.fail(f"the API server refused: {exc}")
    finally:
        await kube.aclose()


def test_the_operator_works_with_namespaced_rights_only(kubeconfig: str, tenancy_hub: str) -> None:
    asyncio.run(namespaced_operator(kubeconfig))
