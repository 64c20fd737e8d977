"""Real silo agents with a lossy codec: int8 + topK + zstd under ffa-lora, two rounds over real HTTP.

The aggregator's decoder accepts exactly the tensors the codec and strategy allow, so rounds
that close with every update accepted (and nothing refused) show the uploads carried no
lora_A; the bytes it counted are the coded bytes each agent logged, far below plain fp32.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tests.test_end_to_end import _data, _logfmt, _minilm

from fedsilo.local.runner import run_local
from fedsilo.spec import load_job

pytestmark = pytest.mark.slow


def test_int8_topk_zstd_ffa_lora_rounds_complete_with_coded_bytes(tmp_path: Path) -> None:
    _data(tmp_path)
    job = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "coded"},
        "spec": {
            "baseModel": {"path": str(_minilm())},
            "task": {"labels": ["rotten", "fresh"]},
            "training": {"rounds": 2, "localSteps": 4, "batchSize": 8, "maxLength": 32},
            "aggregation": {
                "strategy": "ffa-lora",
                "minSilos": 2,
                "codec": {"dtype": "int8", "topK": 0.1, "zstd": True},
            },
            "silos": [
                {"name": n, "data": {"path": f"data/silo-{c}.csv", "maxExamples": 120}}
                for n, c in (("north", "a"), ("south", "b"))
            ],
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_local(load_job(tmp_path / "job.yaml"), tmp_path, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "coded" / "latest"
    rows = [r for r in csv.DictReader((run / "rounds.csv").open()) if r["round"] != "0"]
    assert [r["round"] for r in rows] == ["1", "2"] and all(r["updates"] == "2" for r in rows)

    events = [dict(_logfmt(line)) for line in (run / "logs" / "aggregator.log").read_text().splitlines()]
    assert not [e for e in events if e.get("event") == "refused"]  # a lora_A tensor would be wrong_names
    uploads = [int(e["bytes"]) for e in events if e.get("event") == "upload"]
    assert len(uploads) == 4 and sum(uploads) == sum(int(r["bytes_up"]) for r in rows)
    sent = [int(n) for silo in ("north", "south")
            for n in re.findall(r"(\d+) bytes up", (run / "logs" / f"{silo}.log").read_text())]
    assert sorted(sent) == sorted(uploads)  # the agents count what travelled, the aggregator too

    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b_only = 4 * sum(t.numel() for k, t in adapter.items() if "lora_A" not in k)
    assert max(uploads) < b_only / 5  # 10% of B and the head, 1 byte + 4 index bytes each, compressed
    residuals = sorted(p.parent.name for p in (run / "state" / "silos").glob("*/residual.safetensors"))
    assert residuals == ["north", "south"]  # error feedback kept in each silo's state folder (FEDSILO_STATE_DIR)
