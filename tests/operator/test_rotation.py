"""Token rotation decisions (`operator/rotation.py`), without a cluster or an aggregator."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from fedsilo.operator import rotation
from fedsilo.operator.rotation import Rotated, RotationState
from fedsilo.operator.tokens import Tokens, decode, encode

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TOKENS = Tokens(admin="admin-token-0123456789", silos={"a": "old-a-0123456789", "b": "old-b-0123456789"})


def secret(annotations: dict[str, str] | None = None, pending: dict[str, str] | None = None) -> dict[str, Any]:
    data = TOKENS.secret_data()
    if pending is not None:
        data[rotation.PENDING_KEY] = encode(json.dumps(pending))
    return {"metadata": {"annotations": annotations or {}, "resourceVersion": "7"}, "data": data}


def test_the_request_is_the_annotation_value_stripped() -> None:
    assert rotation.requested({rotation.ROTATE_ANNOTATION: " 1700000000 "}) == "1700000000"
    assert rotation.requested({rotation.ROTATE_ANNOTATION: "  "}) is None
    assert rotation.requested({"other": "x"}) is None and rotation.requested(None) is None


def test_the_secret_records_handled_and_pending_rotations() -> None:
    assert rotation.rotation_state(None) == RotationState()
    assert rotation.rotation_state(secret()) == RotationState()
    recorded = secret(
        {rotation.HANDLED_ANNOTATION: "1", rotation.PENDING_ANNOTATION: "2"}, pending={"a": "new-a-0123456789"}
    )
    assert rotation.rotation_state(recorded) == RotationState("1", "2", {"a": "new-a-0123456789"})


@pytest.mark.parametrize(
    ("value", "state", "reported", "step"),
    [
        (None, RotationState(), None, "none"),  # never asked
        ("1", RotationState(), None, "start"),  # a first value
        ("2", RotationState(handled="1"), "1", "start"),  # a new value
        ("1", RotationState(handled="1"), "1", "none"),  # the same value again: nothing rotates
        ("1", RotationState(handled="1"), None, "record"),  # handled, status lost (crash before its write)
        ("1", RotationState(None, "1", {"a": "x"}), None, "resume"),  # a crash mid-rotation
        ("2", RotationState("0", "1", {"a": "x"}), "0", "resume"),  # the older pending one finishes first
        (None, RotationState(None, "1", {"a": "x"}), None, "resume"),  # annotation removed meanwhile
    ],
)
def test_next_step(value: str | None, state: RotationState, reported: str | None, step: str) -> None:
    assert rotation.next_step(value, state, reported) == step


def condition(status: str) -> dict[str, Any]:
    return {"type": rotation.TOKENS_ROTATED, "status": status}


def test_settled_needs_no_request_only_when_status_says_so() -> None:
    done = {rotation.STATUS_FIELD: {"value": "1"}, "conditions": [condition("True")]}
    assert rotation.settled("1", done) and rotation.settled(None, done) and rotation.settled(None, {})
    assert not rotation.settled("2", done)  # a new value
    assert not rotation.settled("1", {**done, "conditions": [condition("Unknown")]})  # pending
    assert not rotation.settled(None, {**done, "conditions": [condition("False")]})  # failing, annotation gone
    assert not rotation.settled("1", {})  # asked, never reported


def test_new_tokens_are_fresh_for_every_silo_and_stored_as_pending_under_a_lock() -> None:
    new = rotation.new_silo_tokens(TOKENS)
    assert set(new) == {"a", "b"} and not set(new.values()) & set(TOKENS.silos.values())
    assert all(len(t) >= 16 for t in new.values())
    patch = rotation.pending_patch("1", new, "7")
    assert patch["metadata"] == {"annotations": {rotation.PENDING_ANNOTATION: "1"}, "resourceVersion": "7"}
    assert json.loads(decode(patch["data"][rotation.PENDING_KEY])) == new
    assert set(patch["data"]) == {rotation.PENDING_KEY}  # the tokens in force are untouched


def test_only_silos_the_job_still_has_and_the_aggregator_runs_are_sent() -> None:
    state = RotationState(None, "1", {"a": "new-a", "b": "new-b", "gone": "new-gone"})
    assert rotation.to_rotate(state, TOKENS, running={"a", "b", "gone"}) == {"a": "new-a", "b": "new-b"}
    assert rotation.to_rotate(state, TOKENS, running={"a"}) == {"a": "new-a"}


def test_accepted_tokens_replace_the_current_ones_and_others_are_kept() -> None:
    current = Tokens(admin=TOKENS.admin, silos={**TOKENS.silos, "d": "added-meanwhile-0123"})
    rotated = rotation.rotated_tokens(current, {"a": "new-a", "gone": "new-gone"})
    assert rotated == Tokens(TOKENS.admin, {"a": "new-a", "b": "old-b-0123456789", "d": "added-meanwhile-0123"})


def test_finishing_clears_pending_and_records_the_value() -> None:
    patch = rotation.finished_patch("1")
    assert patch["metadata"]["annotations"] == {rotation.PENDING_ANNOTATION: None, rotation.HANDLED_ANNOTATION: "1"}
    assert patch["data"] == {rotation.PENDING_KEY: None}


def test_done_status_condition_and_event() -> None:
    until = datetime(2026, 1, 1, 12, 10, tzinfo=UTC)
    previous = {"conditions": [{**condition("Unknown"), "reason": "Rotating", "lastTransitionTime": "x"}]}
    fields, events = rotation.done_patch(Rotated("1", ("a",), ("b",), until), previous, 3, NOW)
    assert fields[rotation.STATUS_FIELD] == {"value": "1", "time": "2026-01-01T12:00:00Z", "silos": ["a"]}
    (found,) = fields["conditions"]
    assert found["status"] == "True" and found["reason"] == "Rotated" and found["observedGeneration"] == 3
    assert found["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    (event,) = events
    assert (event.type, event.reason) == ("Normal", "TokensRotated")
    assert "rotated (fedsilo.io/rotate-tokens=1): a" in event.message
    assert "previous tokens work until 2026-01-01T12:10:00Z" in event.message
    assert "token kept: b" in event.message


def test_rotating_failed_and_recorded_status() -> None:
    rotating = rotation.rotating_patch("1", {}, 1, NOW)["conditions"][0]
    assert (rotating["status"], rotating["reason"]) == ("Unknown", "Rotating")
    fields, events = rotation.failed_patch("AggregatorUnreachable", "connection refused", {}, 1, NOW)
    assert fields["conditions"][0]["status"] == "False" and fields["conditions"][0]["reason"] == "AggregatorUnreachable"
    assert [(e.type, e.reason, e.message) for e in events] == [("Warning", "TokensNotRotated", "connection refused")]
    recorded = rotation.recorded_patch("1", {}, 1, NOW)
    assert recorded[rotation.STATUS_FIELD]["value"] == "1" and recorded["conditions"][0]["status"] == "True"
    assert rotation.settled("1", recorded)
