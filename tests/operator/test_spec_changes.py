"""Spec changes and resumes, the pure parts: tokens, error kinds, conditions, Events, silo Jobs."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import yaml

from fedsilo.api.models import JobStatus
from fedsilo.operator import naming
from fedsilo.operator.aggregator_client import (
    AggregatorClient,
    AggregatorError,
    AggregatorRefused,
    is_transient,
    retry_delay,
)
from fedsilo.operator.manifests import job_configmap, job_document, silo_jobs_to_restart
from fedsilo.operator.reporting import merged_status
from fedsilo.operator.status import (
    SpecOutcome,
    job_status_patch,
    merged_conditions,
    refusal_reason,
    resume_patch,
    spec_applied_patch,
)
from fedsilo.operator.tokens import Tokens, added_silo_tokens, complete_tokens
from fedsilo.spec import FederatedJob, parse_job

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def make_job(*silos: str) -> FederatedJob:
    return parse_job(
        {
            "apiVersion": "fedsilo.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "demo", "namespace": "fl"},
            "spec": {
                "baseModel": {"path": "/data/models/minilm"},
                "task": {"labels": ["neg", "pos"]},
                "silos": [{"name": s, "data": {"path": f"{s}.csv"}} for s in silos],
            },
        }
    )


# ---- tokens ----------------------------------------------------------------------------


def test_tokens_follow_the_silos_of_the_spec() -> None:
    first = complete_tokens(None, make_job("a", "b").spec)
    later = complete_tokens(first, make_job("a", "c").spec)
    assert later.admin == first.admin
    assert later.silos["a"] == first.silos["a"]  # never rotated
    assert set(later.silos) == {"a", "c"}  # b's token dropped, c's generated
    assert len(later.silos["c"]) >= 16 and later.silos["c"] not in first.silos.values()
    back = complete_tokens(later, make_job("a", "b", "c").spec)
    assert back.silos["b"] != first.silos["b"]  # a silo added back gets a new token


def test_tokens_are_sent_for_the_silos_the_aggregator_does_not_run() -> None:
    tokens = Tokens(admin="x" * 43, silos={"a": "a" * 43, "c": "c" * 43, "d": "d" * 43})
    spec = make_job("a", "c", "d").spec
    assert added_silo_tokens(tokens, spec, known=["a", "b", "c"]) == {"d": "d" * 43}
    assert added_silo_tokens(tokens, spec, known=["a", "c", "d"]) == {}


def test_the_document_sent_is_the_configmaps() -> None:
    job = make_job("a", "b")
    config = job_configmap(job, "uid")
    assert yaml.safe_load(config["data"]["job.yaml"]) == job_document(job)
    assert parse_job(job_document(job)) == job


# ---- the aggregator's answers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "transient"),
    [
        (503, None, True),
        (500, "internal", True),
        (429, None, True),
        (409, "conflict", True),
        (409, "fenced", True),
        (409, "not_failed", False),
        (422, "immutable", False),
        (422, "invalid", False),
        (404, "not_found", False),
    ],
)
def test_which_answers_are_retried(status: int, reason: str | None, transient: bool) -> None:
    assert is_transient(status, reason) is transient


def test_retry_delay_grows_and_is_capped() -> None:
    delays = [retry_delay(n, 10.0) for n in range(8)]
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0]
    assert delays[-1] == 300.0 and delays == sorted(delays)
    assert retry_delay(10_000, 0.3) == 300.0


def answering(status: int, body: dict[str, Any], seen: list[httpx.Request]) -> AggregatorClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    return AggregatorClient("http://agg:8080", "admin-token", transport=httpx.MockTransport(handle))


def test_client_sends_the_document_and_the_added_tokens() -> None:
    seen: list[httpx.Request] = []
    client = answering(200, {}, seen)
    document = job_document(make_job("a"))
    asyncio.run(client.apply_spec("demo", document, {"a": "a" * 20}))
    (request,) = seen
    assert request.method == "PATCH" and request.url.path == "/v1/jobs/demo"
    assert request.headers["Authorization"] == "Bearer admin-token"
    assert json.loads(request.content) == {"job": document, "silo_tokens": {"a": "a" * 20}}


def test_client_tells_refusals_from_transient_failures() -> None:
    seen: list[httpx.Request] = []
    refused = answering(409, {"detail": "job demo is Running", "reason": "not_failed"}, seen)
    with pytest.raises(AggregatorRefused) as info:
        asyncio.run(refused.resume("demo"))
    assert info.value.reason == "not_failed" and info.value.detail == "job demo is Running"
    assert json.loads(seen[-1].content) == {"resume": True}

    fenced = answering(409, {"detail": "another writer holds the job", "reason": "fenced"}, seen)
    with pytest.raises(AggregatorError) as error:
        asyncio.run(fenced.resume("demo"))
    assert not isinstance(error.value, AggregatorRefused)

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    down = AggregatorClient("http://agg:8080", "t", transport=httpx.MockTransport(unreachable))
    with pytest.raises(AggregatorError) as error:
        asyncio.run(down.apply_spec("demo", {}, {}))
    assert not isinstance(error.value, AggregatorRefused)


@pytest.mark.parametrize(
    ("reason", "expected"), [("immutable", "Immutable"), ("invalid_spec", "InvalidSpec"), (None, "Refused")]
)
def test_refusal_reasons_become_condition_reasons(reason: str | None, expected: str) -> None:
    assert refusal_reason(reason) == expected


# ---- ConfigApplied ----------------------------------------------------------------------------


def spec_applied(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "ConfigApplied")


def external_ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "ExternalSilosReady")


def test_an_accepted_change_sets_spec_applied_and_a_normal_event() -> None:
    outcome = SpecOutcome(True, "Applied", "generation 2 applied by the aggregator; silos added: d")
    patch, events = spec_applied_patch(outcome, {}, 2, NOW)
    found = spec_applied(patch)
    assert (found["status"], found["reason"], found["observedGeneration"]) == ("True", "Applied", 2)
    assert [(e.type, e.reason) for e in events] == [("Normal", "ConfigApplied")]
    assert "silos added: d" in events[0].message


def test_a_refused_change_sets_spec_applied_false_and_a_warning() -> None:
    outcome = SpecOutcome(False, "Immutable", "spec.peft.r cannot change mid-job")
    patch, events = spec_applied_patch(outcome, {}, 3, NOW)
    found = spec_applied(patch)
    assert (found["status"], found["reason"], found["message"]) == (
        "False",
        "Immutable",
        "spec.peft.r cannot change mid-job",
    )
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Warning", "Immutable", "spec.peft.r cannot change mid-job")
    ]


def test_unreachable_is_unknown_and_warned_once_per_generation() -> None:
    outcome = SpecOutcome(None, "AggregatorUnreachable", "agg unreachable")
    first, events = spec_applied_patch(outcome, {}, 4, NOW)
    assert spec_applied(first)["status"] == "Unknown" and len(events) == 1
    again, events = spec_applied_patch(outcome, first, 4, LATER)
    assert events == []  # retries do not spam Events
    assert spec_applied(again)["lastTransitionTime"] == spec_applied(first)["lastTransitionTime"]
    _, events = spec_applied_patch(outcome, first, 5, LATER)
    assert [e.reason for e in events] == ["AggregatorUnreachable"]  # a newer change: warned again
    applied, _ = spec_applied_patch(SpecOutcome(True, "Applied", "ok"), again, 5, LATER)
    assert spec_applied(applied)["lastTransitionTime"] == "2026-01-01T12:05:00Z"


def test_conditions_are_merged_by_type() -> None:
    old = [
        {"type": "AggregatorReady", "status": "True", "lastTransitionTime": "t0"},
        {"type": "ConfigApplied", "status": "Unknown", "lastTransitionTime": "t0"},
    ]
    new = [
        {"type": "ConfigApplied", "status": "Unknown", "reason": "AggregatorUnreachable", "lastTransitionTime": "t9"},
        {"type": "Failed", "status": "False", "lastTransitionTime": "t9"},
    ]
    merged = merged_conditions(old, new)
    assert [c["type"] for c in merged] == ["AggregatorReady", "ConfigApplied", "Failed"]
    assert merged[1]["reason"] == "AggregatorUnreachable" and merged[1]["lastTransitionTime"] == "t0"


def test_the_status_poll_keeps_spec_applied() -> None:
    previous, _ = spec_applied_patch(SpecOutcome(True, "Applied", "ok"), {}, 2, NOW)
    status = JobStatus.model_validate(
        {
            "name": "demo",
            "phase": "Running",
            "round": 1,
            "rounds": 3,
            "version": 0,
            "accuracy": None,
            "loss": None,
            "silos": [],
            "created_at": NOW,
            "started_at": NOW,
            "finished_at": None,
        }
    )
    patch, _ = job_status_patch(status, previous, 2, LATER)
    assert spec_applied(patch)["status"] == "True"
    assert {c["type"] for c in patch["conditions"]} == {
        "AggregatorReady",
        "SilosReady",
        "Succeeded",
        "Failed",
        "ConfigApplied",
    }



def test_a_status_write_computed_from_a_stale_status_never_undoes_a_newer_write() -> None:
    """A handler computes its status fields from the status it read (`seen`); by the time they are
    written another writer may have moved on (seen under load: a create handler's
    ExternalUrlMissing after the URL was published; a generation-1 ConfigApplied after
    generation 2's): what changed since stays, and a newer generation still wins."""
    missing = {"type": "ExternalSilosReady", "status": "False", "reason": "ExternalUrlMissing", "observedGeneration": 1}
    published = {"type": "ExternalSilosReady", "status": "True", "reason": "UrlPublished", "observedGeneration": 1}
    gen1, _ = spec_applied_patch(SpecOutcome(True, "Applied", "generation 1"), {}, 1, NOW)
    gen2, _ = spec_applied_patch(SpecOutcome(True, "Applied", "generation 2"), gen1, 2, LATER)
    seen = {"phase": "Pending", "conditions": gen1["conditions"]}
    writes = [{"phase": "Running", "conditions": [missing]}, {"conditions": gen2["conditions"]}]  # from `seen`
    later: dict[str, Any] = {"phase": "Succeeded", "externalSilos": [], "conditions": [*gen1["conditions"], published]}
    for fields in writes:
        later = merged_status(later, fields, seen)
    assert later["phase"] == "Succeeded"  # changed since `seen`: the newer value stays
    assert external_ready(later)["reason"] == "UrlPublished"
    assert spec_applied(later)["observedGeneration"] == 2  # a newer generation still wins
    # Written over the status it was computed from, everything is written.
    fresh: dict[str, Any] = dict(seen)
    for fields in writes:
        fresh = merged_status(fresh, fields, seen)
    assert fresh["phase"] == "Running"
    assert external_ready(fresh)["reason"] == "ExternalUrlMissing"


# ---- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "event_type", "reason"),
    [("Resumed", "Normal", "Resumed"), ("NotFailed", "Normal", "NotResumed"), ("Refused", "Warning", "ResumeRefused")],
)
def test_a_handled_resume_is_recorded_with_its_event(outcome: Any, event_type: str, reason: str) -> None:
    patch, events = resume_patch("1717171717", outcome, "detail", ["demo-silo-a"], NOW)
    assert patch["resumeRequest"]["value"] == "1717171717"
    assert patch["resumeRequest"]["outcome"] == outcome
    assert [(e.type, e.reason) for e in events] == [(event_type, reason)]


def batch_job(name: str, finished: str | None, silo: str | None = "a") -> dict[str, Any]:
    labels = {naming.LABEL_JOB: "demo"} | ({naming.LABEL_SILO: silo} if silo else {})
    conditions = [{"type": finished, "status": "True"}] if finished else []
    return {"metadata": {"name": name, "namespace": "fl", "labels": labels}, "status": {"conditions": conditions}}


def test_silo_jobs_that_gave_up_are_restarted() -> None:
    jobs = [
        batch_job("demo-silo-a", "Failed"),
        batch_job("demo-silo-b", "Complete", "b"),  # its agent saw the job Succeed: done
        batch_job("demo-silo-c", None, "c"),  # still running
        batch_job("other", "Failed", silo=None),  # not a silo agent
        {
            "metadata": {"name": "demo-silo-d", "labels": {naming.LABEL_SILO: "d"}},
            "status": {"conditions": [{"type": "Failed", "status": "False"}]},
        },
    ]
    assert [j["metadata"]["name"] for j in silo_jobs_to_restart(jobs)] == ["demo-silo-a"]
