"""The embedded runner: one FederatedJob on this machine, no cluster.

It starts exactly the processes a cluster runs — `fedsilo aggregator` and one
`fedsilo silo-agent` per silo — configured through the same environment variables,
talking the same `/v1` API over loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from rich.console import Console
from rich.live import Live

from fedsilo.adapters import from_bytes
from fedsilo.api.client import Client
from fedsilo.local import report
from fedsilo.spec import FederatedJob, dump_job

console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Processes:
    """Children of the runner; `stop` ends them all (SIGTERM, then SIGKILL)."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, env: dict[str, str], log_path: Path, command: str) -> None:
        log = log_path.open("wb")
        self.logs.append(log)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "fedsilo", command],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def failed(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() not in (None, 0)]

    def stop(self, grace: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


def resolve_model_path(path: str, job_dir: Path) -> str:
    """Relative model folders resolve like data paths; anything else is a hub id in the local cache."""
    candidate = Path(path)
    if not candidate.is_absolute() and (job_dir / candidate).exists():
        return str((job_dir / candidate).resolve())
    return path


def run_local(job: FederatedJob, job_dir: Path, out: Path, port: int = 0) -> int:
    """Run the job to completion; write runs/<job>/. Returns the exit code."""
    name = job.metadata.name
    run_dir = (out / name).resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    admin = secrets.token_urlsafe(24)
    tokens = {s.name: secrets.token_urlsafe(24) for s in job.spec.silos}
    (run_dir / "job.json").write_text(json.dumps(dump_job(job), indent=2))
    tokens_file = run_dir / "state" / "tokens.json"
    tokens_file.parent.mkdir()
    tokens_file.write_text(json.dumps(tokens))
    tokens_file.chmod(0o600)

    procs = Processes()
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the children too, like Ctrl-C
    try:
        procs.start(
            "aggregator",
            {
                "FEDSILO_ADMIN_TOKEN": admin,
                "FEDSILO_HOST": "127.0.0.1",
                "FEDSILO_PORT": str(port),
                "FEDSILO_DATABASE_URL": f"sqlite:///{run_dir / 'state' / 'fedsilo.db'}",
                "FEDSILO_CHECKPOINT_DIR": str(run_dir / "state"),
                "FEDSILO_JOB_FILE": str(run_dir / "job.json"),
                "FEDSILO_SILO_TOKENS_FILE": str(tokens_file),
                "FEDSILO_LOG_LEVEL": "warning",
            },
            run_dir / "logs" / "aggregator.log",
            "aggregator",
        )
        _wait_ready(url, procs)
        console.print(f"aggregator on {url}  (Prometheus metrics: {url}/metrics, logs: {run_dir / 'logs'})")
        threads = max(1, (os.cpu_count() or 1) // len(job.spec.silos))
        model_path = resolve_model_path(job.spec.base_model.path, job_dir)
        for silo in job.spec.silos:
            procs.start(
                silo.name,
                {
                    "FEDSILO_AGGREGATOR_URL": url,
                    "FEDSILO_JOB": name,
                    "FEDSILO_SILO": silo.name,
                    "FEDSILO_TOKEN": tokens[silo.name],
                    "FEDSILO_DATA_ROOT": str(job_dir),
                    "FEDSILO_MODEL_PATH": model_path,
                    "FEDSILO_TORCH_THREADS": str(threads),
                    "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                },
                run_dir / "logs" / f"{silo.name}.log",
                "silo-agent",
            )
        client = Client(url, name, admin, retries=3)
        ok = _follow(client, procs, run_dir, job)
        if not ok:
            return 1
        history, evaluations = client.rounds(), client.evaluations()
        final = client.status().version
        adapter = from_bytes(client.adapter(final))
        client.close()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every process[/]")
        return 130
    finally:
        procs.stop()

    table = report.rows(history, evaluations)
    report.write_csv(table, run_dir / "rounds.csv")
    report.plot(table, run_dir / "rounds.png", f"{name}: global adapter per round")
    _save_adapter(job, model_path, adapter, run_dir / "adapter")
    _write_generations(evaluations, run_dir / "generations.jsonl")
    console.print(report.rich_table(table, f"{name}: {len(history)} rounds in {time.monotonic() - started:.0f}s"))
    console.print(
        f"final PEFT adapter: {run_dir / 'adapter'}   table: {run_dir / 'rounds.csv'}   plot: {run_dir / 'rounds.png'}"
    )
    return 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _save_adapter(job: FederatedJob, model_path: str, adapter: dict, folder: Path) -> None:  # type: ignore[type-arg]
    from fedsilo.silo_agent.model import peft_config, save_peft_adapter

    save_peft_adapter(adapter, peft_config(job.spec, model_path), folder)


def _write_generations(evaluations: list[dict], path: Path) -> None:  # type: ignore[type-arg]
    """Causal LM: one line per (version, silo, prompt) with the greedy answer, when any were recorded."""
    lines = [
        json.dumps({"version": e["version"], "silo": silo, "prompt": prompt, "generation": text})
        for e in evaluations
        for silo, answers in (e.get("generations") or {}).items()
        for prompt, text in answers.items()
    ]
    if lines:
        path.write_text("\n".join(lines) + "\n")


def _wait_ready(url: str, procs: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs.failed():
            raise SystemExit(f"the aggregator exited early; see its log ({procs.failed()})")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the aggregator was not ready within {timeout:.0f}s")


def _follow(client: Client, procs: Processes, run_dir: Path, job: FederatedJob) -> bool:
    """Show progress until the job ends and every silo has finished its last evaluation."""
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        while True:
            status = client.status()
            silos = "  ".join(f"{s.name}:{s.state}" for s in status.silos)
            acc = f"{status.accuracy:.3f}" if status.accuracy is not None else "-"
            live.update(f"[bold]{status.phase}[/] round {status.round}/{status.rounds}  accuracy {acc}  {silos}")
            failed = procs.failed()
            if failed:
                for silo, code in failed:
                    tail = (run_dir / "logs" / f"{silo}.log").read_text(errors="replace").splitlines()[-15:]
                    console.print(f"[red]{silo} exited with code {code}:[/]\n" + "\n".join(tail))
                return False
            if status.phase == "Failed":
                console.print(f"[red]job failed: {status.message}[/]")
                return False
            silo_procs = [p for n, p in procs.procs.items() if n != "aggregator"]
            if status.phase == "Succeeded" and all(p.poll() is not None for p in silo_procs):
                return True
            time.sleep(0.5)
