"""What idle silos cost the aggregator: N silos long-polling their task while a round waits.

A real aggregator process (SQLite in a temp dir, plain HTTP on loopback, see `harness.py`) serves
one job of N + 1 silos, `fraction` set so that round 1 samples a single silo, which never uploads:
the round stays open and the other N silos have nothing to do. They poll as the silo agent does
(`Agent.run`: `GET .../task?wait=<long_poll_seconds>`, then at least `poll_seconds` between two
polls, both the agent's defaults from `silo_agent/settings.py`), from `--clients` separate client
processes (asyncio + httpx, one keep-alive connection per silo as N agent processes would hold; a
single process with 1,000 connections polls about 10 s late each time), their first polls spread
over one long-poll period as independently started agents' would be.

Measured, after the spread and a settling pause, over `--seconds`:
- the aggregator's CPU (utime + stime of its process, /proc) as % of one core, and at rest
  (before the pollers start) for comparison;
- requests/s answered, and the mean time a poll took (wait plus the trip);
- the CPU the agents' own cadence would cost: at rest plus, per silo, one request every
  `wait + poll` seconds at the measured CPU per request. The client process cannot always keep
  that cadence on a loaded machine (its polls take longer than `wait`); this column does not
  depend on how fast it managed to poll;
- then one change: the sampled silo uploads, the round closes and the job succeeds, so every
  waiter's next answer is `done`; latency = from the upload's 200 to each silo holding `done`
  (p50 / p99 / max over the N silos).

    python benchmarks/polling.py                     # 1,000 silos, 60 s window, ~2.5 min
    PYTHONPATH=/work/main/src python benchmarks/polling.py --label main
    python benchmarks/polling.py --silos 100 --seconds 20
    python benchmarks/polling.py --clients 1           # one client process (lags at 1,000 silos)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from harness import Aggregator, aggregator, cpu_seconds, job_document, load, percentile, silo_names

from fedsilo.adapters import sha256, to_bytes
from fedsilo.silo_agent.settings import SiloSettings

JOB = "bench-poll"
DEFAULTS = SiloSettings(aggregator_url="http://x", job="x", silo="x", token="x" * 16)


def tiny_adapter() -> bytes:
    return to_bytes({"m.lora_A.weight": torch.zeros(4, 8), "classifier.weight": torch.zeros(2, 8)})


def headers(silo: str, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Fedsilo-Silo": silo}


def set_up(agg: Aggregator, tokens: dict[str, str]) -> str:
    """Every silo joins, one sends the initial adapter; round 1 opens. Returns its one participant."""
    with httpx.Client(base_url=agg.url, timeout=60) as http:

        def join(silo: str) -> None:
            body = {"n_train_examples": 100, "n_eval_examples": 0}
            path = f"/v1/jobs/{JOB}/silos/{silo}/join"
            http.post(path, json=body, headers=headers(silo, tokens[silo])).raise_for_status()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(join, tokens))
        first = next(iter(tokens))
        http.put(
            f"/v1/jobs/{JOB}/silos/{first}/adapters/0", content=tiny_adapter(), headers=headers(first, tokens[first])
        ).raise_for_status()
        admin = {"Authorization": f"Bearer {agg.admin}"}
        deadline = time.monotonic() + 60
        while not (rounds := http.get(f"/v1/jobs/{JOB}/rounds", headers=admin).json()):
            assert time.monotonic() < deadline, "round 1 did not open"
            time.sleep(0.2)
        (participant,) = rounds[0]["participants"]
        return str(participant)


def upload(agg: Aggregator, silo: str, token: str) -> None:
    data = to_bytes({"m.lora_A.weight": torch.ones(4, 8), "classifier.weight": torch.ones(2, 8)})
    h = {**headers(silo, token), "X-Fedsilo-Examples": "100", "X-Fedsilo-Sha256": sha256(data)}
    path = f"{agg.url}/v1/jobs/{JOB}/rounds/1/updates/{silo}"
    httpx.put(path, content=data, headers=h, timeout=60).raise_for_status()


# ---- the pollers (their own process) ----------------------------------------------------------


async def poll_one(
    http: httpx.AsyncClient, silo: str, token: str, start: float, args: argparse.Namespace, log: dict[str, Any]
) -> None:
    """`Agent.run`'s idle loop: long-poll, pace, until the answer is not `wait`."""
    await asyncio.sleep(start)
    while True:
        asked = time.time()
        try:
            r = await http.get(
                f"/v1/jobs/{JOB}/silos/{silo}/task", params={"wait": f"{args.wait:g}"}, headers=headers(silo, token)
            )
            r.raise_for_status()
            action = r.json()["action"]
        except httpx.HTTPError:
            log["errors"] += 1
            await asyncio.sleep(1.0)
            continue
        log["requests"].append((asked, time.time()))
        if action != "wait":
            log["done"][silo] = time.time()
            return
        await asyncio.sleep(max(0.0, args.poll - (time.time() - asked)))


async def pollers(args: argparse.Namespace) -> None:
    tokens: dict[str, str] = json.loads(Path(args.tokens).read_text())
    log: dict[str, Any] = {"requests": [], "done": {}, "errors": 0}
    limits = httpx.Limits(max_connections=len(tokens) + 16, max_keepalive_connections=len(tokens) + 16)
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=args.wait + 60) as http:
        tasks = [poll_one(http, s, t, rng.uniform(0, args.wait), args, log) for s, t in tokens.items()]
        with contextlib.suppress(TimeoutError):  # silos still polling then: reported as not reached
            await asyncio.wait_for(asyncio.gather(*tasks), args.limit)
    Path(args.out).write_text(json.dumps(log))


# ---- the measurement ------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    names = silo_names(args.silos + 1)
    tokens = {s: secrets.token_urlsafe(24) for s in names}
    fraction = 1 / len(names)
    doc = job_document(JOB, names, rounds=1, fraction=fraction)
    with tempfile.TemporaryDirectory() as tmp, aggregator(Path(tmp), doc, tokens) as agg:
        straggler = set_up(agg, tokens)
        idle = sorted((s, t) for s, t in tokens.items() if s != straggler)
        for k in range(args.clients):  # one token file per client process
            (Path(tmp) / f"idle-{k}.json").write_text(json.dumps(dict(idle[k :: args.clients])))
        print(f"aggregator pid {agg.pid}: {len(tokens)} silos joined, round 1 open", file=sys.stderr, flush=True)
        cpu0, t0 = cpu_seconds(agg.pid), time.time()
        time.sleep(args.rest)
        rest = (cpu_seconds(agg.pid) - cpu0) / (time.time() - t0)
        settle = args.wait + 5
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "poll", "--url", agg.url, "--tokens", str(Path(tmp) / f"idle-{k}.json"),
                 "--wait", str(args.wait), "--poll", str(args.poll), "--out", str(Path(tmp) / f"polls-{k}.json"),
                 "--limit", str(settle + args.seconds + 120)]
            )
            for k in range(args.clients)
        ]
        print("pollers started", file=sys.stderr, flush=True)
        time.sleep(settle)
        cpu0, client0, t0 = cpu_seconds(agg.pid), sum(cpu_seconds(c.pid) for c in children), time.time()
        time.sleep(args.seconds)
        cpu, t1 = cpu_seconds(agg.pid) - cpu0, time.time()
        client = sum(cpu_seconds(c.pid) for c in children) - client0
        upload(agg, straggler, tokens[straggler])
        changed = time.time()
        log: dict[str, Any] = {"requests": [], "done": {}, "errors": 0}
        for k, child in enumerate(children):
            child.wait()
            part = json.loads((Path(tmp) / f"polls-{k}.json").read_text())
            log["requests"] += part["requests"]
            log["done"].update(part["done"])
            log["errors"] += part["errors"]
    window = [(start, end) for start, end in log["requests"] if t0 <= end < t1]
    served = [end for _, end in window]
    marginal_ms = 1000 * max(0.0, cpu - rest * (t1 - t0)) / max(1, len(served))  # a request, above the rest
    latencies = [done - changed for done in log["done"].values()]
    return {
        "label": args.label,
        "silos": args.silos,
        "clients": args.clients,
        "wait": args.wait,
        "poll": args.poll,
        "seconds": t1 - t0,
        "rest_cpu_pct": 100 * rest,
        "cpu_pct": 100 * cpu / (t1 - t0),
        "rps": len(served) / (t1 - t0),
        "ms_per_request": 1000 * cpu / max(1, len(served)),
        "poll_seconds": sum(end - start for start, end in window) / max(1, len(window)),
        "cadence_cpu_pct": 100 * rest + 100 * marginal_ms / 1000 * args.silos / (args.wait + args.poll),
        "client_cpu_pct": 100 * client / (t1 - t0),
        "reached": len(latencies),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
        "errors": log["errors"],
        "load": load(),
    }


def row(r: dict[str, Any]) -> str:
    return (
        f"| {r['label']} | {r['silos']:,} | {r['rest_cpu_pct']:.1f} | {r['cpu_pct']:.1f} | {r['rps']:.1f} | "
        f"{r['ms_per_request']:.2f} | {r['poll_seconds']:.1f} | {r['cadence_cpu_pct']:.1f} | "
        f"{r['client_cpu_pct']:.0f} | "
        f"{r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | {r['reached']:,} | {r['errors']} | {r['load']} |"
    )


HEADER = (
    "| code | idle silos | aggregator CPU at rest, % core | aggregator CPU while polled, % core | requests/s | "
    "aggregator CPU ms per request | mean poll s | at the agents' cadence, % core | pollers' CPU, % core | "
    "change -> silos p50 s | p99 s | max s | silos reached | errors | load 1/5/15 min |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    poll = sub.add_parser("poll", help="(internal) the pollers' process")
    for p in (parser, poll):
        p.add_argument("--wait", type=float, default=DEFAULTS.long_poll_seconds, help="long-poll seconds")
        p.add_argument("--poll", type=float, default=DEFAULTS.poll_seconds, help="least seconds between polls")
    poll.add_argument("--url", required=True)
    poll.add_argument("--tokens", required=True)
    poll.add_argument("--out", required=True)
    poll.add_argument("--limit", type=float, required=True)
    parser.add_argument("--silos", type=int, default=1000, help="idle silos polling")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--rest", type=float, default=10.0, help="seconds measured before the pollers start")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes the silos are spread over (one with 1,000 connections lags)")
    parser.add_argument("--json", type=Path, help="also append the result to this JSON-lines file")
    args = parser.parse_args()
    if args.cmd == "poll":
        asyncio.run(pollers(args))
        return
    result = measure(args)
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")
    print(HEADER)
    print(row(result))


if __name__ == "__main__":
    main()
