"""The Helm charts: lint, render every ci/ values file, validate the manifests strictly.

Needs the helm binary from scripts/install-tools.sh (.tools/bin/helm); skipped without it.
Rendered objects are validated with kubernetes-validate against KUBERNETES_VERSION in strict
mode (unknown fields fail). Custom-resource kinds it has no schema for (ServiceMonitor) are
checked by hand instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fedsilo.operator import manifests, naming
from fedsilo.operator.children import CREATE_ONLY_KINDS
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tokens import Tokens
from fedsilo.spec import load_job

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
HUB = CHARTS / "fedsilo"
SILO = CHARTS / "fedsilo-silo"
INVALID = Path(__file__).parent / "invalid"
KUBERNETES_VERSION = "1.36.0"
# Kinds from CRDs that kubernetes-validate cannot know; each is checked by its own test.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"


def _helm_binary() -> str | None:
    """FEDSILO_HELM (e.g. a Helm 3 binary), else .tools/bin/helm, else helm on PATH."""
    if os.environ.get("FEDSILO_HELM"):
        return os.environ["FEDSILO_HELM"]
    local = ROOT / ".tools" / "bin" / "helm"
    if local.exists():
        return str(local)
    return shutil.which("helm")


HELM = _helm_binary()
pytestmark = pytest.mark.skipif(HELM is None, reason="helm not installed: run scripts/install-tools.sh")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with a throwaway home so no user configuration leaks in."""
    assert HELM is not None
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/fedsilo-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/fedsilo-helm/config",
        "HELM_DATA_HOME": "/tmp/fedsilo-helm/data",
    }
    return subprocess.run([HELM, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


@cache
def render(chart: Path, values: Path | None = None) -> tuple[dict[str, Any], ...]:
    """`helm template` (CRDs included) parsed into objects."""
    args = ["template", "release", str(chart), "--namespace", "fedsilo-test", "--include-crds"]
    args += ["--api-versions", SERVICE_MONITOR_API]  # a cluster with the Prometheus Operator
    if values is not None:
        args += ["-f", str(values)]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def ci_values() -> Iterator[Any]:
    for chart in (HUB, SILO):
        for values in sorted((chart / "ci").glob("*.yaml")):
            yield pytest.param(chart, values, id=f"{chart.name}/{values.stem}")


def find(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    matches = find(objects, kind)
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ---------------------------------------------------------------- lint, render, validate


@pytest.mark.parametrize(("chart", "values"), ci_values())
def test_lint(chart: Path, values: Path) -> None:
    result = helm("lint", "--strict", str(chart), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("chart", "values"), ci_values())
def test_rendered_manifests_validate_strictly(chart: Path, values: Path) -> None:
    objects = render(chart, values)
    assert objects
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata'].get('name')}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{chart.name} with {values.name}: {where}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{chart.name} with {values.name}: {where}: {exc.message}")


def test_kubernetes_validate_knows_the_version() -> None:
    assert kubernetes_validate.latest_version() >= "1.36"


# ---------------------------------------------------------------- schema rejects bad values

INVALID_CASES = [
    # (chart, values file, words the error must contain)
    (
        SILO,
        "silo-no-values.yaml",
        ["schema", "job", "silo", "url", "existingSecret", "existingClaim"],
    ),
    (SILO, "silo-bad-url.yaml", ["schema", "url"]),
    (SILO, "silo-typo.yaml", ["schema", "gpu"]),
    (SILO, "silo-bad-gpus.yaml", ["schema", "gpus"]),
    (SILO, "silo-bad-cidr.yaml", ["schema", "cidrs"]),
    (
        SILO,
        "silo-no-egress.yaml",
        ["aggregator.egress.cidrs is empty", "networkPolicy.enabled=false"],
    ),
    (SILO, "silo-two-ca-sources.yaml", ["aggregator.caBundle: set configMap or secret, not both"]),
    (SILO, "silo-plain-http.yaml", ["aggregator.url is plain http://", "insecureAllowPlainHttp=true"]),
    (SILO, "silo-long-poll-too-long.yaml", ["schema", "longPollSeconds"]),
    (HUB, "hub-typo.yaml", ["schema", "operater"]),
    (HUB, "hub-bad-interval.yaml", ["schema", "interval"]),
    (
        HUB,
        "hub-replicas-without-peering.yaml",
        ["operator.replicas > 1 needs operator.peering=true"],
    ),
]


@pytest.mark.parametrize(("chart", "name", "words"), INVALID_CASES, ids=[c[1] for c in INVALID_CASES])
def test_invalid_values_fail_with_a_clear_message(chart: Path, name: str, words: list[str]) -> None:
    # Schema violations fail lint too; a template's `fail` (cross-field rules) fails
    # template/install, while helm 4's lint only reports it.
    commands = ("template", "lint") if words[0] == "schema" else ("template",)
    for command in commands:
        args = ["template", "release", str(chart)] if command == "template" else ["lint", "--strict", str(chart)]
        result = helm(*args, "-f", str(INVALID / name))
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"helm {command} accepted {name}"
        for word in words:
            assert word in output, f"helm {command} with {name}: {word!r} not in:\n{output}"


def test_every_invalid_values_file_is_exercised() -> None:
    assert {p.name for p in INVALID.glob("*.yaml")} == {c[1] for c in INVALID_CASES}


# ---------------------------------------------------------------- hub chart content


def test_chart_crd_copy_is_current() -> None:
    source = ROOT / "crds" / "federatedjob.yaml"
    if not source.exists():
        pytest.skip("crds/federatedjob.yaml is not generated yet")
    copy = HUB / "crds" / "federatedjob.yaml"
    assert copy.exists(), "charts/fedsilo/crds/federatedjob.yaml missing: run scripts/sync-chart-crd.sh"
    assert copy.read_text() == source.read_text(), "chart CRD is stale: run scripts/sync-chart-crd.sh"


def test_chart_dashboard_copy_is_current() -> None:
    copy = HUB / "dashboards" / "fedsilo.json"
    assert copy.exists(), "charts/fedsilo/dashboards/fedsilo.json missing: run scripts/sync-chart-crd.sh"
    assert copy.read_text() == (ROOT / "dashboards" / "fedsilo.json").read_text(), (
        "chart dashboard is stale: run scripts/sync-chart-crd.sh"
    )


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar() -> None:
    configmap = one(render(HUB, HUB / "ci" / "default-values.yaml"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["fedsilo.json"])
    assert dashboard == json.loads((ROOT / "dashboards" / "fedsilo.json").read_text())
    other_namespace = one(render(HUB, HUB / "ci" / "monitoring-values.yaml"), "ConfigMap")
    assert other_namespace["metadata"]["namespace"] == "monitoring"


def test_operator_deployment_runs_the_operator_unprivileged() -> None:
    objects = render(HUB, HUB / "ci" / "default-values.yaml")
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["fedsilo", "operator"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = env_of(container)
    # Every variable the chart sets is one the operator's settings read.
    fields = {f"FEDSILO_{name.upper()}" for name in OperatorSettings.model_fields}
    assert {k for k in env if k.startswith("FEDSILO_")} <= fields
    assert env["FEDSILO_IMAGE"] == container["image"]


def _rbac_allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_cluster_role_is_least_privilege_and_covers_what_the_operator_creates() -> None:
    objects = render(HUB, HUB / "ci" / "default-values.yaml")
    rules = one(objects, "ClusterRole")["rules"]
    for rule in rules:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    # The operator's own children of a real example job, built by its pure manifest builders.
    job = load_job(ROOT / "examples" / "quickstart.yaml")
    tokens = Tokens(admin="a" * 32, silos={s.name: "s" * 32 for s in job.spec.silos})
    children = manifests.job_children(job, "uid-1", tokens, OperatorSettings())
    plural = {
        "Secret": "secrets",
        "ConfigMap": "configmaps",
        "PersistentVolumeClaim": "persistentvolumeclaims",
        "Service": "services",
        "Deployment": "deployments",
        "Job": "jobs",
        "NetworkPolicy": "networkpolicies",
    }
    assert {"Deployment", "Job"} <= {child["kind"] for child in children}
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        verbs = ["create", "get", "list", "watch", "delete"]
        if child["kind"] not in CREATE_ONLY_KINDS:
            verbs.append("patch")
        for verb in verbs:
            assert _rbac_allows(rules, group, plural[child["kind"]], verb), (child["kind"], verb)
    # Silo agent Jobs are created once and never patched (their pod template is immutable).
    assert not _rbac_allows(rules, "batch", "jobs", "patch")
    assert not _rbac_allows(rules, "batch", "jobs", "update")
    for sub in ("federatedjobs", "federatedjobs/status", "federatedjobs/finalizers"):
        assert _rbac_allows(rules, "fedsilo.io", sub, "patch")
    assert _rbac_allows(rules, "", "events", "create")
    assert not _rbac_allows(rules, "", "pods", "create")
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "fedsilo-test"


def test_no_rbac_or_service_account_when_brought_by_the_user() -> None:
    objects = render(HUB, HUB / "ci" / "existing-sa-values.yaml")
    assert not find(objects, "ClusterRole") and not find(objects, "ServiceAccount")
    assert not find(objects, "ConfigMap")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "fedsilo-operator"


def test_service_monitor_selects_the_operators_aggregator_services() -> None:
    assert not find(render(HUB, HUB / "ci" / "default-values.yaml"), "ServiceMonitor")
    monitor = one(render(HUB, HUB / "ci" / "monitoring-values.yaml"), "ServiceMonitor")
    job = load_job(ROOT / "examples" / "quickstart.yaml")
    service = manifests.aggregator_service(job, "uid-1", OperatorSettings())
    labels = service["metadata"]["labels"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value, f"aggregator Service lacks {key}={value}"
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # the separate metrics port: plain HTTP, no token, open to the metrics namespace only
    assert endpoint["port"] == "metrics"
    assert endpoint["scheme"] == service["metadata"]["annotations"]["prometheus.io/scheme"] == "http"
    assert endpoint["honorLabels"] is True  # the dashboard queries the metrics' own `job` label
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["fedsilo-jobs", "hospital-a"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert naming.LABEL_COMPONENT in monitor["spec"]["selector"]["matchLabels"]


# ---------------------------------------------------------------- silo chart content


def _silo_pod(values: str) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    objects = render(SILO, SILO / "ci" / values)
    workload = [o for o in objects if o["kind"] in {"Job", "Deployment"}]
    assert len(workload) == 1
    return objects, workload[0]["spec"]["template"]["spec"]


def test_silo_agent_env_matches_the_agent_settings() -> None:
    from fedsilo.silo_agent.settings import SiloSettings

    _, pod = _silo_pod("minimal-values.yaml")
    container = pod["containers"][0]
    assert container["command"] == ["fedsilo", "silo-agent"]
    env = env_of(container)
    fields = {f"FEDSILO_{name.upper()}" for name in SiloSettings.model_fields}
    assert {k for k in env if k.startswith("FEDSILO_")} <= fields
    assert env["FEDSILO_AGGREGATOR_URL"] == "https://fl.hub.example.org"
    assert env["FEDSILO_JOB"] == "sentiment-demo"
    assert env["FEDSILO_SILO"] == "hospital-a"
    assert env["FEDSILO_TOKEN_FILE"] == "/etc/fedsilo/token/token"  # a file: a rotated token is picked up
    token = {v["name"]: v for v in pod["volumes"]}["token"]["secret"]
    assert (token["secretName"], token["items"]) == ("fedsilo-token", [{"key": "token", "path": "token"}])
    assert env["FEDSILO_DATA_ROOT"] == "/data"
    assert env["FEDSILO_METRICS_PORT"] == "9090"
    assert "FEDSILO_CA_BUNDLE" not in env and "FEDSILO_MODEL_PATH" not in env
    # Settings build from exactly this environment (the token from the mounted Secret).
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    settings = SiloSettings(
        **{k.removeprefix("FEDSILO_").lower(): v for k, v in plain.items() if k.startswith("FEDSILO_")},
    )
    assert settings.silo == "hospital-a" and settings.token_file is not None


def test_silo_agent_is_unprivileged_with_read_only_data() -> None:
    objects, pod = _silo_pod("minimal-values.yaml")
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["restartPolicy"] == "OnFailure"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {
        "claimName": "hospital-a-data",
        "readOnly": True,
    }
    assert "emptyDir" in volumes["cache"]
    assert one(objects, "Job")["spec"]["backoffLimit"] == 6
    # a codec's error-feedback residual outlives a container restart; on a claim, a new pod too
    assert env_of(container)["FEDSILO_STATE_DIR"] == "/state" and mounts["/state"]["name"] == "state"
    assert volumes["state"]["emptyDir"] == {"sizeLimit": "1Gi"}
    claimed_pod = _silo_job("--set", "state.existingClaim=hospital-a-state")["spec"]["template"]["spec"]
    claimed = {v["name"]: v for v in claimed_pod["volumes"]}["state"]
    assert claimed == {"name": "state", "persistentVolumeClaim": {"claimName": "hospital-a-state"}}


def test_silo_network_policy_allows_only_aggregator_and_dns() -> None:
    objects, _ = _silo_pod("gpu-values.yaml")
    policy = one(objects, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    to_aggregator, dns, proxy = policy["egress"]
    assert [peer["ipBlock"]["cidr"] for peer in to_aggregator["to"]] == [
        "203.0.113.10/32",
        "2001:db8::10/128",
    ]
    assert to_aggregator["ports"] == [{"protocol": "TCP", "port": 8443}]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert proxy["to"][0]["ipBlock"]["cidr"] == "10.20.0.5/32"
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 9100}]
    minimal, _ = _silo_pod("minimal-values.yaml")
    egress = one(minimal, "NetworkPolicy")["spec"]["egress"]
    assert len(egress) == 2 and egress[0]["ports"] == [{"protocol": "TCP", "port": 443}]


def test_silo_gpu_ca_model_and_metrics() -> None:
    objects, pod = _silo_pod("gpu-values.yaml")
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "32Gi"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = env_of(container)
    assert env["FEDSILO_CA_BUNDLE"] == "/etc/fedsilo/ca/ca.crt"
    assert env["FEDSILO_MODEL_PATH"] == "/models"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["token"]["secret"]["items"] == [{"key": "hospital-b", "path": "token"}]
    assert volumes["ca-bundle"]["configMap"]["name"] == "hub-ca"
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    assert one(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_silo_mutual_tls_mounts_the_client_certificate() -> None:
    _, pod = _silo_pod("gpu-values.yaml")
    env = env_of(pod["containers"][0])
    assert env["FEDSILO_CLIENT_CERT"] == "/etc/fedsilo/client/tls.crt"
    assert env["FEDSILO_CLIENT_KEY"] == "/etc/fedsilo/client/tls.key"
    volume = next(v for v in pod["volumes"] if v["name"] == "client-cert")
    assert volume["secret"]["secretName"] == "fedsilo-token" and volume["secret"]["defaultMode"] == 0o400
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "client-cert")
    assert mount == {"name": "client-cert", "mountPath": "/etc/fedsilo/client", "readOnly": True}
    _, without = _silo_pod("minimal-values.yaml")
    assert "FEDSILO_CLIENT_CERT" not in env_of(without["containers"][0])


def test_silo_plain_http_only_with_the_loud_insecure_value() -> None:
    plain = ["-f", str(INVALID / "silo-plain-http.yaml")]
    assert helm("template", "release", str(SILO), *plain).returncode != 0
    allowed = helm("template", "release", str(SILO), *plain, "--set", "aggregator.insecureAllowPlainHttp=true")
    assert allowed.returncode == 0, allowed.stderr
    assert "http://fl.hub.example.org" in allowed.stdout


def test_silo_secret_ca_without_network_policy_or_metrics() -> None:
    objects, pod = _silo_pod("secret-ca-no-netpol-values.yaml")
    assert not find(objects, "NetworkPolicy") and not find(objects, "ServiceAccount")
    container = pod["containers"][0]
    env = env_of(container)
    assert env["FEDSILO_CA_BUNDLE"] == "/etc/fedsilo/ca/bundle.pem"
    assert env["FEDSILO_MODEL_PATH"] == "/opt/models/distilbert"
    assert env["FEDSILO_METRICS_PORT"] == "0"
    assert "ports" not in container
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ca-bundle"]["secret"]["secretName"] == "hub-ca"
    assert pod["serviceAccountName"] == "hospital-ml"


# ---------------------------------------------------------------- upgrades and capabilities


def test_service_monitor_without_its_crd_fails_with_what_to_do() -> None:
    for chart, values, words in (
        (HUB, HUB / "ci" / "monitoring-values.yaml", "monitoring.serviceMonitor.enabled needs the Prometheus Operator"),
        (SILO, SILO / "ci" / "gpu-values.yaml", "metrics.serviceMonitor.enabled needs the Prometheus Operator"),
    ):
        result = helm("template", "release", str(chart), "-f", str(values))
        assert result.returncode != 0 and words in result.stderr, result.stderr


def _silo_job(*extra: str) -> dict[str, Any]:
    args = ["template", "release", str(SILO), "-f", str(SILO / "ci" / "minimal-values.yaml"), *extra]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return next(o for o in yaml.safe_load_all(result.stdout) if o and o["kind"] == "Job")


def test_silo_long_poll_is_set_only_when_asked() -> None:
    """Below a proxy's idle timeout when set (0 included: plain polling); unset, the pod template, and
    so the Job's name, stays what earlier chart versions rendered."""
    from fedsilo.silo_agent.settings import SiloSettings

    def long_poll(*extra: str) -> Any:
        return env_of(_silo_job(*extra)["spec"]["template"]["spec"]["containers"][0]).get("FEDSILO_LONG_POLL_SECONDS")

    assert long_poll() is None
    assert long_poll("--set", "aggregator.longPollSeconds=15") == "15"
    assert long_poll("--set", "aggregator.longPollSeconds=0") == "0"
    settings = SiloSettings(aggregator_url="https://hub", job="j", silo="s", token="t" * 16, long_poll_seconds="15")
    assert settings.long_poll_seconds == 15


def test_silo_job_pod_template_is_stable_across_chart_versions() -> None:
    job = _silo_job()
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
    assert labels["app.kubernetes.io/instance"] == "release"
    assert job["metadata"]["labels"]["helm.sh/chart"].startswith("fedsilo-silo-")  # on the Job itself: fine
    # The name carries a hash of the pod template: the same values keep the Job, a new image replaces it.
    assert job["metadata"]["name"].startswith("release-fedsilo-silo-")
    assert _silo_job()["metadata"]["name"] == job["metadata"]["name"]
    assert _silo_job("--set", "image.tag=0.2.0")["metadata"]["name"] != job["metadata"]["name"]


def test_operator_has_probes_and_quiet_logs_by_default() -> None:
    deployment = one(render(HUB, HUB / "ci" / "default-values.yaml"), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    env = env_of(container)
    assert env["FEDSILO_LOG_LEVEL"] == "INFO"
    assert env["FEDSILO_AGGREGATOR_CPU_REQUEST"] == "250m"
    settings = OperatorSettings(
        **{k.removeprefix("FEDSILO_").lower(): v for k, v in env.items() if isinstance(v, str) and k[:8] == "FEDSILO_"}
    )
    assert settings.resync_seconds == 60
