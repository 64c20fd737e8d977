"""The label-skew decision table (issue 12): mean +- std over seeds of what strategies.py recorded.

`strategies.py --jsonl FILE` appends one JSON object per finished run (task, seed, alpha,
strategy, test accuracy after every round). This groups the runs by task, alpha and strategy:

    python benchmarks/skew_table.py benchmarks/results/label-skew.jsonl \\
        --out benchmarks/results/label-skew.md

Per group: the seeds present, final and best test accuracy as mean +- sample std, the rounds each
seed needed to reach each target ("-": not within the run), and the difference to fedavg's mean
at the same alpha (the same seeds only, so a missing seed never flatters either side).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BASELINE = "fedavg"


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def alpha_order(alpha: str) -> float:
    if alpha == "pooled":
        return math.inf
    return 1e9 if alpha == "IID" else float(alpha)


def rounds_to(curve: list[float], target: float) -> str:
    return next((str(i + 1) for i, acc in enumerate(curve) if acc >= target), "-")


def load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    runs = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    latest = {(r["task"], r["seed"], r["alpha"], r["strategy"]): r for r in runs}  # a rerun replaces its row
    return list(latest.values())


def table(runs: list[dict[str, Any]], targets: Sequence[float]) -> list[str]:
    groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in runs:
        groups[(r["task"], r["alpha"], r["strategy"])][r["seed"]] = r
    reach = "".join(f" rounds to {t:.2f} (per seed) |" for t in targets)
    lines = [f"| task | alpha | strategy | seeds | final test acc | best test acc | vs {BASELINE} (final) |{reach}",
             "|---|---|---|---|---|---|---|" + "---|" * len(targets)]
    order = sorted(groups, key=lambda k: (k[0], alpha_order(k[1]), k[2]))
    for task, alpha, strategy in order:
        by_seed = groups[(task, alpha, strategy)]
        seeds = sorted(by_seed)
        finals = [by_seed[s]["curve"][-1] for s in seeds]
        per_round = all(by_seed[s]["per_round"] for s in seeds)
        best = mean_std([max(by_seed[s]["curve"]) for s in seeds]) if per_round else "n/a"
        base = groups.get((task, alpha, BASELINE), {})
        shared = [s for s in seeds if s in base]
        if strategy != BASELINE and shared:
            diff = statistics.mean(by_seed[s]["curve"][-1] - base[s]["curve"][-1] for s in shared)
            versus = f"{diff:+.3f} ({len(shared)} seed{'s' if len(shared) > 1 else ''})"
        else:
            versus = ""
        reached = "".join(
            f" {', '.join(rounds_to(by_seed[s]['curve'], t) for s in seeds) if per_round else 'n/a'} |"
            for t in targets)
        lines.append(f"| {task} | {alpha} | {strategy} | {', '.join(map(str, seeds))} | {mean_std(finals)} "
                     f"| {best} | {versus} |{reached}")
    return lines


def curves(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| task | alpha | strategy | seed | test accuracy after round 1, 2, ... |", "|---|---|---|---|---|"]
    ordered = sorted(runs, key=lambda r: (r["task"], alpha_order(r["alpha"]), r["strategy"], r["seed"]))
    lines += [f"| {r['task']} | {r['alpha']} | {r['strategy']} | {r['seed']} | "
              f"{' '.join(f'{a:.3f}' for a in r['curve'])} |" for r in ordered if r["per_round"]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", type=Path, nargs="+")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.70, 0.75])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = load(args.jsonl)
    settings = sorted({r["settings"].split("; seed ")[0] for r in runs})
    text = "\n".join([
        "# Label skew: strategies x Dirichlet alpha x seeds (benchmarks/skew_table.py)", "",
        f"From: {', '.join(str(p) for p in args.jsonl)} ({len(runs)} runs).", "",
        *[f"Settings: {s}." for s in settings], "",
        *table(runs, args.targets), "",
        "Test accuracy per round:", "", *curves(runs), "",
    ])
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
