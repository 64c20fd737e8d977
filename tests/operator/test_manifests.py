"""Pure manifest builders: every child validates against Kubernetes' own schemas."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from fedsilo.operator import naming
from fedsilo.operator.manifests import job_children
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tokens import Tokens, complete_tokens, decode, tokens_from_secret
from fedsilo.spec import FederatedJob, parse_job

K8S_VERSION = "1.37.0"  # newest schema set shipped by the installed kubernetes-validate
UID = "0b7e4c1e-0000-4000-8000-000000000001"


def make_job(**aggregator: Any) -> FederatedJob:
    return parse_job(
        {
            "apiVersion": "fedsilo.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "demo", "namespace": "fl"},
            "spec": {
                "baseModel": {"path": "/data/models/minilm"},
                "task": {"labels": ["neg", "pos"]},
                "aggregator": {"storageSize": "5Gi", **aggregator},
                "silos": [
                    {
                        "name": "a",
                        "data": {"path": "a.csv"},
                        "volume": {"persistentVolumeClaim": "hospital-a-data"},
                        "nodeSelector": {"gpu": "yes"},
                        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        "resources": {"requests": {"cpu": 2}, "limits": {"nvidia.com/gpu": 1}},
                    },
                    {
                        "name": "b",
                        "namespace": "hospital-b",
                        "data": {"path": "b.csv"},
                        "volume": {"hostPath": "/srv/b"},
                    },
                    {"name": "c", "external": True, "data": {"path": "c.csv"}},
                ],
            },
        }
    )


def children(**aggregator: Any) -> list[dict[str, Any]]:
    job = make_job(**aggregator)
    tokens = complete_tokens(None, job.spec)
    return job_children(job, UID, tokens, OperatorSettings())


def find(items: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(m for m in items if m["kind"] == kind and m["metadata"]["name"] == name)


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in env}


@pytest.mark.parametrize(
    "manifest", children(databaseSecret="pg"), ids=lambda m: f"{m['kind']}/{m['metadata']['name']}"
)
def test_every_child_is_valid_kubernetes(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_kinds_and_namespaces() -> None:
    items = children()
    keys = sorted((m["kind"], m["metadata"]["namespace"], m["metadata"]["name"]) for m in items)
    assert ("Deployment", "fl", "demo-aggregator") in keys
    assert ("Job", "fl", "demo-silo-a") in keys
    assert ("Job", "hospital-b", "demo-silo-b") in keys
    assert not any(k[2] == "demo-silo-c" for k in keys if k[0] in ("Job", "Deployment"))  # external
    assert [k for k in keys if k[0] == "Deployment"] == [("Deployment", "fl", "demo-aggregator")]
    assert ("Secret", "fl", "demo-silo-c-token") in keys
    assert ("Secret", "hospital-b", "demo-silo-b-token") in keys
    assert ("NetworkPolicy", "hospital-b", "demo-silo-b") in keys
    assert ("Service", "fl", "demo-aggregator") in keys
    assert ("PersistentVolumeClaim", "fl", "demo-checkpoints") in keys


def test_owner_references_only_in_the_jobs_namespace() -> None:
    for manifest in children():
        meta = manifest["metadata"]
        assert meta["labels"][naming.LABEL_JOB] == "demo"
        assert meta["labels"][naming.LABEL_JOB_NAMESPACE] == "fl"
        if meta["namespace"] == "fl":
            assert meta["ownerReferences"][0]["uid"] == UID
            assert meta["ownerReferences"][0]["kind"] == "FederatedJob"
        else:
            assert "ownerReferences" not in meta


def test_aggregator_deployment() -> None:
    items = children(databaseSecret="pg", resources={"requests": {"cpu": "500m"}})
    deployment = find(items, "Deployment", "demo-aggregator")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/fedsilo/fedsilo:0.1.0"
    assert container["args"] == ["aggregator"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The spec's request wins; the memory it leaves out gets the operator's default (not BestEffort).
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}}
    env = container_env(deployment)
    assert env["FEDSILO_DATABASE_URL"] == {"secretKeyRef": {"name": "pg", "key": "url"}}
    assert env["FEDSILO_ADMIN_TOKEN"]["secretKeyRef"]["name"] == "demo-tokens"
    assert env["FEDSILO_JOB_FILE"] == "/etc/fedsilo/job/job.yaml"
    claim = find(items, "PersistentVolumeClaim", "demo-checkpoints")
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert {"name": "state", "persistentVolumeClaim": {"claimName": "demo-checkpoints"}} in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_sqlite_default_database() -> None:
    env = container_env(find(children(), "Deployment", "demo-aggregator"))
    assert env["FEDSILO_DATABASE_URL"].startswith("sqlite:////var/lib/fedsilo/")


def test_service_port_and_scrape_annotations() -> None:
    service = find(children(), "Service", "demo-aggregator")
    assert service["spec"]["ports"][0]["name"] == "http"
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_silo_jobs() -> None:
    items = children()
    a = find(items, "Job", "demo-silo-a")
    assert a["apiVersion"] == "batch/v1"
    spec = a["spec"]
    # Runs to completion (the agent exits 0 when the job is done), retried on failure,
    # no deadline, kept after it finishes; the API server picks the selector.
    assert spec["backoffLimit"] == 6
    assert not {"activeDeadlineSeconds", "ttlSecondsAfterFinished", "selector"} & set(spec)
    assert "replicas" not in spec and "strategy" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert pod["nodeSelector"] == {"gpu": "yes"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["args"] == ["silo-agent"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "2"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    assert pod["volumes"][0] == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "hospital-a-data", "readOnly": True},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    env = container_env(a)
    assert env["FEDSILO_AGGREGATOR_URL"] == "https://demo-aggregator.fl.svc.cluster.local:8080"
    assert env["FEDSILO_CA_BUNDLE"] == "/etc/fedsilo/tls/ca.crt"  # HTTPS by default
    assert env["FEDSILO_SILO"] == "a" and env["FEDSILO_JOB"] == "demo"
    assert env["FEDSILO_DATA_ROOT"] == "/data"
    assert env["FEDSILO_TOKEN_FILE"] == "/etc/fedsilo/token/token"  # a file: rotations reach the running agent
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"] == {
        "secretName": "demo-silo-a-token",
        "items": [{"key": "token", "path": "token"}],
    }
    # a codec's error-feedback residual survives a crashed agent (restartPolicy OnFailure keeps the pod)
    assert env["FEDSILO_STATE_DIR"] == "/state" and volumes["state"] == {"name": "state", "emptyDir": {}}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["state"] == "/state"
    template = spec["template"]["metadata"]
    assert template["annotations"]["prometheus.io/port"] == "9090"
    b = find(items, "Job", "demo-silo-b")
    assert b["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] == "/srv/b"
    mount = b["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert mount == {"name": "data", "mountPath": "/data", "readOnly": True}


def test_network_policies_select_the_silo_job_pods() -> None:
    items = children()
    aggregator = find(items, "NetworkPolicy", "demo-aggregator")["spec"]
    for silo in ("a", "b"):
        pod_labels = find(items, "Job", f"demo-silo-{silo}")["spec"]["template"]["metadata"]["labels"]
        own = find(items, "NetworkPolicy", f"demo-silo-{silo}")["spec"]["podSelector"]["matchLabels"]
        assert own.items() <= pod_labels.items()
        admitted = [
            p["podSelector"]["matchLabels"]
            for p in aggregator["ingress"][0]["from"]
            if p.get("podSelector", {}).get("matchLabels", {}).get(naming.LABEL_SILO) == silo
        ]
        assert len(admitted) == 1 and admitted[0].items() <= pod_labels.items()


def test_network_policies() -> None:
    items = children()
    aggregator = find(items, "NetworkPolicy", "demo-aggregator")["spec"]
    peers = aggregator["ingress"][0]["from"]
    silo_peers = [p for p in peers if "podSelector" in p]
    assert {p["podSelector"]["matchLabels"][naming.LABEL_SILO] for p in silo_peers} == {"a", "b"}
    namespaces = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in peers}
    assert {"fl", "hospital-b", "fedsilo-system", "ingress-nginx"} <= namespaces and "monitoring" not in namespaces
    assert aggregator["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    # Prometheus reaches only the token-less metrics port, and nothing else does
    assert aggregator["ingress"][1] == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"protocol": "TCP", "port": 9090}],
    }
    silo = find(items, "NetworkPolicy", "demo-silo-b")["spec"]
    assert silo["policyTypes"] == ["Ingress", "Egress"]
    to_aggregator = silo["egress"][0]["to"][0]
    assert to_aggregator["podSelector"]["matchLabels"] == naming.aggregator_selector(make_job())
    assert silo["egress"][1]["ports"][0] == {"protocol": "UDP", "port": 53}


def test_tokens_are_kept_and_completed() -> None:
    job = make_job()
    first = complete_tokens(None, job.spec)
    assert set(first.silos) == {"a", "b", "c"} and len(first.admin) >= 16
    again = complete_tokens(first, job.spec)
    assert again == first
    partial = Tokens(admin=first.admin, silos={"a": first.silos["a"]})
    completed = complete_tokens(partial, job.spec)
    assert completed.silos["a"] == first.silos["a"] and completed.admin == first.admin
    secret = find(job_children(job, UID, first, OperatorSettings()), "Secret", "demo-tokens")
    assert tokens_from_secret(secret) == first
    silo_secret = find(job_children(job, UID, first, OperatorSettings()), "Secret", "demo-silo-c-token")
    assert decode(silo_secret["data"]["token"]) == first.silos["c"]
    assert json.loads(decode(secret["data"]["silo-tokens.json"])) == first.silos


def test_configmap_holds_the_job_document() -> None:
    import yaml

    config = find(children(), "ConfigMap", "demo-job")
    document = yaml.safe_load(config["data"]["job.yaml"])
    assert parse_job(document).metadata.name == "demo"


def test_long_names_are_shortened() -> None:
    name = naming.child_name("j" * 60, "aggregator")
    assert len(name) == 63
    assert name != naming.child_name("j" * 61, "aggregator")
