"""A run folder's results, written while they arrive so that no interruption loses them.

`Results.observe` takes what the aggregator reports (status, rounds, evaluations);
`Results.save_adapter` stores a global adapter version byte for byte as the aggregator
serves it, next to its PEFT config, model card and `fedsilo.json`; `Results.write` rewrites
rounds.csv, generations.jsonl, the card and run.json (each file replaced atomically), and
the plot when asked. A local run calls them after every round and once at the end; `fedsilo
pull` calls them once. Both leave the same folder.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fedsilo.adapters import sha256
from fedsilo.api.client import Client
from fedsilo.api.models import JobStatus, RoundInfo
from fedsilo.local import card, report
from fedsilo.local.runs import Outcome, RunRecord, now, write_bytes, write_text
from fedsilo.spec import FederatedJob, dump_job

T = TypeVar("T")
ADAPTER = "adapter"
WEIGHTS = "adapter_model.safetensors"


def _direct(call: Callable[[], T]) -> T:
    return call()


class Results:
    """The results of one run (or pull) of `job`, kept in `run_dir`."""

    def __init__(self, run_dir: Path, job: FederatedJob, record: RunRecord, base_resolved: str | None = None) -> None:
        self.run_dir, self.job, self.record, self.base_resolved = run_dir, job, record, base_resolved
        self.status: JobStatus | None = None
        self.history: list[RoundInfo] = []
        self.evaluations: list[dict[str, Any]] = []
        self.version: int | None = None  # adapter version saved in run_dir/adapter
        self.sha256 = ""
        self._config: Any = None
        # peft (and torch) take seconds to import: do it now, in the background, not when round 1 closes
        self._preparing = threading.Thread(target=self._prepare_config, daemon=True)
        self._preparing.start()
        write_text(run_dir / "job.json", json.dumps(dump_job(job), indent=2) + "\n")
        record.save(run_dir)

    def _prepare_config(self) -> None:
        from fedsilo.silo_agent.model import peft_config

        config = peft_config(self.job.spec, self.job.spec.base_model.path)  # the name the job used, not a path
        config.inference_mode = True
        self._config = config

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER

    def observe(self, status: JobStatus, history: list[RoundInfo], evaluations: list[dict[str, Any]]) -> None:
        self.status, self.history, self.evaluations = status, history, evaluations

    def refresh(self, client: Client, ask: Callable[[Callable[[], Any]], Any] = _direct, version: int | None = None,
                status: JobStatus | None = None) -> bool:
        """Read status (unless given), rounds and evaluations; save adapter `version` (default: the newest).

        `ask` wraps each call (the runner supervises its processes while it waits). Returns
        True when a new adapter version was saved.
        """
        status = status or ask(client.status)
        assert status is not None
        self.observe(status, ask(client.rounds), ask(client.evaluations))
        wanted = status.version if version is None else version
        if wanted == self.version or wanted < 0 or (version is None and wanted < 1):  # v0 only when asked for
            return False
        data: bytes = ask(lambda: client.adapter(wanted))
        self.save_adapter(wanted, data)
        return True

    def save_adapter(self, version: int, data: bytes) -> None:
        """The safetensors bytes as served (its sha256 is the aggregator's ETag) and the PEFT config."""
        folder = self.adapter_dir
        folder.mkdir(exist_ok=True)
        write_bytes(folder / WEIGHTS, data)
        if not (folder / "adapter_config.json").is_file():
            self._preparing.join()
            if self._config is None:  # the background import failed: do it here, raising its error
                self._prepare_config()
            self._config.save_pretrained(str(folder))
        self.version, self.sha256 = version, sha256(data)

    def rounds_completed(self) -> int:
        return sum(1 for r in self.history if r.state == "closed")

    def write(self, outcome: Outcome | None = None, message: str | None = None, *, plot: bool = False) -> None:
        """Rewrite every derived file from what was observed; `outcome` also ends the record."""
        table = report.rows(self.history, self.evaluations)
        report.write_csv(table, self.run_dir / "rounds.csv")
        _write_generations(self.evaluations, self.run_dir / "generations.jsonl")
        if outcome is not None:
            self.record.outcome = outcome
            if outcome != "running":
                self.record.finished_at = now().isoformat(timespec="seconds")
        if message is not None:
            self.record.message = message
        self.record.rounds_completed = self.rounds_completed()
        self.record.adapter_version = self.version
        if self.version is not None:
            self._write_card(table)
        if plot and len(table) > 1:
            report.plot(table, self.run_dir / "rounds.png", f"{self.job.metadata.name}: global adapter per round")
        self.record.save(self.run_dir)

    def _write_card(self, table: list[dict[str, Any]]) -> None:
        assert self.version is not None
        generations = next((e.get("generations") or {} for e in self.evaluations if e["version"] == self.version), {})
        info = card.AdapterInfo(
            job=self.job,
            version=self.version,
            sha256=self.sha256,
            outcome=self.record.outcome,
            table=table,
            status=self.status,
            base_resolved=self.base_resolved,
            source=self.record.source,
            saved_at=now().isoformat(timespec="seconds"),
            message=self.record.message,
            generations=generations,
        )
        write_text(self.adapter_dir / card.CARD, card.render(info))
        write_text(self.adapter_dir / card.METADATA, json.dumps(card.metadata(info), indent=2) + "\n")


def _write_generations(evaluations: list[dict[str, Any]], path: Path) -> None:
    """Causal LM: one line per (version, silo, prompt) with the greedy answer, when any were recorded."""
    lines = [
        json.dumps({"version": e["version"], "silo": silo, "prompt": prompt, "generation": text})
        for e in evaluations
        for silo, answers in (e.get("generations") or {}).items()
        for prompt, text in answers.items()
    ]
    if lines:
        write_text(path, "\n".join(lines) + "\n")
