"""A simulated federation of 10 / 100 / 1,000 light scripted silos against one real aggregator.

The aggregator is a real process (SQLite in a temp dir, plain HTTP on loopback, `harness.py`).
Each silo is a coroutine in this process (asyncio + httpx, its own keep-alive connection) making
the API calls the silo agent makes (`silo_agent/agent.py: Agent.run`), without training: join;
long-poll its task (`wait` = the agent's `long_poll_seconds`, 1 s while a validation is owed, at
least `poll_seconds` between two `wait` answers); `init`: send the initial adapter; `train`:
download the global adapter, upload a delta; when idle, validate the version it trained from
(download if needed, post metrics); `evaluate`: the same; `done`: stop. The adapter is tiny
(LoRA A/B 8x64 + a 2x64 head, ~5 KB): the request path is measured, not tensor math.

Printed per federation size: mean round time (open to close, the aggregator's own
`duration_seconds`), round time per silo, wall time from the first join to the job's success,
requests and requests/s, the aggregator's CPU seconds (/proc) per silo-round, and how busy the
aggregator and the scripted silos (this process) were, in % of a core: where the silos' process
is near 100 %, the round time measures the scripted silos, not the aggregator.

    python benchmarks/federation.py                        # 10, 100, 1,000 silos, 3 rounds each
    PYTHONPATH=/work/main/src python benchmarks/federation.py --label main
    python benchmarks/federation.py --silos 10 100 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from harness import aggregator, cpu_seconds, job_document, load, silo_names

from fedsilo.adapters import delta, from_bytes, sha256, to_bytes
from fedsilo.api import models as m
from fedsilo.silo_agent.settings import SiloSettings

JOB = "bench-fed"
DEFAULTS = SiloSettings(aggregator_url="http://x", job="x", silo="x", token="x" * 16)
OWED_WAIT = 1.0  # the agent's wait while a validation is owed (agent.py)


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"m.lora_A.weight": (8, 64), "m.lora_B.weight": (64, 8), "classifier.weight": (2, 64)}
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


@dataclass
class Tally:
    requests: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)


class Silo:
    """One scripted silo agent over its own connection."""

    def __init__(self, http: httpx.AsyncClient, name: str, token: str, index: int, tally: Tally) -> None:
        self.http, self.name, self.tally = http, name, tally
        self.headers = {"Authorization": f"Bearer {token}", "X-Fedsilo-Silo": name}
        self.path = f"/v1/jobs/{JOB}/silos/{name}"
        self.mine = adapter(1000 + index)
        self.loaded: tuple[int, dict[str, torch.Tensor]] | None = None
        self.owed: list[int] = []

    async def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call; transport errors, 408, 429 and 5xx are retried as the agent's `Client` does."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        for attempt in range(20):
            self.tally.requests += 1
            try:
                response = await self.http.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code < 500 and response.status_code not in (408, 429):
                response.raise_for_status()
                return response
            self.tally.retries += 1
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        raise RuntimeError(f"{method} {url}: still failing after 20 tries")

    async def load(self, version: int) -> dict[str, torch.Tensor]:
        if self.loaded is None or self.loaded[0] != version:
            data = (await self.call("GET", f"/v1/jobs/{JOB}/adapters/{version}")).content
            self.loaded = (version, from_bytes(data))
        return self.loaded[1]

    async def validate(self, version: int) -> None:
        await self.load(version)
        report = {"version": version, "split": "validation", "loss": 0.5, "accuracy": 0.75, "n_examples": 10}
        await self.call("POST", f"{self.path}/metrics", json=report)

    async def train(self, task: dict[str, Any]) -> None:
        base = await self.load(task["version"])
        data = to_bytes(delta(self.mine, base))
        headers = {"Content-Type": m.SAFETENSORS_MEDIA_TYPE, "X-Fedsilo-Examples": "100",
                   "X-Fedsilo-Sha256": sha256(data), "X-Fedsilo-Train-Seconds": "0"}  # fmt: skip
        await self.call("PUT", f"/v1/jobs/{JOB}/rounds/{task['round']}/updates/{self.name}", content=data,
                        headers=headers)  # fmt: skip
        self.owed.append(task["version"])

    async def run(self, poll: float, long_poll: float) -> None:
        """`Agent.run` without the training."""
        await self.call("POST", f"{self.path}/join", json={"n_train_examples": 100, "n_eval_examples": 10})
        while True:
            asked = time.monotonic()
            wait = OWED_WAIT if self.owed else long_poll
            task = (await self.call("GET", f"{self.path}/task", params={"wait": f"{wait:g}"})).json()
            action = task["action"]
            if action in ("done", "wait") and self.owed:
                await self.validate(self.owed.pop(0))
            elif action == "done":
                return
            elif action == "wait":
                await asyncio.sleep(max(0.0, poll - (time.monotonic() - asked)))
            elif action == "init":
                await self.call("PUT", f"{self.path}/adapters/0", content=to_bytes(adapter(0)),
                                headers={"Content-Type": m.SAFETENSORS_MEDIA_TYPE})  # fmt: skip
            elif action == "evaluate":
                await self.validate(task["version"])
            elif action == "train":
                await self.train(task)


async def federation(url: str, tokens: dict[str, str], args: argparse.Namespace, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=len(tokens) + 16, max_keepalive_connections=len(tokens) + 16)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.long_poll + 120) as http:
        silos = [Silo(http, name, token, i, tally) for i, (name, token) in enumerate(tokens.items())]

        async def guarded(silo: Silo) -> None:
            try:
                await silo.run(args.poll, args.long_poll)
            except Exception as exc:  # reported: a benchmark that hides failures measures nothing
                tally.errors.append(f"{silo.name}: {type(exc).__name__}: {exc}")

        await asyncio.wait_for(asyncio.gather(*(guarded(s) for s in silos)), args.limit)


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    names = silo_names(n)
    tokens = {s: secrets.token_urlsafe(24) for s in names}
    doc = job_document(JOB, names, rounds=args.rounds, minSilos=n)
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp, aggregator(Path(tmp), doc, tokens) as agg:
        cpu0, t0, load0, own0 = cpu_seconds(agg.pid), time.monotonic(), load(), time.process_time()
        try:
            asyncio.run(federation(agg.url, tokens, args, tally))
        except TimeoutError:
            tally.errors.append(f"not finished after {args.limit:.0f}s")
        wall, cpu, own = time.monotonic() - t0, cpu_seconds(agg.pid) - cpu0, time.process_time() - own0
        admin = {"Authorization": f"Bearer {agg.admin}"}
        try:
            rounds = httpx.get(f"{agg.url}/v1/jobs/{JOB}/rounds", headers=admin, timeout=60).json()
            phase = httpx.get(f"{agg.url}/v1/jobs/{JOB}", headers=admin, timeout=60).json()["phase"]
        except httpx.HTTPError as exc:  # still saturated by the silos this run gave up on
            rounds, phase = [], f"unanswered ({type(exc).__name__})"
    durations = [r["duration_seconds"] for r in rounds if r.get("duration_seconds") is not None]
    mean_round = sum(durations) / len(durations) if durations else float("nan")
    return {
        "label": args.label, "silos": n, "rounds": len(durations), "phase": phase, "round_s": mean_round,
        "round_ms_per_silo": 1000 * mean_round / n, "wall_s": wall, "requests": tally.requests,
        "rps": tally.requests / wall, "cpu_s": cpu, "cpu_ms_per_silo_round": 1000 * cpu / (n * args.rounds),
        "silos_cpu_pct": 100 * own / wall, "aggregator_cpu_pct": 100 * cpu / wall,
        "retries": tally.retries, "errors": len(tally.errors), "load": load0,
        "first_error": tally.errors[0] if tally.errors else "",
    }  # fmt: skip


HEADER = (
    "| code | silos | rounds done | phase | mean round s | round ms per silo | wall s | requests | requests/s | "
    "aggregator CPU s | CPU ms per silo-round | aggregator busy, % core | scripted silos busy, % core | "
    "retries | errors | load at start 1/5/15 |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict[str, Any]) -> str:
    return (
        f"| {r['label']} | {r['silos']:,} | {r['rounds']} | {r['phase']} | {r['round_s']:.2f} | "
        f"{r['round_ms_per_silo']:.1f} | {r['wall_s']:.1f} | {r['requests']:,} | {r['rps']:.0f} | {r['cpu_s']:.1f} | "
        f"{r['cpu_ms_per_silo_round']:.1f} | {r['aggregator_cpu_pct']:.0f} | {r['silos_cpu_pct']:.0f} | "
        f"{r['retries']} | {r['errors']} | {r['load']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--silos", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-poll", type=float, default=DEFAULTS.long_poll_seconds)
    parser.add_argument("--poll", type=float, default=DEFAULTS.poll_seconds)
    parser.add_argument("--limit", type=float, default=900.0, help="give up on one federation after this long")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--json", type=Path, help="also append each result to this JSON-lines file")
    args = parser.parse_args()
    results = []
    for n in args.silos:
        result = run_size(n, args)
        results.append(result)
        print(row(result), file=sys.stderr, flush=True)
        if result["first_error"]:
            print(f"  first error: {result['first_error']}", file=sys.stderr)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(result) + "\n")
    print(HEADER)
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()
