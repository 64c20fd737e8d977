"""Run folders: every run (or pull) of a job gets its own folder, and no run ever replaces another.

    runs/<job>/<UTC start time>/     job.json, run.json, adapter/, rounds.csv, rounds.png, logs/, state/
    runs/<job>/latest -> <UTC start time>

`run.json` tells what the folder holds while it is written and after: the outcome
(`running`, `succeeded`, `failed`, `interrupted`, `pulled`), rounds completed, the adapter
version saved, and, while a local run is alive, where its aggregator listens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

RUN_FILE = "run.json"
LATEST = "latest"
Outcome = Literal["running", "succeeded", "failed", "interrupted", "pulled"]


class RunsError(RuntimeError):
    """A path that is not a run folder, or a runs folder that cannot be written."""


def now() -> datetime:
    return datetime.now(UTC)


def new_run_dir(out: Path, job: str, started: datetime | None = None) -> Path:
    """Create `out/<job>/<UTC timestamp>[-n]/` and point `out/<job>/latest` at it."""
    parent = out / job
    parent.mkdir(parents=True, exist_ok=True)
    stamp = (started or now()).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (parent / name).mkdir()
        except FileExistsError:
            continue
        point_latest(parent, name)
        return parent / name
    raise RunsError(f"{parent}: more than 999 runs started in the same second")


def point_latest(parent: Path, name: str) -> None:
    """Atomically (re)point `parent/latest` at `name` (a relative link: the runs folder can move)."""
    latest = parent / LATEST
    if latest.exists() and not latest.is_symlink():
        raise RunsError(f"{latest} exists and is not a link: move it away (fedsilo points it at the newest run)")
    tmp = parent / f".{LATEST}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name, target_is_directory=True)
    os.replace(tmp, latest)


def resolve(path: Path) -> Path:
    """A run folder from `runs/<job>` (its newest run) or the run folder itself."""
    if (path / RUN_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_dir() and (latest / RUN_FILE).is_file():
        return latest.resolve()
    raise RunsError(f"{path}: not a run folder (no {RUN_FILE}) nor a job's runs folder (no {LATEST}/)")


@dataclass
class RunRecord:
    """The contents of run.json."""

    job: str
    outcome: Outcome
    started_at: str
    rounds: int
    rounds_completed: int = 0
    adapter_version: int | None = None
    finished_at: str | None = None
    message: str = ""
    source: dict[str, Any] = field(default_factory=dict)  # {"kind": "local", "aggregator_url", "runner_pid"} or pull

    def save(self, run_dir: Path) -> None:
        write_text(run_dir / RUN_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        data = json.loads((run_dir / RUN_FILE).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
