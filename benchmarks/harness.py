"""What `polling.py` and `federation.py` share: a real aggregator process, its CPU, a job of N silos.

The aggregator is `python -m fedsilo aggregator` as `fedsilo run` starts it (job and tokens from
files, SQLite in a temp dir), on plain HTTP over loopback: these benchmarks measure the request
path, not TLS. It inherits this process's environment, so `PYTHONPATH=/work/main/src` measures
another checkout's code.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedsilo.local.runner import free_port


@dataclass(frozen=True)
class Aggregator:
    url: str
    admin: str
    pid: int
    work: Path


def silo_names(n: int) -> list[str]:
    return [f"silo-{i:04d}" for i in range(n)]


def job_document(name: str, silos: list[str], rounds: int, **aggregation: Any) -> dict[str, Any]:
    """A FederatedJob the aggregator accepts; nobody loads its model (the silos are scripted)."""
    return {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"path": "models/tiny"},
            "task": {"type": "sequence-classification", "labels": ["neg", "pos"]},
            "training": {"rounds": rounds, "localSteps": 1, "batchSize": 4},
            "aggregation": {"strategy": "fedavg", "minSilos": 1, "roundTimeoutSeconds": 3600, **aggregation},
            "silos": [{"name": s, "data": {"path": f"{s}.csv"}} for s in silos],
        },
    }


@contextmanager
def aggregator(work: Path, document: dict[str, Any], tokens: dict[str, str], **env: str) -> Iterator[Aggregator]:
    """A real aggregator serving `document`; stopped (SIGTERM) on exit."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(document))
    (work / "tokens.json").write_text(json.dumps(tokens))
    port, admin = free_port(), secrets.token_urlsafe(24)
    environ = {
        **os.environ,
        "FEDSILO_ADMIN_TOKEN": admin,
        "FEDSILO_HOST": "127.0.0.1",
        "FEDSILO_PORT": str(port),
        "FEDSILO_DATABASE_URL": f"sqlite:///{work / 'fedsilo.db'}",
        "FEDSILO_CHECKPOINT_DIR": str(work / "checkpoints"),
        "FEDSILO_JOB_FILE": str(work / "job.json"),
        "FEDSILO_SILO_TOKENS_FILE": str(work / "tokens.json"),
        "FEDSILO_LOG_LEVEL": "warning",
        "FEDSILO_INSECURE_HTTP": "true",
        **env,
    }
    url = f"http://127.0.0.1:{port}"
    with (work / "aggregator.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedsilo", "aggregator"], env=environ, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("aggregator did not start:\n" + (work / "aggregator.log").read_text()[-3000:])
            time.sleep(0.2)
        yield Aggregator(url, admin, proc.pid, work)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load() -> str:
    """The machine's 1/5/15-minute load, as `uptime` prints it (the machine is shared)."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())
