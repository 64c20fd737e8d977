"""Turn a finished job's round history into rows, a CSV, a rich table and a PNG plot."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsilo.api.models import RoundInfo

COLUMNS = [
    "round",
    "split",
    "accuracy",
    "loss",
    "round_seconds",
    "max_train_seconds",
    "overhead_seconds",
    "aggregation_seconds",
    "updates",
    "bytes_up",
    "bytes_per_silo",
]


def rows(history: list[RoundInfo], evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row 0 is the untrained starting adapter; row r is the global adapter after round r."""
    by_version = {e["version"]: e for e in evaluations}
    out = []
    base = by_version.get(0)
    out.append(
        {
            "round": 0,
            "split": base["split"] if base else None,
            "accuracy": base["accuracy"] if base else None,
            "loss": base["loss"] if base else None,
        }
    )
    for r in history:
        ev = by_version.get(r.round)
        overhead = (
            r.duration_seconds - r.max_train_seconds
            if r.duration_seconds is not None and r.max_train_seconds is not None
            else None
        )
        out.append(
            {
                "round": r.round,
                "split": ev["split"] if ev else None,
                "accuracy": ev["accuracy"] if ev else None,
                "loss": ev["loss"] if ev else None,
                "round_seconds": r.duration_seconds,
                "max_train_seconds": r.max_train_seconds,
                "overhead_seconds": overhead,
                "aggregation_seconds": r.aggregation_seconds,
                "updates": r.updates,
                "bytes_up": r.bytes_received,
                "bytes_per_silo": r.bytes_received // r.updates if r.updates else None,
            }
        )
    return out


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow({k: row.get(k) for k in COLUMNS})


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rich_table(table: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title)
    for name in ("round", "accuracy", "loss", "seconds", "train s (max)", "overhead", "bytes up / silo"):
        out.add_column(name, justify="right")
    for row in table:
        overhead = row.get("overhead_seconds")
        seconds = row.get("round_seconds")
        pct = f"{overhead:.1f}s ({100 * overhead / seconds:.1f}%)" if overhead is not None and seconds else "-"
        out.add_row(
            str(row["round"]),
            _fmt(row.get("accuracy"), ".4f"),
            _fmt(row.get("loss"), ".4f"),
            _fmt(seconds, ".1f"),
            _fmt(row.get("max_train_seconds"), ".1f"),
            pct,
            _fmt(row.get("bytes_per_silo"), ","),
        )
    return out


def plot(table: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in table if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, [r["loss"] for r in table if r.get("loss") is not None], "o-", color="tab:red", label="loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss", color="tab:red")
    accs = [(r["round"], r["accuracy"]) for r in table if r.get("accuracy") is not None]
    if accs:
        ax2 = ax.twinx()
        ax2.plot([a[0] for a in accs], [a[1] for a in accs], "s-", color="tab:blue", label="accuracy")
        ax2.set_ylabel("accuracy", color="tab:blue")
    ax.set_title(title)
    ax.set_xticks(rounds)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
