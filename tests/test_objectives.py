"""Logit adjustment against label skew: the math, the spec rules, and real MiniLM training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import ROOT, job_document
from tests.test_end_to_end import _data, _minilm

from fedsilo.silo_agent.agent import build_trainer
from fedsilo.silo_agent.data import Encoded, encode_classification, read_table
from fedsilo.silo_agent.model import load_base, peft_config, wrap
from fedsilo.silo_agent.objectives import adjusted_cross_entropy, log_prior
from fedsilo.silo_agent.settings import SiloSettings
from fedsilo.silo_agent.trainer import Trainer
from fedsilo.spec import DataSpec, SpecError, load_job, parse_job


def test_prior_is_smoothed_and_checked() -> None:
    prior = log_prior([1, 1, 1], 3)
    torch.testing.assert_close(prior.exp(), torch.tensor([1 / 6, 4 / 6, 1 / 6]))  # unseen classes stay finite
    with pytest.raises(ValueError, match="outside"):
        log_prior([0, 3], 3)
    with pytest.raises(ValueError, match="n_classes"):
        log_prior([], 0)


def test_adjusted_cross_entropy() -> None:
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 1])
    prior = log_prior([1, 1, 2, 0, 1, 1], 3)
    torch.testing.assert_close(adjusted_cross_entropy(logits, labels, prior, 0.0), F.cross_entropy(logits, labels))
    torch.testing.assert_close(adjusted_cross_entropy(logits, labels, prior, 0.5),
                               F.cross_entropy(logits + 0.5 * prior, labels))
    # the loss of an example of the silo's majority class shrinks: the prior already predicts it
    majority = torch.tensor([1])
    assert adjusted_cross_entropy(torch.zeros(1, 3), majority, prior, 1.0) < math.log(3)
    with pytest.raises(ValueError, match="prior over 2 classes"):
        adjusted_cross_entropy(logits, labels, log_prior([0], 2), 1.0)


def test_spec_rules() -> None:
    doc = job_document(training={"logitAdjustment": 1.0})
    assert parse_job(doc).spec.training.logit_adjustment == 1.0
    for bad, match in (
        ({"training": {"logitAdjustment": -1}}, "logitAdjustment"),
        ({"training": {"logitAdjustment": 1}, "aggregation": {"strategy": "fedkd"}}, "fedkd"),
        ({"training": {"logitAdjustment": 1}, "task": {"type": "causal-lm"}}, "sequence-classification only"),
    ):
        with pytest.raises(SpecError, match=match):
            parse_job(job_document(**bad))


def test_logit_adjustment_is_on_by_default_where_it_applies() -> None:
    """The label-skew benchmark's verdict (benchmarks/results/label-skew.md) as the default for new jobs;
    an explicit value, 0 included, always wins."""
    assert parse_job(job_document()).spec.logit_adjustment() == 1.0
    assert parse_job(job_document(training={"logitAdjustment": 0})).spec.logit_adjustment() == 0.0
    assert parse_job(job_document(training={"logitAdjustment": 0.5})).spec.logit_adjustment() == 0.5
    assert parse_job(job_document(aggregation={"strategy": "fedkd"})).spec.logit_adjustment() == 0.0
    teacher = job_document(distillation={"teacher": {"path": "models/teacher"}})
    assert parse_job(teacher).spec.logit_adjustment() == 1.0  # FedKDLoRA: KD + the adjusted loss measured best
    causal = job_document(task={"type": "causal-lm"})
    assert parse_job(causal).spec.logit_adjustment() == 0.0
    assert parse_job(job_document()).spec.training.logit_adjustment is None  # the stored document stays as written


def mean_fresh_probability(trainer: Trainer, probe: list[dict[str, torch.Tensor]]) -> float:
    trainer.model.eval()
    with torch.no_grad():
        return float(torch.cat([trainer.model(**b).logits.softmax(-1)[:, 1] for b in probe]).mean())


def test_a_skewed_silo_teaches_much_less_of_its_prior(tmp_path: Path) -> None:
    """A silo with 85 % 'fresh' examples: plain cross-entropy pushes the shared model towards
    'fresh' for everything; the logit-adjusted loss learns the evidence, not the prior.

    (A silo with one class only still drifts under AdamW: its adjusted loss is tiny but keeps
    one sign, and Adam's steps do not shrink with the gradient.)"""
    data = _data(tmp_path)
    spec = load_job(ROOT / "examples" / "quickstart.yaml").spec
    path = str(_minilm())
    base, tokenizer = load_base(spec, path)
    model = wrap(base, peft_config(spec, path), seed=0)
    frame = read_table(DataSpec(path=str(data / "silo-a.csv")), data)
    encoded = encode_classification(frame, DataSpec(path="silo-a.csv"), ["rotten", "fresh"], tokenizer, 48)
    fresh = [i for i, y in enumerate(encoded.labels) if y == 1][:136]
    fresh += [i for i, y in enumerate(encoded.labels) if y == 0][:24]
    test = read_table(DataSpec(path=str(data / "test.csv")), data)
    probe_set = encode_classification(test.head(64), DataSpec(path="test.csv"), ["rotten", "fresh"], tokenizer, 48)
    empty = Encoded([], [])
    initial = {k: v.clone() for k, v in Trainer(model, tokenizer, spec.training, empty, empty).state().items()}
    moved = {}
    for tau in (0.0, 1.0):
        training = spec.training.model_copy(update={"logit_adjustment": tau, "batch_size": 16, "learning_rate": 3e-3})
        trainer = Trainer(model, tokenizer, training, encoded.subset(fresh), probe_set)
        trainer.load(initial)
        before = mean_fresh_probability(trainer, trainer._eval_batches)
        trainer.train(10, round_=1, silo="a")
        moved[tau] = mean_fresh_probability(trainer, trainer._eval_batches) - before
    assert moved[0.0] > 0.25, moved  # plain CE: the model learns "everything is fresh"
    assert abs(moved[1.0]) < moved[0.0] / 4, moved


def test_the_silo_agent_trains_with_the_logit_adjustment_in_force(tmp_path: Path) -> None:
    """What the agent builds from a job document: unset means the default (1 here), 0 stays 0."""
    data = _data(tmp_path)
    job = load_job(ROOT / "examples" / "quickstart.yaml")
    assert job.spec.training.logit_adjustment is None
    settings = SiloSettings(aggregator_url="http://127.0.0.1:1", job="quickstart", silo=job.spec.silos[0].name,
                            token="t" * 32, data_root=data, model_path=str(_minilm()))
    for written, in_force in ((None, 1.0), (0.0, 0.0)):
        training = job.spec.training.model_copy(update={"logit_adjustment": written})
        variant = job.model_copy(update={"spec": job.spec.model_copy(update={"training": training})})
        silo = variant.spec.silos[0]
        silo = silo.model_copy(update={"data": silo.data.model_copy(update={"path": "silo-a.csv"})})
        trainer = build_trainer(variant, silo, settings)
        assert trainer.training.logit_adjustment == in_force
