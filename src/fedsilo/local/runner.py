"""The embedded runner: one FederatedJob on this machine, no cluster.

It starts exactly the processes a cluster runs — `fedsilo aggregator` and one
`fedsilo silo-agent` per silo — configured through the same environment variables,
talking the same `/v1` API over loopback.

Like Kubernetes, it restarts a child that dies (exponential backoff, at most
`backoff_limit` restarts each; silo agents that exit 0 are done, exit codes 2 and 3 mean
a restart cannot help). `<run>/state/pids.json` always lists every child's pid and state.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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

from fedsilo import tls
from fedsilo.api.client import Client, ClientError
from fedsilo.local import certificates, progress, report, runs
from fedsilo.local.results import Results
from fedsilo.spec import FederatedJob

console = Console()
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BACKOFF_LIMIT = 6  # restarts per process, like a Kubernetes Job's backoffLimit
FULL_READ_SECONDS = 2.0  # between status changes, rounds (updates in) and evaluations are read this often
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
    """Run the job to completion in a new folder runs/<job>/<UTC start>/ (runs/<job>/latest). Returns the exit code.

    Children that die are restarted (at most `backoff_limit` times each); the aggregator
    comes back on the same port, database and checkpoint folder and resumes the job.
    Results are saved after every round: an interrupted or failed run keeps its rounds so
    far and its last global adapter, and says so in run.json and the model card.
    """
    name = job.metadata.name
    run_dir = runs.new_run_dir(out.resolve(), name)
    (run_dir / "logs").mkdir()
    (run_dir / "state").mkdir()
    port = port or free_port()
    url = f"https://127.0.0.1:{port}"
    admin = secrets.token_urlsafe(24)
    tokens = {s.name: secrets.token_urlsafe(24) for s in job.spec.silos}
    certs = certificates.create(run_dir / "state" / "tls", name, tokens)
    _secret(run_dir / "state" / "tokens.json", json.dumps(tokens))
    _secret(run_dir / "state" / "admin-token", admin)  # `fedsilo status runs/<job>` reads it while the run lives
    model_path = resolve_model_path(job.spec.base_model.path, job_dir)
    source = {"kind": "local", "aggregator_url": url, "ca_bundle": str(certs.ca), "runner_pid": os.getpid()}
    record = runs.RunRecord(name, "running", runs.now().isoformat(timespec="seconds"), job.spec.training.rounds,
                            source=source)
    saved = Results(run_dir, job, record, base_resolved=model_path)

    procs = Processes(run_dir / "state" / "pids.json", backoff_limit)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the children too, like Ctrl-C
    # no retries: outages are the supervisor's business
    client = Client(url, name, admin, retries=0, timeout=60.0, ca_bundle=certs.ca)
    outcome: runs.Outcome = "failed"
    message = ""
    try:
        procs.start("aggregator", _aggregator_env(run_dir, port, admin, certs), run_dir / "logs" / "aggregator.log",
                    "aggregator", server=True)
        _wait_ready(url, procs, certs.ca)
        console.print(f"run {_short(run_dir)}  aggregator {url}  (metrics {url}/metrics, logs {_short(run_dir)}/logs)",
                      soft_wrap=True)
        threads = max(1, (os.cpu_count() or 1) // len(job.spec.silos))
        for silo in job.spec.silos:
            env = _silo_env(url, name, silo.name, tokens[silo.name], job_dir, model_path, threads, certs)
            env["FEDSILO_STATE_DIR"] = str(run_dir / "state" / "silos" / silo.name)  # e.g. a codec's residual
            procs.start(silo.name, env, run_dir / "logs" / f"{silo.name}.log", "silo-agent")
        outcome, message = _follow(client, procs, job, saved, started)
        if outcome == "succeeded":
            saved.refresh(client, lambda call: _ask(procs, call))  # the last evaluations and the final adapter
    except ChildFailed as exc:
        message = str(exc)
        tail = (run_dir / "logs" / f"{exc.name}.log").read_text(errors="replace").splitlines()[-15:]
        console.print(f"[red]{exc}[/]\n" + "\n".join(tail))
        if exc.name != "aggregator":
            _last_look(saved, client)
    except KeyboardInterrupt:
        outcome, message = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
        console.print("[yellow]interrupted: saving what the aggregator has, then stopping every process[/]")
        _last_look(saved, client)
    finally:
        client.close()
        procs.stop()
        source.pop("aggregator_url", None)  # nothing listens there any more
        saved.write(outcome, message, plot=True)

    table = report.rows(saved.history, saved.evaluations)
    done = saved.rounds_completed()
    console.print(report.rich_table(table, f"{name}: {done} rounds in {time.monotonic() - started:.0f}s"))
    _print_results(run_dir, saved, outcome, message)
    return {"succeeded": 0, "interrupted": 130}.get(outcome, 1)


def _secret(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.write_text(text)


def _short(path: Path) -> str:
    """`path` relative to the working directory when it is inside it (shorter lines, no wrapping)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _last_look(saved: Results, client: Client) -> None:
    """After an interruption or a silo's failure: save the newest rounds and adapter if the aggregator answers."""
    client.http.timeout = httpx.Timeout(5.0)
    with contextlib.suppress(httpx.HTTPError, ClientError):  # else keep what was saved after the last round
        saved.refresh(client)


def _print_results(run_dir: Path, saved: Results, outcome: str, message: str) -> None:
    where = _short(run_dir)
    latest = _short(run_dir.parent / runs.LATEST)
    if outcome != "succeeded":
        kept = (f"kept rounds 1-{saved.version} and the global adapter of round {saved.version}"
                if saved.version else "no round completed: nothing but the logs to keep")
        console.print(f"[yellow]{outcome}[/] ({message}): {kept}", soft_wrap=True)
    console.print(f"results: {where}/   (also {latest}/)", soft_wrap=True)
    if saved.version:
        card = f"  adapter/     PEFT adapter, version {saved.version}, with its model card (adapter/README.md)"
        console.print(card, soft_wrap=True)
    console.print("  rounds.csv   rounds.png   logs/   run.json", soft_wrap=True)


def _aggregator_env(run_dir: Path, port: int, admin: str, certs: certificates.RunCertificates) -> dict[str, str]:
    """The same port, database and checkpoint folder on every (re)start: a restart resumes the job."""
    return {
        "FEDSILO_TLS_CERT_FILE": str(certs.server[0]),
        "FEDSILO_TLS_KEY_FILE": str(certs.server[1]),
        "FEDSILO_TLS_CLIENT_CA_FILE": str(certs.ca),  # mutual TLS: each silo proves which silo it is
        "FEDSILO_INSECURE_HTTP": "false",  # whatever the caller's shell says
        "FEDSILO_ADMIN_TOKEN": admin,
        "FEDSILO_HOST": "127.0.0.1",
        "FEDSILO_PORT": str(port),
        "FEDSILO_DATABASE_URL": f"sqlite:///{run_dir / 'state' / 'fedsilo.db'}",
        "FEDSILO_CHECKPOINT_DIR": str(run_dir / "state"),
        "FEDSILO_JOB_FILE": str(run_dir / "job.json"),
        "FEDSILO_SILO_TOKENS_FILE": str(run_dir / "state" / "tokens.json"),
        "FEDSILO_LOG_LEVEL": "info",  # one logfmt line per round, upload and refusal
        # one aggregator per run, supervised here: a restarted one waits only briefly for a killed one's lease
        "FEDSILO_LEASE_SECONDS": "3",
    }


def _silo_env(
    url: str, job: str, silo: str, token: str, job_dir: Path, model_path: str, threads: int,
    certs: certificates.RunCertificates,
) -> dict[str, str]:
    cert, key = certs.silo(silo)
    return {
        "FEDSILO_CA_BUNDLE": str(certs.ca),
        "FEDSILO_CLIENT_CERT": str(cert),
        "FEDSILO_CLIENT_KEY": str(key),
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


def _wait_ready(url: str, procs: Processes, ca: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    verify = tls.client_context(ca)
    while time.monotonic() < deadline:
        procs.supervise()
        try:
            if httpx.get(f"{url}/readyz", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the aggregator was not ready within {timeout:.0f}s")


def _follow(client: Client, procs: Processes, job: FederatedJob, saved: Results, started: float) -> tuple[
        runs.Outcome, str]:
    """Show progress and save results as they arrive, until the job ends and every silo has finished."""
    silos = [s.name for s in job.spec.silos]
    has_evaluator = any(s.role == "evaluator" for s in job.spec.silos)
    seen: object = None
    asked: tuple[object, float] = (None, 0.0)  # what status said when rounds and evaluations were last read
    with progress.Display(console) as display:
        while True:
            procs.supervise()
            try:
                status = client.status()
                said = (status.phase, status.round, status.version, status.accuracy, status.loss)
                if said != asked[0] or time.monotonic() - asked[1] > FULL_READ_SECONDS:
                    saved.refresh(client, status=status)  # rounds, evaluations and a new adapter: on news only
                    asked = (said, time.monotonic())
            except (httpx.TransportError, ClientError) as exc:
                if not _unavailable(exc):
                    raise
                display.show("aggregator unavailable: waiting for it to come back", "unavailable")
                time.sleep(0.5)
                continue
            news = (status.phase, status.round, status.version, repr(saved.evaluations), len(saved.history))
            if news != seen:  # a round closed, an evaluation arrived: the folder follows
                saved.write()
                seen = news
            busy = [s for s in silos if not procs.finished(s)]
            phase, score, states = progress.parts(status, saved.history, saved.evaluations,
                                                  has_evaluator=has_evaluator, busy=busy)
            display.show(progress.line(phase, score, states, time.monotonic() - started, display.width),
                         f"{phase}  ·  {score}")
            if status.phase == "Failed":
                console.print(f"[red]job failed: {status.message}[/]", soft_wrap=True)
                return "failed", status.message
            if status.phase == "Succeeded" and not busy:
                return "succeeded", ""
            time.sleep(0.5)
