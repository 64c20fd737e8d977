"""The tenancy policy (pure): which silo namespaces, volumes and aggregator images a job may ask for."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tenancy import (
    ADMITTED,
    TenancyPolicy,
    admission_patch,
    image_repository,
    never_admitted,
    working_namespaces,
)
from fedsilo.spec import FederatedJob, load_job, parse_job

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64


def job(*silos: dict[str, Any], image: str | None = None, namespace: str = "fl") -> FederatedJob:
    spec: dict[str, Any] = {"baseModel": {"path": "/models/m"}, "task": {"labels": ["n", "p"]}, "silos": list(silos)}
    if image is not None:
        spec["aggregator"] = {"image": image}
    return parse_job(
        {"apiVersion": "fedsilo.io/v1alpha1", "kind": "FederatedJob", "metadata": {"name": "j", "namespace": namespace},
         "spec": spec}
    )


def silo(name: str = "a", **extra: Any) -> dict[str, Any]:
    return {"name": name, "data": {"path": f"{name}.csv"}, **extra}


DEFAULT = TenancyPolicy.from_settings(OperatorSettings())


def test_defaults_admit_a_job_in_its_own_namespace_with_the_operators_image() -> None:
    ok = job(silo("a"), silo("b", namespace="fl", volume={"persistentVolumeClaim": "data"}),
             silo("c", external=True, namespace="elsewhere"), image="ghcr.io/fedsilo/fedsilo:0.2.0")
    assert DEFAULT.check(ok, {}) == []
    assert DEFAULT.labels_needed(ok) == []  # no opt-in label configured: nothing to read


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_is_admitted_by_default(example: Path) -> None:
    assert DEFAULT.check(load_job(example), {}) == []


def test_a_silo_in_another_namespace_is_refused_by_default() -> None:
    (problem,) = DEFAULT.check(job(silo("b", namespace="hospital-b")), {})
    assert problem.startswith("silo b: namespace hospital-b is not open to fedsilo silos")
    assert "use the job's own namespace" in problem


def test_allow_list_globs_open_namespaces() -> None:
    policy = TenancyPolicy.from_settings(OperatorSettings(silo_namespaces="hospital-*, research"))
    assert policy.check(job(silo("b", namespace="hospital-b"), silo("r", namespace="research")), {}) == []
    (problem,) = policy.check(job(silo("x", namespace="hospitalx")), {})
    assert "siloNamespaces (hospital-*, research)" in problem


def test_a_namespace_opts_in_by_label() -> None:
    policy = TenancyPolicy.from_settings(OperatorSettings(silo_namespace_label="fedsilo.io/silos=allowed"))
    wanted = job(silo("a"), silo("b", namespace="hospital-b"))
    assert policy.labels_needed(wanted) == ["hospital-b"]
    assert policy.check(wanted, {"hospital-b": {"fedsilo.io/silos": "allowed"}}) == []
    (wrong_value,) = policy.check(wanted, {"hospital-b": {"fedsilo.io/silos": "no"}})
    assert "one labelled fedsilo.io/silos=allowed" in wrong_value
    assert policy.check(wanted, {"hospital-b": None})  # missing namespace: not opted in
    assert policy.check(wanted, {})
    any_value = TenancyPolicy.from_settings(OperatorSettings(silo_namespace_label="fedsilo.io/silos"))
    assert any_value.check(wanted, {"hospital-b": {"fedsilo.io/silos": "yes"}}) == []


def test_host_path_is_refused_unless_allowed() -> None:
    wanted = job(silo("a", volume={"hostPath": "/var/lib/hospital"}))
    (problem,) = DEFAULT.check(wanted, {})
    assert problem.startswith("silo a: hostPath volumes are refused")
    assert TenancyPolicy(allow_host_path=True).check(wanted, {}) == []


def test_writable_data_is_refused_unless_allowed_scratch_is_fine() -> None:
    writable = job(silo("a", volume={"persistentVolumeClaim": "data", "readOnly": False}))
    (problem,) = DEFAULT.check(writable, {})
    assert "must be mounted read-only" in problem
    assert TenancyPolicy(allow_writable_data=True).check(writable, {}) == []
    assert DEFAULT.check(job(silo("a", volume={"emptyDir": True, "readOnly": False})), {}) == []
    # An external silo has no pod here: its volume is never mounted by this operator.
    assert DEFAULT.check(job(silo("a"), silo("e", external=True, volume={"hostPath": "/x"})), {}) == []


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("ghcr.io/fedsilo/fedsilo", True),
        ("ghcr.io/fedsilo/fedsilo:0.3.1", True),
        (f"ghcr.io/fedsilo/fedsilo@{DIGEST}", True),
        (f"ghcr.io/fedsilo/fedsilo:0.3.1@{DIGEST}", True),
        ("ghcr.io/fedsilo/fedsilo-evil:1", False),
        ("ghcr.io/fedsilo/fedsilo:1/../x", False),
        ("attacker.example/fedsilo:0.1.0", False),
        ("registry.example.org/team/agg:7", True),
        ("registry.example.org/other/agg:7", False),
    ],
)
def test_aggregator_image_allow_list(image: str, allowed: bool) -> None:
    policy = TenancyPolicy.from_settings(OperatorSettings(aggregator_images="registry.example.org/team/*"))
    problems = policy.check(job(silo("a"), image=image), {})
    assert (problems == []) == allowed, problems
    if not allowed:
        assert problems[0].startswith(f"spec.aggregator.image {image} is not allowed")


def test_image_repository_keeps_registry_ports() -> None:
    assert image_repository("localhost:5000/fedsilo:0.1.0") == "localhost:5000/fedsilo"
    assert image_repository("localhost:5000/fedsilo") == "localhost:5000/fedsilo"
    assert image_repository(f"ghcr.io/a/b:1@{DIGEST}") == "ghcr.io/a/b"


def test_every_problem_is_reported_at_once() -> None:
    wanted = job(
        silo("a", namespace="other", volume={"hostPath": "/srv", "readOnly": False}),
        image="attacker.example/x:1",
    )
    assert len(DEFAULT.check(wanted, {})) == 4


def _condition(fields: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in fields["conditions"] if c["type"] == ADMITTED)


def test_refused_from_the_start_is_failed_with_the_reasons() -> None:
    fields, events = admission_patch(["silo b: nope"], {}, 1, NOW)
    assert fields["phase"] == "Failed" and "silo b: nope" in fields["message"]
    assert _condition(fields)["status"] == "False" and _condition(fields)["reason"] == "Refused"
    assert [(e.type, e.reason) for e in events] == [("Warning", "Refused")]
    assert never_admitted(fields)
    # Fixed: admitted, back to Pending, a Normal Event.
    fields2, events2 = admission_patch([], fields, 2, NOW)
    assert fields2["phase"] == "Pending" and _condition(fields2)["status"] == "True"
    assert [(e.type, e.reason) for e in events2] == [("Normal", "Admitted")]
    assert not never_admitted(fields2)


def test_an_edit_refused_after_admission_leaves_the_phase_to_the_aggregator() -> None:
    admitted, events = admission_patch([], {}, 1, NOW)
    assert events == [] and "phase" not in admitted
    running = {**admitted, "phase": "Running"}
    fields, events = admission_patch(["silo b: nope"], running, 2, NOW)
    assert "phase" not in fields and _condition(fields)["reason"] == "ChangeRefused"
    assert events[0].reason == "ChangeRefused" and "generation 2" in events[0].message
    assert not never_admitted(fields)
    # A job from before this condition existed, with children: also a refused change.
    legacy = {"phase": "Running", "conditions": [{"type": "ChildrenReady", "status": "True"}]}
    assert _condition(admission_patch(["x"], legacy, 3, NOW)[0])["reason"] == "ChangeRefused"


def test_working_namespaces_are_the_watched_and_the_silo_namespaces() -> None:
    assert working_namespaces(OperatorSettings()) == ()  # cluster-wide
    assert working_namespaces(OperatorSettings(silo_namespaces="hospital-a")) == ()
    namespaced = OperatorSettings(watch_namespaces="fl, team", silo_namespaces="hospital-a,fl")
    assert working_namespaces(namespaced) == ("fl", "team", "hospital-a")
    # A glob cannot be enumerated: lists go cluster-wide (the chart refuses globs with Roles).
    assert working_namespaces(OperatorSettings(watch_namespaces="fl", silo_namespaces="hospital-*")) == ()
