"""Round overhead of the real system: round wall time minus the slowest silo's training.

Runs a FederatedJob (default: the quickstart) with the local runner — real processes,
real HTTP, real training — and prints, per round, the round time, the slowest silo's
training time and the difference (download + upload + validation + aggregation + waits).

    python benchmarks/round_overhead.py [examples/quickstart.yaml]
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

from fedsilo.local.runner import run_local
from fedsilo.spec import load_job


def main() -> None:
    job_file = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/quickstart.yaml").resolve()
    job = load_job(job_file)
    with tempfile.TemporaryDirectory() as out:
        started = time.monotonic()
        if run_local(job, job_file.parent, Path(out)) != 0:
            raise SystemExit("the run failed")
        wall = time.monotonic() - started
        table = Path(out) / job.metadata.name / "latest" / "rounds.csv"
        rows = [r for r in csv.DictReader(table.open()) if r["round_seconds"]]
    print(f"\n{job.metadata.name}: {len(job.spec.silos)} silos, wall time {wall:.0f}s\n")
    print("| round | round s | slowest silo training s | overhead s | overhead % | bytes up per silo |")
    print("|---|---|---|---|---|---|")
    total_round = total_over = 0.0
    for r in rows:
        seconds, train = float(r["round_seconds"]), float(r["max_train_seconds"])
        total_round += seconds
        total_over += seconds - train
        print(
            f"| {r['round']} | {seconds:.1f} | {train:.1f} | {seconds - train:.1f} | "
            f"{100 * (seconds - train) / seconds:.1f} | {int(r['bytes_per_silo']):,} |"
        )
    print(f"| all | {total_round:.1f} | | {total_over:.1f} | {100 * total_over / total_round:.1f} | |")


if __name__ == "__main__":
    main()
