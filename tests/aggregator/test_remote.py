"""`fedsilo status` / `fedsilo pull` against a real aggregator process (rounds driven over HTTP, no training)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from tests.aggregator.conftest import AggregatorProcess
from tests.conftest import job_document

from fedsilo.adapters import to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client
from fedsilo.local import remote
from fedsilo.spec import parse_job

TOKENS = {"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}
STATE = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}


def _one_round(agg: AggregatorProcess) -> None:
    """Job `demo` (2 rounds planned), its initial adapter, round 1 closed and scored: Running at round 2."""
    admin = Client(agg.url, "demo", agg.admin, retries=0)
    admin.create_job(parse_job(job_document()), TOKENS)
    alpha, beta = (Client(agg.url, "demo", TOKENS[n], n, retries=0) for n in ("alpha", "beta"))
    for silo in (alpha, beta):
        silo.join(m.JoinRequest(n_train_examples=100, n_eval_examples=10))
    alpha.put_initial(to_bytes(STATE))
    for silo, scale in ((alpha, 0.5), (beta, 1.5)):
        silo.put_update(1, to_bytes({k: torch.full_like(v, scale) for k, v in STATE.items()}), n_examples=10,
                        train_seconds=0.5)
    deadline = time.monotonic() + 20
    while admin.status().version < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for silo, acc in ((alpha, 0.75), (beta, 0.25)):
        silo.post_metrics(m.MetricsReport(version=1, split="validation", loss=0.5, accuracy=acc, n_examples=4))


def test_pull_takes_home_the_served_adapter_with_its_card(aggregator: AggregatorProcess, tmp_path: Path) -> None:
    _one_round(aggregator)
    target = remote.Target(aggregator.url, "demo", aggregator.admin)
    results = remote.pull(target, tmp_path / "runs")
    adapter = tmp_path / "runs" / "demo" / "latest" / "adapter"
    assert results.adapter_dir.resolve() == adapter.resolve() and results.version == 1
    served = httpx.get(f"{aggregator.url}/v1/jobs/demo/adapters/1",
                       headers={"Authorization": f"Bearer {aggregator.admin}"})
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert weights == served.content and served.headers["etag"].strip('"') == hashlib.sha256(weights).hexdigest()
    meta = json.loads((adapter / "fedsilo.json").read_text())
    assert meta["source"] == {"kind": "pull", "url": aggregator.url, "phase": "Running"}
    assert meta["id2label"] == {"0": "neg", "1": "pos"} and meta["adapter_version"] == 1
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/tiny" and config["peft_type"] == "LORA"
    card = (adapter / "README.md").read_text()
    assert "the job was Running at round 2 of 2" in card and "| 1 | validation | 0.5000 |" in card
    assert (adapter.parent / "rounds.csv").is_file() and (adapter.parent / "rounds.png").is_file()
    assert json.loads((adapter.parent / "run.json").read_text())["outcome"] == "pulled"

    older = remote.pull(target, tmp_path / "runs", version=0)  # any version; a new folder, the first one kept
    assert older.version == 0 and older.run_dir != results.run_dir and (results.adapter_dir / "README.md").is_file()
    with pytest.raises(remote.RemoteError, match="versions 0-1, not 5"):
        remote.pull(target, tmp_path / "runs", version=5)


def test_status_and_pull_say_what_to_do_when_refused(aggregator: AggregatorProcess, tmp_path: Path) -> None:
    _one_round(aggregator)
    snap = remote.snapshot(remote.Target(aggregator.url, "demo", aggregator.admin))
    assert snap.status.round == 2 and [r.round for r in snap.history] == [1, 2]
    with pytest.raises(remote.RemoteError, match=r"refused the token.*admin-token"):
        remote.snapshot(remote.Target(aggregator.url, "demo", "not-the-admin-token"))
    with pytest.raises(remote.RemoteError, match="no job named 'nope'"):
        remote.pull(remote.Target(aggregator.url, "nope", aggregator.admin), tmp_path)
    cli = subprocess.run([sys.executable, "-m", "fedsilo", "status", "demo", "--url", aggregator.url],
                         capture_output=True, text=True, env={"FEDSILO_ADMIN_TOKEN": aggregator.admin,
                                                              "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    assert cli.returncode == 0, cli.stderr
    assert "demo  Running  round 2/2: training, 0/2 updates in" in cli.stdout
    assert "validation acc 0.500 (v1, silo mean)" in cli.stdout  # no evaluator in this job: labelled as such
    assert "secure aggregation off" in cli.stdout
