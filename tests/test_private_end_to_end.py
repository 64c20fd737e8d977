"""Secure aggregation and DP end to end: real silo agents train MiniLM, the hub sees only masked sums."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from tests.test_end_to_end import _data, _minilm

from fedsilo.local.runner import run_local
from fedsilo.spec import load_job

pytestmark = pytest.mark.slow


def _run_folder(runs: Path, job: str) -> Path:
    """The run's output folder (newest run when runs are kept side by side)."""
    root = runs / job
    return next(p for p in (root / "latest", root) if (p / "adapter").exists())


def test_secure_ffa_lora_with_distributed_dp_completes_and_the_adapter_loads(tmp_path: Path) -> None:
    _data(tmp_path)
    job = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "private"},
        "spec": {
            "baseModel": {"path": str(_minilm())},
            "task": {"labels": ["rotten", "fresh"]},
            "training": {"rounds": 2, "localSteps": 4, "batchSize": 8, "maxLength": 32},
            "aggregation": {"strategy": "ffa-lora", "secure": True, "minSilos": 2},
            "privacy": {"dp": {"clipNorm": 0.5, "noiseMultiplier": 0.01, "targetEpsilon": 1.0e6}},
            "silos": [
                {"name": "north", "data": {"path": "data/silo-a.csv", "maxExamples": 120}},
                {"name": "south", "data": {"path": "data/silo-b.csv", "maxExamples": 120}},
                {"name": "east", "data": {"path": "data/silo-a.csv", "maxExamples": 60}},
                {"name": "audit", "role": "evaluator", "data": {"path": "data/test.csv", "maxExamples": 100}},
            ],
        },
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    assert run_local(load_job(job_file), tmp_path, tmp_path / "runs") == 0

    run = _run_folder(tmp_path / "runs", "private")
    rows = list(csv.DictReader((run / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1", "2"] and all(r["updates"] == "3" for r in rows[1:])
    store = next((tmp_path / "runs").rglob("fedsilo.db"))
    with sqlite3.connect(store) as db:
        rounds = [(json.loads(a), json.loads(b)) for a, b in db.execute("SELECT secagg, metrics FROM rounds")]
    assert [sec["stage"] for sec, _ in rounds] == ["closed", "closed"]
    assert all(sec["u3"] == ["east", "north", "south"] for sec, _ in rounds)
    epsilons = [metrics["epsilon"] for _, metrics in rounds]
    assert 0 < epsilons[0] < epsilons[1]

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(_minilm(), num_labels=2)
    model = PeftModel.from_pretrained(base, run / "adapter")  # the unmasked sums made a real adapter
    assert any("lora_B" in name for name, _ in model.named_parameters())
