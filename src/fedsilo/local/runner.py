"""The embedded runner: one FederatedJob on this machine, no cluster.

It starts exactly the processes a cluster runs — `fedsilo aggregator` and one
`fedsilo silo-agent` per silo — configured through the same environment variables,
talking the same `/v1` API over loopback.

Like Kubernetes, it restarts a child that dies (exponential backoff, at most
`backoff_limit` restarts each; silo agents that exit 0 are done, exit codes 2 and 3 mean
a restart cannot help). `runs/<job>/state/pids.json` always lists every child's pid and state.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import httpx
from rich.console import Console
from rich.live import Live

from fedsilo.adapters import from_bytes
from fedsilo.api.client import Client, ClientError
from fedsilo.local import report
from fedsilo.spec import FederatedJob, dump_job

console = Console()
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BACKOFF_LIMIT = 6  # restarts per process, like a Kubernetes Job's backoffLimit
NO_RESTART = {  # exit codes that mean "a restart cannot help": the run fails with the reason
    2: "configuration error (data, model or spec)",
    3: "the aggregator refused a request",
}


def backoff_delay(restart: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds before restart number `restart` (1, 2, ...): 1, 2, 4, 8 ... capped at `cap`."""
    return min(cap, base * 2.0 ** max(restart - 1, 0))


def describe_exit(code: int) -> str:
    """`exit code 1`, or `killed by SIGKILL` for Popen's negative return codes."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class ChildFailed(RuntimeError):
    """A child exited in a way supervision may not repair."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name


@dataclass
class Child:
    """One supervised process: how to start it, and what became of it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    server: bool  # restarted whatever its exit code (like a Deployment); others finish with exit 0
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    state: str = "running"  # running | restarting | succeeded | failed | stopped
    restarts: int = 0
    restart_at: float = 0.0
    exit_code: int | None = None


@dataclass
class Processes:
    """Children of the runner, supervised like pods: a child that dies is restarted with
    exponential backoff, at most `backoff_limit` times, with the same command and env and
    its log appended to. `state_file` (pids.json) always holds every child's pid and state.
    `stop` ends them all (SIGTERM, then SIGKILL)."""

    state_file: Path | None = None
    backoff_limit: int = BACKOFF_LIMIT
    children: dict[str, Child] = field(default_factory=dict)

    def start(self, name: str, env: dict[str, str], log_path: Path, command: str, *, server: bool = False) -> None:
        """Start `fedsilo <command>` with `env` added to this process's environment."""
        self.add(Child(name, [sys.executable, "-m", "fedsilo", command], {**os.environ, **env}, log_path, server))

    def add(self, child: Child) -> None:
        """Start any command under supervision."""
        self.children[child.name] = child
        self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.log = child.log_path.open("ab")  # a restart appends: the log tells the whole story
        child.proc = subprocess.Popen(
            child.argv, env=child.env, stdout=child.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        child.state = "running"
        self._save()

    def supervise(self) -> None:
        """Reap exited children and restart the ones that are due; raises `ChildFailed`."""
        now = time.monotonic()
        for child in self.children.values():
            if child.state == "restarting" and now >= child.restart_at:
                self._spawn(child)
            elif child.state == "running" and child.proc is not None and child.proc.poll() is not None:
                self._exited(child, child.proc.returncode, now)

    def _exited(self, child: Child, code: int, now: float) -> None:
        child.exit_code = code
        if child.log is not None:
            child.log.close()
        if code == 0 and not child.server:
            child.state = "succeeded"
        elif code in NO_RESTART or child.restarts >= self.backoff_limit:
            child.state = "failed"
        else:
            child.restarts += 1
            delay = backoff_delay(child.restarts)
            child.state, child.restart_at = "restarting", now + delay
            line = f"{child.name} {describe_exit(code)}: restart {child.restarts}/{self.backoff_limit} in {delay:g}s"
            console.print(f"[yellow]{line}[/]")
            with child.log_path.open("a") as log:
                log.write(f"--- fedsilo run: {line} ---\n")
        self._save()
        if child.state == "failed":
            why = NO_RESTART.get(code, f"backoff limit {self.backoff_limit} reached")
            raise ChildFailed(child.name, f"{describe_exit(code)}: {why}; not restarted")

    def finished(self, name: str) -> bool:
        return self.children[name].state == "succeeded"

    def _save(self) -> None:
        """Write pids.json atomically: {runner, processes: {name: {pid, state, restarts, exit_code}}}."""
        if self.state_file is None:
            return
        table = {
            c.name: {
                "pid": c.proc.pid if c.proc is not None and c.state == "running" else None,
                "state": c.state,
                "restarts": c.restarts,
                "exit_code": c.exit_code,
            }
            for c in self.children.values()
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runner": os.getpid(), "processes": table}, indent=2))
        tmp.replace(self.state_file)

    def stop(self, grace: float = 10.0) -> None:
        running = [c for c in self.children.values() if c.state == "running" and c.proc is not None]
        for child in running:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            child.state, child.exit_code = "stopped", child.proc.returncode
        for child in self.children.values():
            if child.log is not None:
                child.log.close()
            if child.state == "restarting":
                child.state = "stopped"
        self._save()


def resolve_model_path(path: str, job_dir: Path) -> str:
    """Relative model folders resolve like data paths; anything else is a hub id in the local cache."""
    candidate = Path(path)
    if not candidate.is_absolute() and (job_dir / candidate).exists():
        return str((job_dir / candidate).resolve())
    return path


def run_local(job: FederatedJob, job_dir: Path, out: Path, port: int = 0, backoff_limit: int = BACKOFF_LIMIT) -> int:
    """Run the job to completion; write runs/<job>/. Returns the exit code.

    Children that die are restarted (at most `backoff_limit` times each); the aggregator
    comes back on the same port, database and checkpoint folder and resumes the job.
    """
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

    procs = Processes(run_dir / "state" / "pids.json", backoff_limit)
    started = time.monotonic()
    model_path = resolve_model_path(job.spec.base_model.path, job_dir)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the children too, like Ctrl-C
    try:
        procs.start(
            "aggregator",
            _aggregator_env(run_dir, port, admin),
            run_dir / "logs" / "aggregator.log",
            "aggregator",
            server=True,
        )
        _wait_ready(url, procs)
        console.print(f"aggregator on {url}  (Prometheus metrics: {url}/metrics, logs: {run_dir / 'logs'})")
        threads = max(1, (os.cpu_count() or 1) // len(job.spec.silos))
        for silo in job.spec.silos:
            env = _silo_env(url, name, silo.name, tokens[silo.name], job_dir, model_path, threads)
            procs.start(silo.name, env, run_dir / "logs" / f"{silo.name}.log", "silo-agent")
        # no client-side retries: an unreachable aggregator is the supervisor's business
        client = Client(url, name, admin, retries=0, timeout=60.0)
        if not _follow(client, procs, job):
            return 1
        history, evaluations = _ask(procs, client.rounds), _ask(procs, client.evaluations)
        adapter = from_bytes(_ask(procs, lambda: client.adapter(client.status().version)))
        client.close()
    except ChildFailed as exc:
        tail = (run_dir / "logs" / f"{exc.name}.log").read_text(errors="replace").splitlines()[-15:]
        console.print(f"[red]{exc}[/]\n" + "\n".join(tail))
        return 1
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


def _aggregator_env(run_dir: Path, port: int, admin: str) -> dict[str, str]:
    """The same port, database and checkpoint folder on every (re)start: a restart resumes the job."""
    return {
        "FEDSILO_ADMIN_TOKEN": admin,
        "FEDSILO_HOST": "127.0.0.1",
        "FEDSILO_PORT": str(port),
        "FEDSILO_DATABASE_URL": f"sqlite:///{run_dir / 'state' / 'fedsilo.db'}",
        "FEDSILO_CHECKPOINT_DIR": str(run_dir / "state"),
        "FEDSILO_JOB_FILE": str(run_dir / "job.json"),
        "FEDSILO_SILO_TOKENS_FILE": str(run_dir / "state" / "tokens.json"),
        "FEDSILO_LOG_LEVEL": "warning",
        # one aggregator per run, supervised here: a restarted one waits only briefly for a killed one's lease
        "FEDSILO_LEASE_SECONDS": "3",
    }


def _silo_env(
    url: str, job: str, silo: str, token: str, job_dir: Path, model_path: str, threads: int
) -> dict[str, str]:
    return {
        "FEDSILO_AGGREGATOR_URL": url,
        "FEDSILO_JOB": job,
        "FEDSILO_SILO": silo,
        "FEDSILO_TOKEN": token,
        "FEDSILO_DATA_ROOT": str(job_dir),
        "FEDSILO_MODEL_PATH": model_path,
        "FEDSILO_TORCH_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


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


def _unavailable(exc: Exception) -> bool:
    """A transport failure or a 5xx: the aggregator is (re)starting, not refusing."""
    return isinstance(exc, httpx.TransportError) or (isinstance(exc, ClientError) and exc.status >= 500)


def _ask(procs: Processes, call: Callable[[], T], timeout: float = 300.0) -> T:
    """`call()` the aggregator, supervising the children until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        procs.supervise()
        try:
            return call()
        except (httpx.TransportError, ClientError) as exc:
            if not _unavailable(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _wait_ready(url: str, procs: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.supervise()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the aggregator was not ready within {timeout:.0f}s")


def _follow(client: Client, procs: Processes, job: FederatedJob) -> bool:
    """Show progress, supervising the children, until the job ends and every silo has finished."""
    silos = [s.name for s in job.spec.silos]
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        while True:
            procs.supervise()
            try:
                status = client.status()
            except (httpx.TransportError, ClientError) as exc:
                if not _unavailable(exc):
                    raise
                live.update("[yellow]aggregator unavailable: waiting for it to come back[/]")
                time.sleep(0.5)
                continue
            states = "  ".join(f"{s.name}:{s.state}" for s in status.silos)
            acc = f"{status.accuracy:.3f}" if status.accuracy is not None else "-"
            live.update(f"[bold]{status.phase}[/] round {status.round}/{status.rounds}  accuracy {acc}  {states}")
            if status.phase == "Failed":
                console.print(f"[red]job failed: {status.message}[/]")
                return False
            if status.phase == "Succeeded" and all(procs.finished(s) for s in silos):
                return True
            time.sleep(0.5)
