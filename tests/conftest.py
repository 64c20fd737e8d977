"""Shared fixtures: a valid job document and helpers to run real fedsilo processes."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def job_document(**spec_overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "demo"},
        "spec": {
            "baseModel": {"path": "models/tiny"},
            "task": {"type": "sequence-classification", "labels": ["neg", "pos"]},
            "training": {"rounds": 2, "localSteps": 2, "batchSize": 4},
            "aggregation": {"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 60},
            "silos": [
                {"name": "alpha", "data": {"path": "alpha.csv"}},
                {"name": "beta", "data": {"path": "beta.csv"}},
            ],
        },
    }
    doc = copy.deepcopy(doc)
    doc["spec"].update(spec_overrides)
    return doc


@pytest.fixture
def job_doc() -> dict[str, Any]:
    return job_document()


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """Leave the machine's PostgreSQL server as the session found it."""
    yield
    from tests.aggregator.conftest import drop_created_databases

    drop_created_databases()
