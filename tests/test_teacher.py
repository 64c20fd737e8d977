"""FedKDLoRA: a teacher fine-tuned on public data (its own model and tokenizer) distils into the
federated LoRA student on every silo — the pieces, then a real local federation."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.conftest import job_document
from tests.test_end_to_end import _data, _minilm

from fedsilo.local.runner import run_local
from fedsilo.silo_agent.data import DataError, Encoded, encode_classification
from fedsilo.silo_agent.distill import kd_divergence
from fedsilo.silo_agent.model import ModelError, load_base, peft_config, wrap
from fedsilo.silo_agent.teacher import fit_teacher, load_teacher, silo_soft_targets, teacher_logits
from fedsilo.silo_agent.trainer import Trainer
from fedsilo.spec import DataSpec, DistillationSpec, SpecError, TeacherSpec, load_job, parse_job

LABELS = ["rotten", "fresh"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two silos' data plus a 'public' share, and a teacher fine-tuned on the public share."""
    root = tmp_path_factory.mktemp("teacher")
    data = _data(root)
    public = pd.read_csv(data / "test.csv").head(80)
    report = fit_teacher(str(_minilm()), public, DataSpec(path="public.csv"), LABELS, root / "teacher",
                         steps=4, batch_size=8, learning_rate=1e-4, max_length=32)
    assert report.steps == 4 and (report.public_examples, report.held_out_examples) == (72, 8)
    assert report.held_out_accuracy is not None and 0 <= report.held_out_accuracy <= 1
    return root


def test_teacher_loads_for_its_labels_only(workspace: Path) -> None:
    model, tokenizer = load_teacher(TeacherSpec(path=str(workspace / "teacher")), LABELS)
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    with pytest.raises(ModelError, match=r"task\.labels"):
        load_teacher(TeacherSpec(path=str(workspace / "teacher")), ["neg", "neu", "pos"])
    with pytest.raises(ModelError, match="offline"):
        load_teacher(TeacherSpec(path=str(workspace / "missing")), LABELS)
    logits = teacher_logits(model, tokenizer, ["Great.", "Awful, awful.", "Fine"], None, 32, batch_size=2)
    assert len(logits) == 3 and all(len(row) == 2 and all(math.isfinite(x) for x in row) for row in logits)


def test_soft_targets_follow_the_rows_training_keeps(workspace: Path) -> None:
    frame = pd.DataFrame({"text": ["Great.", None, "Awful."], "label": ["fresh", "rotten", "rotten"]})
    spec = parse_job(job_document(
        baseModel={"path": str(_minilm())},
        task={"labels": LABELS},
        distillation={"teacher": {"path": str(workspace / "teacher")}},
        training={"maxLength": 32},
    )).spec
    soft = silo_soft_targets(spec, frame, DataSpec(path="x.csv"), workspace)
    model, tokenizer = load_teacher(TeacherSpec(path=str(workspace / "teacher")), LABELS)
    assert soft == teacher_logits(model, tokenizer, ["Great.", "Awful."], None, 32)  # the empty row is dropped
    with pytest.raises(DataError, match="missing column"):
        silo_soft_targets(spec, frame.rename(columns={"text": "body"}), DataSpec(path="x.csv"), workspace)


def test_student_loss_adds_the_kd_term(workspace: Path) -> None:
    spec = parse_job(job_document(baseModel={"path": str(_minilm())}, task={"labels": LABELS},
                                  training={"maxLength": 32})).spec
    base, tokenizer = load_base(spec, str(_minilm()))
    model = wrap(base, peft_config(spec, str(_minilm())), seed=0)
    frame = pd.DataFrame({"text": ["Great fun.", "Dull.", "A mess.", "Superb."], "label": LABELS * 2})
    encoded = encode_classification(frame, DataSpec(path="x.csv"), LABELS, tokenizer, 32)
    soft = [[2.0, -1.0], [0.5, 0.5], [-3.0, 3.0], [0.0, 1.0]]
    distill = DistillationSpec(teacher=TeacherSpec(path="t"), temperature=3.0, alpha=0.7)
    trainer = Trainer(model, tokenizer, spec.training, Encoded(encoded.features, encoded.labels, soft), Encoded([], []),
                      distillation=distill)
    (batch,) = list(trainer.batcher(trainer.train_data, 4, tokenizer, [0, 1, 2, 3]))
    assert batch["teacher_logits"].shape == (4, 2)
    model.eval()
    got = trainer._task_loss(batch)
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "teacher_logits")}).logits
    want = F.cross_entropy(logits, batch["labels"]) + 0.7 * kd_divergence(logits, torch.tensor(soft), 3.0)
    torch.testing.assert_close(got, want)


def test_spec_rules() -> None:
    teacher = {"teacher": {"path": "teachers/mpnet"}}
    assert parse_job(job_document(distillation=teacher)).spec.distillation.temperature == 2.0  # type: ignore[union-attr]
    for bad, match in (
        ({"distillation": teacher, "task": {"type": "causal-lm"}}, "sequence-classification only"),
        ({"distillation": teacher, "aggregation": {"strategy": "fedkd"}}, "choose one"),
        ({"distillation": {"teacher": {"path": "t"}, "temperature": 0}}, "temperature"),
        ({"distillation": {}}, "teacher"),
    ):
        with pytest.raises(SpecError, match=match):
            parse_job(job_document(**bad))


def test_fedkdlora_federation_runs_with_a_public_teacher(workspace: Path) -> None:
    job = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "fedkd-lora"},
        "spec": {
            "baseModel": {"path": str(_minilm())},
            "task": {"labels": LABELS},
            "training": {"rounds": 2, "localSteps": 3, "batchSize": 8, "maxLength": 32},
            "aggregation": {"strategy": "fedavg", "minSilos": 2},
            "distillation": {"teacher": {"path": "teacher"}, "alpha": 1.0},  # relative to the job folder
            "silos": [{"name": n, "data": {"path": f"data/silo-{c}.csv", "maxExamples": 60}}
                      for n, c in (("north", "a"), ("south", "b"))],
        },
    }
    job_file = workspace / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    assert run_local(load_job(job_file), workspace, workspace / "runs") == 0
    run = workspace / "runs" / "fedkd-lora" / "latest"
    rows = list(csv.DictReader((run / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1", "2"] and all(r["updates"] == "2" for r in rows[1:])
    logs = "".join(p.read_text() for p in (run / "logs").glob("*.log"))
    assert logs.count("distillation: teacher") == 2  # each silo scored its examples once, not per step


def test_validate_checks_the_teacher_folder(workspace: Path) -> None:
    from fedsilo.local.validate import validate

    def job(labels: list[str], teacher: str) -> Path:
        doc = job_document(baseModel={"path": str(_minilm())}, task={"labels": labels},
                           distillation={"teacher": {"path": teacher}},
                           silos=[{"name": "north", "data": {"path": "data/silo-a.csv"}}], aggregation={})
        path = workspace / f"validate-{len(labels)}-{Path(teacher).name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    report = validate(job(LABELS, "teacher"))
    assert report.ok and any(line.startswith("teacher teacher: a ") for line in report.checked), report.checked
    report = validate(job(["rotten", "fresh", "certified"], "teacher"))
    assert any("the teacher predicts ['rotten', 'fresh']" in p for p in report.problems), report.problems
    report = validate(job(LABELS, "elsewhere"))
    assert any("fedsilo teacher" in line for line in report.unchecked), report.unchecked


def test_fedsilo_teacher_command_writes_where_the_spec_points(workspace: Path) -> None:
    import subprocess
    import sys

    job = job_document(baseModel={"path": str(_minilm())}, task={"labels": LABELS}, training={"maxLength": 32},
                       distillation={"teacher": {"path": "teachers/cli"}})
    (workspace / "cli-job.yaml").write_text(yaml.safe_dump(job))
    pd.read_csv(workspace / "data" / "test.csv").head(40).to_csv(workspace / "public.csv", index=False)
    done = subprocess.run(
        [sys.executable, "-m", "fedsilo", "teacher", str(workspace / "cli-job.yaml"), "--public",
         str(workspace / "public.csv"), "--base", str(_minilm()), "--steps", "2", "--batch-size", "8"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "teacher saved to" in done.stdout
    model, _ = load_teacher(TeacherSpec(path=str(workspace / "teachers" / "cli")), LABELS)
    assert model.config.num_labels == 2
    report = (workspace / "teachers" / "cli" / "fedsilo-teacher.json").read_text()
    assert '"steps": 2' in report
