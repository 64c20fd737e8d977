"""The spec rejects bad documents with messages that name the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ROOT

from fedsilo.spec import CodecSpec, SpecError, dump_job, load_job, parse_job


def _error(doc: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    return str(info.value)


def test_valid_document_round_trips(job_doc: dict[str, Any]) -> None:
    job = parse_job(job_doc)
    assert job.spec.training.local_steps == 2
    assert job.spec.peft.target_modules == ["query", "value"]
    assert parse_job(dump_job(job)) == job


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["spec"].update(bogus=1), "spec.bogus: Extra inputs are not permitted"),
        (lambda d: d["spec"]["training"].update(rounds=-1), "spec.training.rounds"),
        (lambda d: d["spec"]["training"].update(learningRate=0), "spec.training.learningRate"),
        (lambda d: d["spec"]["silos"][0].pop("data"), "spec.silos.0.data: Field required"),
        (lambda d: d["spec"]["silos"][0].update(name="Bad_Name"), "spec.silos.0.name"),
        (lambda d: d["spec"]["silos"][1].update(name="alpha"), "duplicate silo names ['alpha']"),
        (lambda d: d["spec"]["task"].update(labels=["only"]), "task.labels needs at least two"),
        (lambda d: d["spec"].update(peft={"method": "adalora"}), "spec.peft.method"),
        (
            lambda d: d["spec"].update(peft={"method": "ia3", "targetModules": ["key"], "feedforwardModules": []})
            or d["spec"]["aggregation"].update(strategy="fedkd"),
            "needs peft.method lora or dora",
        ),
        (lambda d: d["spec"]["aggregation"].update(minSilos=3), "exceeds the 2 trainer silos"),
        (lambda d: d["spec"]["silos"][0].update(role="auditor"), "spec.silos.0.role"),
        (lambda d: d["spec"]["silos"][0].update(volume={"hostPath": "/x", "emptyDir": True}), "exactly one of"),
        (lambda d: d.update(kind="Job"), "kind"),
        (lambda d: d["spec"]["silos"][0]["data"].update(validationSplit=1.5), "validationSplit"),
        (
            lambda d: d["spec"]["aggregation"].update(secure=True, strategy="median"),
            "median needs each silo's update, which secure aggregation hides",
        ),
        (lambda d: d["spec"]["aggregation"].update(secure=True, strategy="lora-exact"), "secure aggregation hides"),
        (lambda d: d["spec"]["aggregation"].update(secure=True, mode="async"), "aggregation.secure needs mode sync"),
        (lambda d: d["spec"]["aggregation"].update(secure=True, minSilos=1), "needs minSilos >= 2"),
        (lambda d: d["spec"]["aggregation"].update(secure=True, secureThreshold=0.5), "secureThreshold"),
        (
            lambda d: d["spec"].update(privacy={"dp": {"clipNorm": 1, "noiseMultiplier": 1}})
            or d["spec"]["aggregation"].update(strategy="trimmed-mean"),
            "privacy.dp needs a strategy that uses only the sum",
        ),
        (lambda d: d["spec"].update(privacy={"dp": {"clipNorm": 0, "noiseMultiplier": 1}}), "clipNorm"),
        (lambda d: d["spec"].update(privacy={"dp": {"clipNorm": 1, "noiseMultiplier": 1, "delta": 1}}), "delta"),
        (lambda d: d["spec"].update(privacy={"dp": {"clipNorm": 1}}), "noiseMultiplier: Field required"),
        (lambda d: d["spec"].update(aggregator={"externalUrl": "http://fl.example.org"}), "aggregator.externalUrl"),
    ],
)
def test_bad_documents_name_the_field(job_doc: dict[str, Any], mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(job_doc)
    mutate(doc)
    assert expected in _error(doc)


def test_every_error_is_reported_at_once(job_doc: dict[str, Any]) -> None:
    job_doc["spec"]["training"]["rounds"] = 0
    job_doc["spec"]["training"]["batchSize"] = 0
    message = _error(job_doc)
    assert "spec.training.rounds" in message and "spec.training.batchSize" in message


def test_format_inferred_from_suffix_or_refused(job_doc: dict[str, Any]) -> None:
    job = parse_job(job_doc)
    assert job.spec.silos[0].data.resolved_format() == "csv"
    job_doc["spec"]["silos"][0]["data"]["path"] = "alpha.txt"
    with pytest.raises(ValueError, match=r"set data\.format"):
        parse_job(job_doc).spec.silos[0].data.resolved_format()


def test_load_job_reports_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    assert load_job(path).metadata.name


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["spec"]["aggregation"].update(codec={"dtype": "int4"}), "spec.aggregation.codec.dtype"),
        (lambda d: d["spec"]["aggregation"].update(codec={"topK": 0}), "spec.aggregation.codec.topK"),
        (lambda d: d["spec"]["aggregation"].update(codec={"topK": 1.5}), "spec.aggregation.codec.topK"),
        (lambda d: d["spec"]["aggregation"].update(codec={"int8Scale": "tensor"}), "applies to dtype int8 only"),
        (lambda d: d["spec"]["aggregation"].update(codec={"dtype": "int8", "int8Scale": "row"}), "int8Scale"),
        (lambda d: d["spec"]["silos"][0].update(codec={"zstd": "maybe"}), "spec.silos.0.codec.zstd"),
        (
            lambda d: d["spec"]["aggregation"].update(secure=True, codec={"dtype": "fp16"}),
            "aggregation.codec: aggregation.secure sends masked ring elements",
        ),
        (
            lambda d: d["spec"]["aggregation"].update(secure=True)
            or d["spec"]["silos"][1].update(codec={"zstd": True}),
            "silos[beta].codec: aggregation.secure",
        ),
    ],
)
def test_bad_codecs_name_the_field(job_doc: dict[str, Any], mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(job_doc)
    mutate(doc)
    assert expected in _error(doc)


def test_codec_defaults_to_plain_fp32_and_a_silo_may_override_it(job_doc: dict[str, Any]) -> None:
    job = parse_job(job_doc)
    assert job.spec.codec_for("alpha").is_plain() and job.spec.aggregation.codec.error_feedback
    job_doc["spec"]["aggregation"]["codec"] = {"dtype": "int8", "topK": 0.1, "zstd": True}
    job_doc["spec"]["silos"][1]["codec"] = {"dtype": "fp16"}
    job = parse_job(job_doc)
    assert job.spec.codec_for("alpha").dtype == "int8" and job.spec.codec_for("alpha").scale == "tensor"  # topK
    assert CodecSpec(dtype="int8").scale == "channel"
    assert CodecSpec(dtype="int8", top_k=0.1, int8_scale="channel").scale == "channel"
    assert job.spec.codec_for("beta").dtype == "fp16" and not job.spec.codec_for("beta").is_plain()
    assert parse_job(dump_job(job)) == job  # the dump round-trips (int8Scale left unset stays unset)
    job_doc["spec"]["aggregation"].update(secure=True, codec={"dtype": "fp32", "errorFeedback": False})
    job_doc["spec"]["silos"][1].pop("codec")
    assert parse_job(job_doc).spec.aggregation.secure  # plain fp32 is what masking needs
