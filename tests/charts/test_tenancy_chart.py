"""The hub chart's tenancy: RBAC narrowed to the watched and silo namespaces, the admission policy
mirroring the operator's rules from the same values (its CEL runs on a real API server in
tests/operator/test_admission_real_cluster.py)."""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

import pytest
import yaml
from tests.charts.test_charts import HUB, _rbac_allows, env_of, find, helm, one, render

from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tenancy import TenancyPolicy

DEFAULTS = HUB / "ci" / "default-values.yaml"
NAMESPACED = HUB / "ci" / "monitoring-values.yaml"  # watchNamespaces [fedsilo-jobs, team-a], silos in hospital-a
OPEN = HUB / "ci" / "tenancy-values.yaml"
CHILDREN = [
    ("", "secrets"),
    ("", "configmaps"),
    ("", "services"),
    ("", "persistentvolumeclaims"),
    ("apps", "deployments"),
    ("batch", "jobs"),
    ("networking.k8s.io", "networkpolicies"),
]


def policy(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(objects, "ValidatingAdmissionPolicy")


def variable(objects: tuple[dict[str, Any], ...], name: str) -> str:
    """The CEL expression of one of the policy's variables."""
    return next(v["expression"] for v in policy(objects)["spec"]["variables"] if v["name"] == name)


def validation(objects: tuple[dict[str, Any], ...], words: str) -> dict[str, Any] | None:
    """The policy's validation whose message mentions `words`."""
    found = [v for v in policy(objects)["spec"]["validations"] if words in v["messageExpression"]]
    return found[0] if found else None


def regexes(expression: str) -> list[str]:
    """The JSON list literal of regexes in a CEL expression."""
    start = expression.find('["')
    return list(json.JSONDecoder().raw_decode(expression, start)[0]) if start >= 0 else []


def test_cluster_wide_mode_keeps_one_cluster_role_and_no_roles() -> None:
    objects = render(HUB, DEFAULTS)
    rules = one(objects, "ClusterRole")["rules"]
    for group, resource in CHILDREN:
        assert _rbac_allows(rules, group, resource, "create"), resource
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    # Narrowed: kopf only patches jobs and posts events; no peering rights without peering.
    assert not _rbac_allows(rules, "fedsilo.io", "federatedjobs", "update")
    assert not _rbac_allows(rules, "", "events", "patch")
    assert not any("kopf.dev" in r["apiGroups"] for r in rules)


def test_namespaced_mode_grants_secrets_and_jobs_only_in_watched_and_silo_namespaces() -> None:
    objects = render(HUB, NAMESPACED)
    cluster_rules = one(objects, "ClusterRole")["rules"]
    assert {r for rule in cluster_rules for r in rule["resources"]} == {"namespaces", "customresourcedefinitions"}
    for rule in cluster_rules:
        assert set(rule["verbs"]) <= {"get", "list", "watch", "patch"}
    ca = [r for r in find(objects, "Role") if r["metadata"]["name"].endswith("-ca")]
    assert [(r["metadata"]["namespace"], r["rules"]) for r in ca] == [
        ("fedsilo-test", [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]}])
    ]  # the operator's own CA (TLS), in its own namespace
    roles = {r["metadata"]["namespace"]: r["rules"] for r in find(objects, "Role") if r not in ca}
    assert set(roles) == {"fedsilo-jobs", "team-a", "hospital-a"}
    for namespace in ("fedsilo-jobs", "team-a"):
        for group, resource in CHILDREN:
            assert _rbac_allows(roles[namespace], group, resource, "create"), (namespace, resource)
        assert _rbac_allows(roles[namespace], "fedsilo.io", "federatedjobs", "watch")
        assert _rbac_allows(roles[namespace], "", "events", "create")
    silo_only = roles["hospital-a"]
    for group, resource in [("", "secrets"), ("batch", "jobs"), ("networking.k8s.io", "networkpolicies")]:
        assert _rbac_allows(silo_only, group, resource, "create"), resource
    for group, resource in [("apps", "deployments"), ("", "services"), ("", "configmaps")]:
        assert not _rbac_allows(silo_only, group, resource, "create"), resource
    assert not _rbac_allows(silo_only, "fedsilo.io", "federatedjobs", "get")
    bindings = {
        b["metadata"]["namespace"]: b for b in find(objects, "RoleBinding") if not b["metadata"]["name"].endswith("-ca")
    }
    assert set(bindings) == set(roles)
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    assert all(b["subjects"][0]["name"] == sa and b["roleRef"]["kind"] == "Role" for b in bindings.values())


def test_namespaced_mode_refuses_globs() -> None:
    result = helm("template", "r", str(HUB), "--set", "operator.watchNamespaces={fl,team-*}")
    assert result.returncode != 0
    assert "team-* is a glob: with operator.watchNamespaces the operator's rights are Roles" in result.stderr


def test_operator_settings_come_from_the_tenancy_values() -> None:
    env = env_of(one(render(HUB, OPEN), "Deployment")["spec"]["template"]["spec"]["containers"][0])
    settings = OperatorSettings(
        **{
            k.removeprefix("FEDSILO_").lower(): v
            for k, v in env.items()
            if k.startswith("FEDSILO_") and isinstance(v, str)
        }
    )
    assert settings.silo_namespaces == "hospital-*,research"
    assert settings.silo_namespace_label == "fedsilo.io/silos=allowed"
    assert settings.allow_writable_data is True and settings.allow_host_path is False
    assert settings.aggregator_images == "registry.example.org/fl/aggregator:*"


def test_admission_policy_mirrors_the_defaults() -> None:
    objects = render(HUB, DEFAULTS)
    spec = policy(objects)["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"][0]["resources"] == ["federatedjobs"]
    assert validation(objects, "hostPath") and validation(objects, "read-only")
    assert validation(objects, "namespace not open") is not None
    assert regexes(variable(objects, "foreign")) == []  # the job's own namespace only
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy(objects)["metadata"]["name"], "validationActions": ["Deny"]}
    image = validation(objects, "spec.aggregator.image")
    assert image is not None
    (own,) = regexes(image["expression"])
    deployment_image = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(own, deployment_image) and not re.fullmatch(own, deployment_image + "-evil:1")


def test_opt_in_label_leaves_namespaces_to_the_operator() -> None:
    objects = render(HUB, OPEN)
    assert validation(objects, "namespace not open") is None  # CEL cannot read the namespace's labels
    assert validation(objects, "read-only") is None  # allowWritableData
    assert validation(objects, "hostPath") is not None
    assert one(objects, "ValidatingAdmissionPolicyBinding")["spec"]["validationActions"] == ["Warn", "Audit"]


@pytest.mark.parametrize("namespace", ["hospital-a", "hospital-", "hospital", "research", "research-x", "a.b"])
def test_chart_namespace_globs_match_as_the_operator_reads_them(namespace: str) -> None:
    globs = "hospital-*,research"
    result = helm(
        "template",
        "r",
        str(HUB),
        "--set",
        f"tenancy.siloNamespaces={{{globs}}}",
        "-s",
        "templates/admission-policy.yaml",
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "ValidatingAdmissionPolicy"]
    foreign = variable(tuple(docs), "foreign")
    chart = any(re.fullmatch(r, namespace) for r in regexes(foreign))
    operator = TenancyPolicy.from_settings(OperatorSettings(silo_namespaces=globs)).listed(namespace)
    assert chart == operator == any(fnmatch.fnmatchcase(namespace, g) for g in globs.split(","))


def test_admission_policy_needs_kubernetes_1_30() -> None:
    old = helm("template", "r", str(HUB), "--kube-version", "1.29.0")
    assert old.returncode != 0
    assert "tenancy.admissionPolicy.enabled needs ValidatingAdmissionPolicy" in old.stderr
    assert "(Kubernetes v1.29.0)" in old.stderr
    off = ("--set", "tenancy.admissionPolicy.enabled=false")
    without = helm("template", "r", str(HUB), "--kube-version", "1.29.0", *off)
    assert without.returncode == 0, without.stderr
    assert "kind: ValidatingAdmissionPolicy" not in without.stdout
