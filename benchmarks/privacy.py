"""What privacy costs: secure aggregation's seconds and bytes per round, and accuracy vs epsilon.

Part 1, secure aggregation cost (`--parts cost`): a real aggregator process
(`python -m fedsilo aggregator`, configured by the FEDSILO_* variables `fedsilo run` uses,
SQLite store) and light scripted silos, one thread each in this process, running the silo
agent's own SecAgg code (`silo_agent/secure.py` `SecureRound`) over real HTTP on loopback,
as tests/aggregator/test_secure.py does. They do not train: every silo uploads a fixed
random delta shaped like the real adapter (MiniLM-L6 + LoRA r=8 on query/value + the
classification head, built once here with the product's own `load_base` + `wrap`), so a
round's wall time is the protocol alone. Per round: wall seconds from open to close and the
aggregator's `aggregation_seconds` (the unmasking under `secure`), both from
GET /v1/jobs/<job>/rounds; the aggregator's CPU seconds (/proc); bytes each silo sent and
received, counted on the real request and response bodies by an injected httpx transport;
when the last silo reached each SecAgg milestone; and the silo-side CPU seconds of
`secagg.share_secrets` and `secagg.mask`, timed apart (thread CPU time, same shapes, same
cohort size) because 50 silos sharing two cores cannot time themselves. Cases: 4 and 50
silos, plain and secure, and 50 secure silos of which 10 drop after sharing their keys.

Part 2, accuracy vs epsilon (`--parts accuracy`): the quickstart (examples/quickstart.yaml:
3 trainer silos + 1 evaluator, 4 rounds) run end to end by `fedsilo run` with one generated
YAML per cell, for fedavg (LoRA) and ffa-lora at epsilon inf (DP off, plain aggregation) and
8, 4, 1 (client-level DP with the noise in shares under `secure: true`). For each target the
noise multiplier is found by bisection so that Opacus' RDPAccountant gives exactly that
epsilon after the job's rounds (q = 1, delta 1e-5); the accuracy is the evaluator silo's on
the held-out test movies after the last round (runs/<job>/rounds.csv), epsilon the
aggregator's own (its store). Part 3 (printed with part 2) computes how the DP noise on the
mean falls with the silo count, and how many silos each epsilon needs.

On this 2-core machine, shared with other work: part 1 ~10 min, part 2 ~11 min per cell.

    python benchmarks/privacy.py                                  # everything, ~1.5 h
    python benchmarks/privacy.py --parts cost --silos 4 --no-dropout
    python benchmarks/privacy.py --parts accuracy --quick --cells fedavg:inf,ffa-lora:8
    python benchmarks/privacy.py --record /tmp/privacy.jsonl      # resumable: finished cases are reused
    python benchmarks/privacy.py --record /tmp/privacy.jsonl --report-only --work /tmp/kept-runs
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import numpy as np
import torch
import yaml
from opacus.accountants import RDPAccountant

from fedsilo.adapters import State, from_bytes, l2_norm, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client, Outcome
from fedsilo.local.runner import free_port
from fedsilo.privacy import secagg
from fedsilo.silo_agent.secure import SecureRound, SitOut
from fedsilo.spec import dump_job, load_job, parse_job

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "data" / "models" / "all-MiniLM-L6-v2"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STRATEGIES = ("fedavg", "ffa-lora")
EPSILONS = (math.inf, 8.0, 4.0, 1.0)
DELTA = 1e-5
EXAMPLES_PER_SILO = 100
MILESTONES = ("task", "shared", "masked", "uploaded", "revealed", "closed")


# ---- part 1: secure aggregation cost ---------------------------------------------------------


class CountingTransport(httpx.BaseTransport):
    """Loopback HTTP that counts body bytes per (round, what): what a silo really sends and receives."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.up: Counter[tuple[int, str]] = Counter()
        self.down: Counter[tuple[int, str]] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        key = _classify(request.url.path)
        self.up[key] += len(request.read())
        response = self.inner.handle_request(request)
        self.down[key] += len(response.read())
        return response

    def close(self) -> None:
        self.inner.close()


def _classify(path: str) -> tuple[int, str]:
    """(round, what) of a silo's request: keys, shares, reveal, view (SecAgg GETs), update; round 0 for the rest."""
    parts = path.strip("/").split("/")
    if "rounds" not in parts:
        return 0, parts[-1]  # task polls, join, the initial adapter
    round_ = int(parts[parts.index("rounds") + 1])
    if "secagg" in parts:
        return round_, parts[-1] if len(parts) > parts.index("secagg") + 2 else "view"
    return round_, "update"


@dataclass
class CostCase:
    label: str
    silos: int
    secure: bool
    drop: int = 0  # silos that drop after sharing their keys, every round
    timeout: float = 600.0  # roundTimeoutSeconds


@dataclass
class CostRow:
    case: CostCase
    wall: list[float]  # per round
    unmask: list[float]
    up: dict[str, float]  # mean bytes per surviving silo per round, by what
    down: dict[str, float]
    share_cpu: float | None = None
    mask_cpu: float | None = None
    updates: list[int] = field(default_factory=list)
    timeline: dict[str, float] = field(default_factory=dict)  # milestone -> s after the round opened (last silo)
    aggregator_cpu: float = 0.0  # CPU seconds of the aggregator process per round
    silos_cpu: float = 0.0  # CPU seconds of this process (all scripted silos) per round, per silo
    load: float = 0.0  # the machine's 1-minute load average around the case


@functools.cache
def adapter_shapes() -> dict[str, tuple[int, ...]]:
    """The quickstart's adapter (LoRA r=8 on query/value + head) as the silo agent builds it."""
    from fedsilo.silo_agent.model import adapter_state, load_base, peft_config, wrap

    job = load_job(EXAMPLES / "quickstart.yaml")
    model, _ = load_base(job.spec, str(MODEL))
    state = adapter_state(wrap(model, peft_config(job.spec, str(MODEL)), job.spec.training.seed))
    return {k: tuple(v.shape) for k, v in state.items()}


def random_delta(shapes: dict[str, tuple[int, ...]], seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.01 for k, shape in shapes.items()}


def cost_document(case: CostCase, rounds: int) -> dict[str, Any]:
    aggregation = {"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": case.timeout, "secure": case.secure}
    document = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "bench-cost"},
        "spec": {
            "baseModel": {"path": str(MODEL)},
            "task": {"type": "sequence-classification", "labels": ["rotten", "fresh"]},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["query", "value"]},
            "training": {"rounds": rounds, "localSteps": 1},
            "aggregation": aggregation,
            "silos": [{"name": silo_name(i), "data": {"path": "unused.csv"}} for i in range(case.silos)],
        },
    }
    return dump_job(parse_job(document))  # validated by the product's own schema


def silo_name(i: int) -> str:
    return f"silo-{i:02d}"


@contextmanager
def aggregator(work: Path, document: dict[str, Any], tokens: dict[str, str]) -> Iterator[tuple[str, str, int]]:
    """`python -m fedsilo aggregator` with the job and tokens from files, as `fedsilo run` starts it."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(document))
    (work / "tokens.json").write_text(json.dumps(tokens))
    port, admin = free_port(), secrets.token_urlsafe(24)
    env = {
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
    url = f"http://127.0.0.1:{port}"
    with (work / "aggregator.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedsilo", "aggregator"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("aggregator did not start:\n" + (work / "aggregator.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url, admin, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


Events = list[tuple[int, str, float]]  # (round, milestone, wall-clock time) of one silo


def scripted_silo(
    client: Client, delta: State, rounds: int, drop: bool, events: Events, errors: list[BaseException]
) -> None:
    """The silo agent's round loop without training: plain upload, or the SecAgg stages around it.

    `drop`: every round, stop after sharing the keys (crashed while training) and come back next round.
    Milestones: task (train task received), shared (keys and shares posted), masked (share roster
    closed, inbox opened, update masked), uploaded (accepted), revealed.
    """
    silo = client.silo or ""
    plain = to_bytes(delta)
    try:
        done = 0
        while done < rounds:
            task = client.task(wait=5)
            if task.action == "done":
                return
            if task.action != "train":
                continue
            done += 1
            events.append((task.round, "task", time.time()))
            if not task.secure:
                assert client.put_update(task.round, plain, EXAMPLES_PER_SILO, 0.0).outcome is Outcome.ACCEPTED
                events.append((task.round, "uploaded", time.time()))
                continue
            secure = SecureRound(client, silo, task.round)
            try:
                secure.exchange_keys()
                events.append((task.round, "shared", time.time()))
                if drop:
                    continue
                data = secure.masked(delta, task, EXAMPLES_PER_SILO)
                events.append((task.round, "masked", time.time()))
                assert client.put_update(task.round, data, EXAMPLES_PER_SILO, 0.0).outcome is Outcome.ACCEPTED
                events.append((task.round, "uploaded", time.time()))
                secure.reveal()
                events.append((task.round, "revealed", time.time()))
            except SitOut:
                continue
    except BaseException as exc:  # reported by the caller: a benchmark that hides failures measures nothing
        errors.append(exc)
    finally:
        client.close()


def run_cost_case(case: CostCase, rounds: int, shapes: dict[str, tuple[int, ...]], work: Path) -> CostRow:
    names = [silo_name(i) for i in range(case.silos)]
    tokens = {s: secrets.token_urlsafe(24) for s in names}
    transports = {s: CountingTransport() for s in names}
    deltas = [random_delta(shapes, i) for i in range(min(case.silos, 8))]  # values do not change the cost
    dropping = set(names[-case.drop :]) if case.drop else set()
    events: dict[str, Events] = {s: [] for s in names}
    errors: list[BaseException] = []
    load = os.getloadavg()[0]
    with aggregator(work, cost_document(case, rounds), tokens) as (url, admin, pid):
        clients = {s: Client(url, "bench-cost", tokens[s], s, retries=None, transport=transports[s]) for s in names}
        for s in names:
            clients[s].join(m.JoinRequest(n_train_examples=EXAMPLES_PER_SILO, n_eval_examples=0))
        cpu0, own0 = _cpu_of(pid), time.process_time()
        clients[names[0]].put_initial(to_bytes({k: torch.zeros(shape) for k, shape in shapes.items()}))
        threads = [
            threading.Thread(
                target=scripted_silo,
                args=(clients[s], deltas[i % len(deltas)], rounds, s in dropping, events[s], errors),
            )
            for i, s in enumerate(names)
        ]
        for t in threads:
            t.start()
        history = _finished(Client(url, "bench-cost", admin, retries=3, timeout=60), case, rounds, errors, work)
        cpu, own = _cpu_of(pid) - cpu0, time.process_time() - own0
        for t in threads:
            t.join(60)
    survivors = [s for s in names if s not in dropping]
    return CostRow(
        case,
        wall=[r.duration_seconds or 0.0 for r in history],
        unmask=[r.aggregation_seconds or 0.0 for r in history],
        up=_per_silo([transports[s].up for s in survivors], rounds),
        down=_per_silo([transports[s].down for s in survivors], rounds),
        updates=[r.updates for r in history],
        timeline=timeline(history, [events[s] for s in survivors]),
        aggregator_cpu=cpu / rounds,
        silos_cpu=own / rounds / case.silos,
        load=(load + os.getloadavg()[0]) / 2,
    )


def _finished(admin: Client, case: CostCase, rounds: int, errors: list[BaseException], work: Path) -> list[m.RoundInfo]:
    """Wait for the job to succeed; its round history."""
    deadline = time.monotonic() + rounds * (case.timeout + 120)
    while (status := admin.status()).phase not in ("Succeeded", "Failed"):
        if errors or time.monotonic() > deadline:
            raise SystemExit(f"{case.label}: {errors or 'timed out'}; logs in {work}")
        time.sleep(0.5)
    if status.phase != "Succeeded":
        raise SystemExit(f"{case.label}: job {status.phase}: {status.message}")
    try:
        return admin.rounds()
    finally:
        admin.close()


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timeline(history: list[m.RoundInfo], events: list[Events]) -> dict[str, float]:
    """Seconds from each round's opening until the last silo reached each milestone; median over rounds."""
    per_round: dict[str, list[float]] = {}
    for r in history:
        opened = r.opened_at.timestamp()
        reached: dict[str, float] = {}
        for silo_events in events:
            for round_, what, t in silo_events:
                if round_ == r.round:
                    reached[what] = max(reached.get(what, 0.0), t - opened)
        if r.closed_at is not None:
            reached["closed"] = r.closed_at.timestamp() - opened
        for what, seconds in reached.items():
            per_round.setdefault(what, []).append(seconds)
    return {what: statistics.median(values) for what, values in per_round.items()}


def _per_silo(counters: list[Counter[tuple[int, str]]], rounds: int) -> dict[str, float]:
    """Mean bytes per silo per round, by what (requests outside a round, like task polls, left out)."""
    total: Counter[str] = Counter()
    for counter in counters:
        for (round_, what), n in counter.items():
            if round_ > 0:
                total[what] += n
    return {what: n / len(counters) / rounds for what, n in total.items()}


def silo_cpu(n: int, shapes: dict[str, tuple[int, ...]], repeats: int) -> tuple[float, float]:
    """Thread CPU seconds of one silo's `share_secrets` and `mask` in a cohort of n (median of `repeats`)."""
    context = secagg.context_for("bench-cost", 1)
    keys = {silo_name(i): secagg.RoundKeys.generate(context) for i in range(n)}
    roster = {name: k.public() for name, k in keys.items()}
    me = silo_name(0)
    threshold = secagg.threshold_for(n, 0.6)
    size = sum(int(np.prod(s)) for s in shapes.values())
    vector = secagg.encode(np.random.default_rng(0).normal(0, 0.01, size) * EXAMPLES_PER_SILO)
    share = _cpu(lambda: secagg.share_secrets(keys[me], me, roster, threshold, context), repeats)
    masked = _cpu(lambda: secagg.mask(vector, keys[me], me, roster, context), repeats)
    return share, masked


def _cpu(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        call()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def cost_part(args: argparse.Namespace, work: Path) -> list[str]:
    shapes = adapter_shapes()
    size = sum(int(np.prod(s)) for s in shapes.values())
    print(f"adapter: {len(shapes)} tensors, {size:,} values", flush=True)
    cases = [CostCase(f"{n} silos, {kind}", n, kind == "secure") for n in args.silos for kind in ("plain", "secure")]
    if args.dropout and max(args.silos) >= 50:
        cases.append(CostCase("50 silos, secure, 10 drop", 50, True, drop=10, timeout=args.dropout_timeout))
    done = {r.case.label: r for r in load_record(args.record, args)[1]}
    rows = []
    for i, case in enumerate(cases):
        rounds = 1 if case.drop else args.cost_rounds
        if case.label in done and len(done[case.label].wall) == rounds and done[case.label].case == case:
            print(f"  {case.label}: from {args.record}", flush=True)
            rows.append(done[case.label])
            continue
        if args.report_only:
            continue
        print(f"  {case.label}: {rounds} round(s) ({datetime.now(UTC):%H:%M:%S} UTC)", flush=True)
        row = run_cost_case(case, rounds, shapes, work / f"cost-{i}")
        if case.secure and not case.drop:
            row.share_cpu, row.mask_cpu = silo_cpu(case.silos, shapes, args.cpu_repeats)
        print(f"    {row}", flush=True)
        rows.append(row)
        record(args.record, row)
    return cost_report(rows, size, args)


def cost_report(rows: list[CostRow], size: int, args: argparse.Namespace) -> list[str]:
    lines = [
        "## 1. Secure aggregation cost per round",
        "",
        f"Adapter: MiniLM-L6 + LoRA r=8 on query/value + classification head, {size:,} values "
        f"(float32 upload {4 * size:,} B of tensor data, masked upload {8 * size:,} B: one uint64 per value). "
        f"fedavg, secureThreshold 0.6 (t = 3 of 4, 30 of 50), {args.cost_rounds} rounds per case (median shown; "
        "1 round for the dropout case), scripted silos that do not train (a round is protocol only), one thread "
        "each in one process next to the aggregator process, all on this machine's 2 cores.",
        "",
        "Seconds. Round wall: open to close (GET /rounds). Unmask/aggregate: the aggregator's `aggregation_seconds` "
        "(unmasking included under secure). Aggregator CPU: its process's CPU seconds per round. Silo CPU in situ: "
        "this process's CPU per round divided by the silos (HTTP, JSON, crypto; 50 threads on 2 cores). "
        "share_secrets / mask: one silo's thread CPU for the call alone, same cohort size and adapter, median of "
        f"{args.cpu_repeats}. Load: the machine's 1-minute load average around the case (2 cores).",
        "",
        "| case | round wall s | unmask / aggregate s | aggregator CPU s | silo CPU in situ s | "
        "share_secrets s | mask s | updates counted | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case.label} | {statistics.median(r.wall):.2f} | {statistics.median(r.unmask):.3f} | "
            f"{r.aggregator_cpu:.2f} | {r.silos_cpu:.3f} | {_opt(r.share_cpu, '.4f')} | {_opt(r.mask_cpu, '.4f')} | "
            f"{'/'.join(map(str, r.updates))} | {r.load:.1f} |"
        )
    lines += [
        "",
        "Bytes per silo per round, request and response bodies as sent (HTTP headers and task polls left out; "
        "the global adapter's download is the same in both modes and not part of these scripted rounds).",
        "",
        "| case | up: update | up: keys | up: shares | up: reveal | up total | down: SecAgg views | vs plain up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = {r.case.silos: sum(r.up.values()) for r in rows if not r.case.secure}
    for r in rows:
        total = sum(r.up.values())
        ratio = f"{total / plain[r.case.silos]:.2f}x" if r.case.silos in plain else ""
        parts = " | ".join(f"{r.up.get(k, 0.0):,.0f}" for k in ("update", "keys", "shares", "reveal"))
        lines.append(f"| {r.case.label} | {parts} | {total:,.0f} | {r.down.get('view', 0.0):,.0f} | {ratio} |")
    return [*lines, "", *timeline_report(rows)]


def timeline_report(rows: list[CostRow]) -> list[str]:
    lines = [
        "Where a round's time goes: seconds after the round opened until the last (surviving) silo had its train "
        "task, had posted keys and shares, had masked its update (once the share roster closed), had its upload "
        "accepted, had revealed; and until the round closed (median over rounds).",
        "",
        "| case | task | shared | masked | uploaded | revealed | closed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(_opt(r.timeline.get(k), ".2f") for k in MILESTONES)
        lines.append(f"| {r.case.label} | {cells} |")
    lines += ["", "Per round (wall s / unmask s):", ""]
    for r in rows:
        pairs = ", ".join(f"{w:.2f}/{u:.3f}" for w, u in zip(r.wall, r.unmask, strict=True))
        lines.append(f"- {r.case.label}: {pairs}")
    return [*lines, ""]


def _opt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _bytes(by_what: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.0f}" for k, v in sorted(by_what.items())) or "none"


# ---- part 2: accuracy vs epsilon -------------------------------------------------------------


def epsilon_after(sigma: float, rounds: int, delta: float = DELTA) -> float:
    """Opacus RDP epsilon of `rounds` full-participation (q = 1) Gaussian rounds at noise multiplier sigma."""
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, rounds)]
    return float(accountant.get_epsilon(delta))


def noise_for(target: float, rounds: int, delta: float = DELTA) -> float:
    """The noise multiplier whose epsilon after `rounds` is `target` (bisection; never above it)."""
    low, high = 1e-2, 1e3  # epsilon falls as sigma grows
    with warnings.catch_warnings():  # tiny sigmas hit the largest RDP order: irrelevant to the answer
        warnings.simplefilter("ignore", UserWarning)
        while high - low > 1e-9 * high:
            mid = (low + high) / 2
            if epsilon_after(mid, rounds, delta) > target:
                low = mid
            else:
                high = mid
    return high


@dataclass
class Cell:
    strategy: str
    epsilon: float  # target; inf = DP off
    sigma: float | None = None
    accuracy: float | None = None
    accuracies: list[float | None] = field(default_factory=list)  # after rounds 0..R
    reported_epsilon: float | None = None  # the aggregator's, after the last round
    rounds: int = 0
    seconds: float = 0.0
    quick: bool = False
    clip_norm: float = 0.0
    error: str | None = None
    steps: list[float] = field(default_factory=list)  # L2 norm of each round's global step v_r - v_(r-1)

    @property
    def key(self) -> str:
        return f"{self.strategy}:{self.epsilon:g}"


def cell_document(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """The quickstart with this cell's strategy and privacy (data paths via a `data` link next to it)."""
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    spec = document["spec"]
    document["metadata"]["name"] = job_name(cell)
    spec["aggregation"]["strategy"] = cell.strategy
    if args.quick:
        spec["training"]["localSteps"] = 3
        for silo in spec["silos"]:
            silo["data"]["maxExamples"] = 120
    if cell.sigma is not None:
        spec["aggregation"]["secure"] = True
        dp = {"clipNorm": cell.clip_norm, "noiseMultiplier": cell.sigma, "delta": DELTA, "targetEpsilon": cell.epsilon}
        spec["privacy"] = {"dp": {**dp, "onTarget": "stop", "accountant": "rdp"}}
    return document


def run_cell(cell: Cell, args: argparse.Namespace, work: Path) -> Cell:
    rounds = job_rounds()
    cell.quick, cell.clip_norm = args.quick, args.clip_norm
    if math.isfinite(cell.epsilon):
        cell.sigma = noise_for(cell.epsilon, rounds)
    document = cell_document(cell, args)
    name = document["metadata"]["name"]
    job_file = work / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(document, sort_keys=False))
    runs = work / "runs"
    started = time.monotonic()
    with (work / f"{name}.log").open("wb") as log:
        code = subprocess.run(
            [sys.executable, "-m", "fedsilo", "run", str(job_file), "--out", str(runs)], env=ENV, stdout=log, stderr=log
        ).returncode
    cell.seconds = time.monotonic() - started
    if code != 0:
        cell.error = f"failed: fedsilo run exited {code} (log {work / f'{name}.log'})"
        return cell
    folder = run_folder(runs, name)
    with (folder / "rounds.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    cell.accuracies = [float(r["accuracy"]) if r["accuracy"] else None for r in table]
    cell.accuracy, cell.rounds = cell.accuracies[-1], len(table) - 1
    cell.reported_epsilon = _store_epsilon(folder / "state" / "fedsilo.db", name)
    cell.steps = step_norms(folder / "state", name)
    return cell


def run_folder(runs: Path, name: str) -> Path:
    """runs/<job>/latest/ (one folder per run), or runs/<job>/ as `fedsilo run` wrote it before."""
    latest = runs / name / "latest"
    return latest if latest.exists() else runs / name


def job_rounds() -> int:
    return load_job(EXAMPLES / "quickstart.yaml").spec.training.rounds


def job_name(cell: Cell) -> str:
    return f"{cell.strategy}-eps-{cell.epsilon:g}".replace(".", "-")


def step_norms(state: Path, job: str) -> list[float]:
    """L2 norms of the global steps v_r - v_(r-1), from the versions in the aggregator's store and blobs."""
    with sqlite3.connect(f"file:{state / 'fedsilo.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT sha256 FROM versions WHERE job = ? ORDER BY version", (job,)).fetchall()
    versions = [from_bytes(next((state / "blobs").rglob(f"{sha}*")).read_bytes()) for (sha,) in rows]
    return [l2_norm({k: new[k].double() - old[k].double() for k in new}) for old, new in itertools.pairwise(versions)]


def _store_epsilon(db: Path, job: str) -> float | None:
    """Epsilon the aggregator recorded with its last closed round (None without DP)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT metrics FROM rounds WHERE job = ? ORDER BY number", (job,)).fetchall()
    values = [json.loads(r[0]).get("epsilon") if r[0] else None for r in rows]
    return values[-1] if values else None


def load_record(path: Path | None, args: argparse.Namespace) -> tuple[dict[str, Cell], list[CostRow]]:
    """Cells and cost cases finished earlier with the same settings (so an interrupted run resumes)."""
    if path is None or not path.exists():
        return {}, []
    cells, costs = {}, []
    for line in path.read_text().splitlines():
        item = json.loads(line) if line.strip() else None
        if item is None:
            continue
        if "case" in item:
            costs.append(CostRow(**{**item, "case": CostCase(**item["case"])}))
            continue
        cell = Cell(**item)
        if cell.quick == args.quick and cell.clip_norm == args.clip_norm and not cell.error:
            cells[cell.key] = cell
    return cells, costs


def record(path: Path | None, item: Cell | CostRow) -> None:
    if path is not None:
        with path.open("a") as out:
            out.write(json.dumps(asdict(item)) + "\n")


def accuracy_part(args: argparse.Namespace, work: Path) -> list[str]:
    wanted = [Cell(s, e) for e in EPSILONS for s in STRATEGIES]
    if args.cells:
        keys = {_cell_key(c) for c in args.cells.split(",")}
        wanted = [c for c in wanted if c.key in keys]
    done = load_record(args.record, args)[0]
    cells = []
    for cell in wanted:
        if cell.key in done:
            print(f"  {cell.key}: from {args.record}", flush=True)
            cells.append(done[cell.key])
            state = run_folder(work / "runs", job_name(cell)) / "state"
            if not cells[-1].steps and state.exists():  # recorded before step norms were
                cells[-1].steps = step_norms(state, job_name(cell))
            continue
        if args.report_only:
            cell.sigma = noise_for(cell.epsilon, job_rounds()) if math.isfinite(cell.epsilon) else None
            cell.error = "not measured (no record)"
            cells.append(cell)
            continue
        print(f"  {cell.key}: running ({datetime.now(UTC):%H:%M:%S} UTC)", flush=True)
        cells.append(run_cell(cell, args, work))
        print(f"    {cells[-1]}", flush=True)
        record(args.record, cells[-1])
    return accuracy_report(cells, args, noised_sizes())


def _cell_key(text: str) -> str:
    strategy, _, epsilon = text.partition(":")
    return f"{strategy}:{float(epsilon):g}"


def constant_accuracy() -> tuple[float, str, int]:
    """Accuracy of always predicting the test set's most frequent label."""
    with (EXAMPLES / "data" / "rotten-tomatoes" / "test.csv").open(newline="") as f:
        labels = Counter(row["label"] for row in csv.DictReader(f))
    label, count = labels.most_common(1)[0]
    return count / sum(labels.values()), label, sum(labels.values())


def accuracy_report(cells: list[Cell], args: argparse.Namespace, sizes: dict[str, int]) -> list[str]:
    baseline, label, n = constant_accuracy()
    job = load_job(EXAMPLES / "quickstart.yaml")
    rounds = job.spec.training.rounds
    lines = [
        "## 2. Accuracy vs epsilon (the quickstart task)",
        "",
        f"examples/quickstart.yaml: MiniLM-L6 + LoRA r=8, 3 trainer silos, {rounds} rounds, localSteps "
        f"{3 if args.quick else job.spec.training.local_steps}{', maxExamples 120 (--quick)' if args.quick else ''}"
        f"; DP cells: clipNorm {args.clip_norm}, delta {DELTA:g}, RDP accountant, q = 1, secure: true (each silo adds "
        f"noise of std sigma*C/sqrt(t), t = 2 of 3). Accuracy: the evaluator silo's on {n} test reviews after the last "
        f"round. Constant predictor ('{label}'): {baseline:.3f}. Global step: the L2 norm of v_r - v_(r-1) "
        "(median over rounds, from the aggregator's stored versions); expected noise: the norm of the DP noise "
        "on the mean, sigma*C*sqrt(d)*sqrt(3/2)/3 over the d noised values (section 3). Epsilon reported: the "
        "aggregator's own after the last round.",
        "",
        "| strategy | target epsilon | noise multiplier sigma | epsilon reported | rounds | test accuracy | "
        "accuracy by round (0..R) | global step norm | expected noise norm | run s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        if c.error:
            lines.append(f"| {c.strategy} | {c.epsilon:g} | {_opt(c.sigma, '.4f')} | | | {c.error} | | | | |")
            continue
        by_round = " ".join("-" if a is None else f"{a:.3f}" for a in c.accuracies)
        noise = None if c.sigma is None else c.sigma * c.clip_norm * math.sqrt(sizes[c.strategy] * 3 / 2) / 3
        step = statistics.median(c.steps) if c.steps else None
        lines.append(
            f"| {c.strategy} | {c.epsilon:g} | {_opt(c.sigma, '.4f') or 'off'} | {_opt(c.reported_epsilon, '.3f')} | "
            f"{c.rounds} | {_opt(c.accuracy, '.3f')} | {by_round} | {_opt(step, '.2f')} | {_opt(noise, '.1f')} | "
            f"{c.seconds:.0f} |"
        )
    return [*lines, ""]


def noise_scaling(args: argparse.Namespace, sizes: dict[str, int]) -> list[str]:
    """How the noise on the mean scales with the silo count, and which count makes each epsilon usable."""
    rounds = job_rounds()
    counts = (3, 10, 30, 100, 300, 1000, 3000)
    lines = [
        "## 3. Why 3 silos cannot afford client-level DP: noise on the mean vs silo count",
        "",
        "Each silo clips its update to L2 norm C and the updates are summed with weight 1, so the mean over n "
        "silos has a signal of norm at most C. The sum carries Gaussian noise of std sigma*C per coordinate "
        "(central DP); under secure aggregation each silo adds std sigma*C/sqrt(t), t = ceil(0.6 n) "
        "(`dp.share_std`), so the sum carries sigma*C*sqrt(n/t): 1.22x more with 3 silos (t = 2), 1.29x for "
        "large n. The mean carries sigma*C*sqrt(n/t)/n per coordinate, an L2 norm of sigma*C*sqrt(d)*sqrt(n/t)/n "
        "over the d noised values. Noise-to-signal per round on the mean is therefore at least "
        "sigma*sqrt(d)*sqrt(n/t)/n, whatever C is, and with q = 1 sigma (the epsilon) does not depend on n. "
        "Below: that ratio for n silos under secure aggregation, and the smallest n where it falls to 1 "
        "(noise as large as the largest possible signal: one round's step is still half noise; four rounds "
        "average it down by 2).",
        "",
        "| strategy | d | epsilon | sigma | " + " | ".join(f"n = {n}" for n in counts) + " | n for ratio 1 |",
        "|---|---|---|---|" + "---|" * len(counts) + "---|",
    ]
    for strategy, d in sizes.items():
        for eps in (8.0, 4.0, 1.0):
            sigma = noise_for(eps, rounds)
            ratios = " | ".join(f"{noise_ratio(sigma, d, n):,.2f}" for n in counts)
            lines.append(f"| {strategy} | {d:,} | {eps:g} | {sigma:.3f} | {ratios} | {silos_for(sigma, d):,} |")
    return [*lines, ""]


def noise_ratio(sigma: float, d: int, n: int) -> float:
    """Noise norm on the mean of n clipped updates over the largest signal norm C (secure aggregation shares)."""
    t = secagg.threshold_for(n, 0.6) if n > 1 else 1
    return sigma * math.sqrt(d) * math.sqrt(n / t) / n


def silos_for(sigma: float, d: int, ratio: float = 1.0) -> int:
    """The fewest silos whose mean carries noise of at most `ratio` times the largest signal."""
    n = 2
    while noise_ratio(sigma, d, n) > ratio:
        n += 1
    return n


def noised_sizes() -> dict[str, int]:
    """Values each strategy's silos clip and noise: everything for fedavg, all but the frozen A for ffa-lora."""
    from fedsilo.strategies import is_lora_a

    shapes = adapter_shapes()
    every = {k: int(np.prod(s)) for k, s in shapes.items()}
    return {"fedavg": sum(every.values()), "ffa-lora": sum(v for k, v in every.items() if not is_lora_a(k))}


# ---- the report ------------------------------------------------------------------------------


def header(args: argparse.Namespace, wall: float) -> list[str]:
    return [
        "# Privacy: secure aggregation cost and accuracy vs epsilon (benchmarks/privacy.py)",
        "",
        f"Command: `{' '.join(['python benchmarks/privacy.py', *sys.argv[1:]])}`",
        "",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {platform.platform()}, {os.cpu_count()} CPU cores "
        f"(shared with other work while this ran), torch {torch.__version__}. Wall time {wall / 60:.1f} min"
        + (
            f"; rows found in {args.record} were measured by earlier runs of this script and reused."
            if args.record
            else "."
        ),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parts", default="cost,accuracy", help="Comma-separated: cost, accuracy.")
    parser.add_argument("--silos", type=lambda s: [int(x) for x in s.split(",")], default=[4, 50])
    parser.add_argument("--cost-rounds", type=int, default=3, help="Rounds per cost case.")
    parser.add_argument("--no-dropout", dest="dropout", action="store_false", help="Skip the 50-silo dropout case.")
    parser.add_argument("--dropout-timeout", type=float, default=90.0, help="roundTimeoutSeconds of the dropout case.")
    parser.add_argument("--cpu-repeats", type=int, default=5)
    parser.add_argument("--cells", help="Accuracy cells, e.g. fedavg:inf,ffa-lora:8 (default: all 8).")
    parser.add_argument("--quick", action="store_true", help="Accuracy cells with 3 local steps on 120 examples.")
    parser.add_argument("--clip-norm", type=float, default=0.5, help="clipNorm C of the DP cells.")
    parser.add_argument("--record", type=Path, help="JSON lines of finished cells and cases: reused, appended to.")
    parser.add_argument("--report-only", action="store_true", help="Print what --record holds; run nothing.")
    parser.add_argument("--work", type=Path, help="Keep runs and logs here (default: a temporary folder).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "privacy-results.md")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedsilo-privacy-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        link = work / "data"
        if not link.exists():
            link.symlink_to(EXAMPLES / "data")  # the quickstart's relative paths resolve next to each cell's YAML
        body: list[str] = []
        if "cost" in parts:
            body += cost_part(args, work)
        if "accuracy" in parts:
            body += accuracy_part(args, work)
            body += noise_scaling(args, noised_sizes())
        if args.work is None:
            shutil.rmtree(work / "runs", ignore_errors=True)
    report = header(args, time.monotonic() - began) + body
    print("\n".join(report))
    args.out.write_text("\n".join(report) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
