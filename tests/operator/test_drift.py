"""Pure parts of reconciliation: drift, the external silos' URL, conditions and Events of a pass,
which watch events call for a repair; and the Kubernetes client's retries over real HTTP."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from fedsilo.operator import manifests
from fedsilo.operator.children import Desired, key
from fedsilo.operator.drift import drift, external_endpoint
from fedsilo.operator.kube import KubeClient, KubeError, RetryPolicy
from fedsilo.operator.reconciled import Failure, Outcome, reconciled_patch, status_defaults
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tokens import Tokens
from fedsilo.spec import parse_job

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(**aggregator: Any) -> Any:
    return parse_job(
        {
            "apiVersion": "fedsilo.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "demo", "namespace": "fl"},
            "spec": {
                "baseModel": {"path": "/m"},
                "task": {"labels": ["a", "b"]},
                "aggregator": aggregator,
                "silos": [
                    {"name": "a", "data": {"path": "a.csv"}},
                    {"name": "c", "external": True, "data": {"path": "c.csv"}},
                ],
            },
        }
    )


def children(**aggregator: Any) -> list[dict[str, Any]]:
    tokens = Tokens(admin="x" * 20, silos={"a": "a" * 20, "c": "c" * 20})
    return manifests.job_children(job(**aggregator), "uid-1", tokens, OperatorSettings())


def deployment() -> dict[str, Any]:
    return next(c for c in children() if c["kind"] == "Deployment")


# ---------------------------------------------------------------- drift


def test_server_defaults_are_not_drift_but_edits_are() -> None:
    desired = deployment()
    actual = copy.deepcopy(desired)
    actual["spec"]["revisionHistoryLimit"] = 10  # defaulted by the API server
    actual["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    actual["metadata"].update(uid="u", resourceVersion="7", managedFields=[{"manager": "kube-controller-manager"}])
    actual["metadata"]["labels"]["extra"] = "added by someone"
    actual["status"] = {"replicas": 1}
    assert drift(desired, actual) == []

    edited = copy.deepcopy(actual)
    edited["spec"]["replicas"] = 0
    del edited["metadata"]["labels"]["fedsilo.io/job"]
    edited["spec"]["template"]["spec"]["volumes"].pop()
    assert drift(desired, edited) == [
        "spec.replicas",
        "spec.template.spec.volumes",
        "metadata.labels.fedsilo.io/job",
    ]


def test_secret_data_and_policy_rules_are_compared() -> None:
    secret = next(c for c in children() if c["kind"] == "Secret" and c["metadata"]["name"] == "demo-silo-a-token")
    tampered = copy.deepcopy(secret)
    tampered["data"]["token"] = "dGFtcGVyZWQ="
    assert drift(secret, tampered) == ["data.token"]
    policy = next(c for c in children() if c["kind"] == "NetworkPolicy")
    opened = copy.deepcopy(policy)
    opened["spec"]["ingress"][0] = {}  # allow everything
    assert drift(policy, opened) == ["spec.ingress[0].from", "spec.ingress[0].ports"]


# ---------------------------------------------------------------- external silos


def test_external_url_comes_from_spec_or_annotation_and_must_be_https() -> None:
    missing = external_endpoint(job(), {})
    assert (missing.url, missing.ready, missing.reason) == (None, False, "ExternalUrlMissing")
    assert "fedsilo.io/external-url" in missing.message and "c" in missing.message
    insecure = external_endpoint(job(), {"fedsilo.io/external-url": "http://fl.example.org"})
    assert (insecure.url, insecure.reason) == (None, "InsecureExternalUrl")
    annotated = external_endpoint(job(), {"fedsilo.io/external-url": "https://fl.example.org/"})
    assert (annotated.url, annotated.ready) == ("https://fl.example.org", True)
    both = external_endpoint(job(externalUrl="https://spec.example.org"), {"fedsilo.io/external-url": "https://x"})
    assert both.url == "https://spec.example.org" and "spec.aggregator.externalUrl" in both.message


def test_external_silo_secret_never_carries_the_in_cluster_url() -> None:
    def secret(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return next(c for c in items if c["metadata"]["name"] == name)

    tokens = Tokens(admin="x" * 20, silos={"a": "a" * 20, "c": "c" * 20})
    without = manifests.job_children(job(), "u", tokens, OperatorSettings())
    assert "aggregator-url" not in secret(without, "demo-silo-c-token")["data"]
    assert "aggregator-url" in secret(without, "demo-silo-a-token")["data"]  # in-cluster silo: internal URL
    with_url = manifests.job_children(job(), "u", tokens, OperatorSettings(), "https://fl.example.org")
    assert secret(with_url, "demo-silo-c-token")["data"]["aggregator-url"] == "aHR0cHM6Ly9mbC5leGFtcGxlLm9yZw=="


# ---------------------------------------------------------------- a pass's status and Events


def test_a_failed_pass_is_a_condition_and_one_warning_per_problem() -> None:
    failure = Failure("Job hospital/demo-silo-a", "NamespaceNotFound", "namespace hospital does not exist", "hospital")
    outcome = Outcome(applied=9, failures=[failure], endpoint=external_endpoint(job(), {}))
    fields, events = reconciled_patch(job(), outcome, {}, 3, NOW)
    conditions = {c["type"]: c for c in fields["conditions"]}
    assert conditions["ChildrenReady"]["status"] == "False"
    assert conditions["ChildrenReady"]["reason"] == "NamespaceNotFound"
    assert conditions["ChildrenReady"]["observedGeneration"] == 3
    assert conditions["ExternalSilosReady"]["reason"] == "ExternalUrlMissing"
    assert conditions["AggregatorReady"]["status"] == "Unknown"  # until the aggregator answers
    assert fields["externalSilos"] == [{"name": "c", "tokenSecret": "demo-silo-c-token"}]
    assert [(e.type, e.reason) for e in events] == [("Warning", "NamespaceNotFound"), ("Warning", "ExternalUrlMissing")]
    # The same problems again: the conditions hold, no new Events.
    again_fields, again = reconciled_patch(job(), outcome, fields, 3, NOW)
    assert again == [] and again_fields["conditions"] == fields["conditions"]
    # Fixed: True, and a Normal Event for what was created.
    fixed = Outcome(applied=10, created=["Job hospital/demo-silo-a"], endpoint=external_endpoint(job(), {}))
    fields, events = reconciled_patch(job(), fixed, fields, 3, NOW)
    assert {c["type"]: c["status"] for c in fields["conditions"]}["ChildrenReady"] == "True"
    assert [(e.type, e.reason) for e in events] == [("Normal", "Created")]
    assert status_defaults(job()) == {"phase": "Pending", "round": 0, "rounds": 3}


# ---------------------------------------------------------------- which watch events repair


def test_desired_state_decides_which_watch_events_need_a_repair() -> None:
    desired = Desired()
    items = children()
    tokens_key = ("Secret", "fl", "demo-tokens")
    desired.remember(("fl", "demo"), items, [tokens_key])
    live = copy.deepcopy(deployment())
    assert desired.needs_repair("DELETED", live)
    assert not desired.needs_repair("MODIFIED", live)  # as applied
    live["spec"]["replicas"] = 3
    assert desired.needs_repair("MODIFIED", live)
    assert desired.drifted(live) == ["spec.replicas"]
    assert not desired.needs_repair("ADDED", live)
    assert not desired.needs_repair(None, live)  # the initial listing
    silo_job = next(c for c in items if c["kind"] == "Job")
    assert not desired.needs_repair("MODIFIED", {**silo_job, "spec": {}})  # created once, never patched
    tokens = next(c for c in items if key(c) == tokens_key)
    assert not desired.needs_repair("MODIFIED", {**tokens, "data": {}})  # extended by spec changes
    assert desired.needs_repair("DELETED", tokens)
    stranger = {"kind": "Deployment", "metadata": {"name": "other", "namespace": "fl"}}
    assert not desired.needs_repair("DELETED", stranger)
    desired.forget(("fl", "demo"))  # the job is being deleted: its children's deletions are expected
    assert not desired.needs_repair("DELETED", live)


# ---------------------------------------------------------------- retries over real HTTP


class Scripted(BaseHTTPRequestHandler):
    """Answers from a script of (status, headers, body); records every request."""

    script: ClassVar[list[tuple[int, dict[str, str], dict[str, Any]]]] = []
    seen: ClassVar[list[tuple[str, str, str]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).seen.append((self.command, self.path, self.headers.get("Content-Type", "")))
        status, headers, body = type(self).script.pop(0) if type(self).script else (200, {}, {})
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Scripted.script, Scripted.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def test_429_and_5xx_are_retried_with_retry_after(server: str) -> None:
    Scripted.script = [
        (503, {}, {"reason": "ServiceUnavailable", "message": "etcd leader changed"}),
        (429, {"Retry-After": "0"}, {"reason": "TooManyRequests", "message": "slow down"}),
        (200, {}, {"kind": "Secret", "metadata": {"name": "s"}}),
    ]
    client = KubeClient.from_url(server, FAST)
    found = asyncio.run(client.get("v1", "Secret", "fl", "s"))
    assert found == {"kind": "Secret", "metadata": {"name": "s"}}
    assert [s[0] for s in Scripted.seen] == ["GET", "GET", "GET"]


def test_retries_end_in_an_error_and_answers_are_not_retried(server: str) -> None:
    Scripted.script = [(500, {}, {"message": "boom"})] * 4
    client = KubeClient.from_url(server, FAST)
    with pytest.raises(KubeError) as failed:
        asyncio.run(client.get("v1", "Secret", "fl", "s"))
    assert failed.value.status == 500 and len(Scripted.seen) == 4
    Scripted.seen.clear()
    Scripted.script = [(409, {}, {"reason": "AlreadyExists", "message": "exists"})]
    with pytest.raises(KubeError) as exists:
        asyncio.run(client.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "fl"}}))
    assert exists.value.reason == "AlreadyExists" and len(Scripted.seen) == 1


def test_apply_is_server_side_apply_as_fedsilo_operator(server: str) -> None:
    Scripted.script = [(201, {}, {"kind": "ConfigMap"}), (200, {}, {"kind": "ConfigMap"})]
    client = KubeClient.from_url(server, FAST)
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "fl"}}
    assert asyncio.run(client.apply(manifest))[1] is True  # 201: created
    assert asyncio.run(client.apply(manifest))[1] is False
    method, path, content_type = Scripted.seen[0]
    assert method == "PATCH" and content_type == "application/apply-patch+yaml"
    assert path == "/api/v1/namespaces/fl/configmaps/c?fieldManager=fedsilo-operator&force=true"


def test_a_server_that_is_down_is_retried_then_reported() -> None:
    client = KubeClient.from_url("http://127.0.0.1:9", FAST)  # discard port: connection refused
    with pytest.raises(KubeError) as failed:
        asyncio.run(client.get("v1", "Secret", "fl", "s"))
    assert failed.value.status == 0


def test_every_child_names_its_component_and_the_aggregator_is_not_best_effort() -> None:
    items = children()
    policies = {c["metadata"]["name"]: c["metadata"]["labels"] for c in items if c["kind"] == "NetworkPolicy"}
    assert policies["demo-aggregator"]["app.kubernetes.io/component"] == "aggregator"
    assert policies["demo-silo-a"]["app.kubernetes.io/component"] == "silo-agent"
    container = deployment()["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "512Mi"}
