"""Turn a finished job's round history into rows, a CSV, a rich table and a PNG plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsilo.api.models import RoundInfo
from fedsilo.local.runs import write_text

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
    """rounds.csv, replaced atomically (a run rewrites it after every round)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table:
        writer.writerow({k: row.get(k) for k in COLUMNS})
    write_text(path, out.getvalue())


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rich_table(table: list[dict[str, Any]], title: str) -> Table:
    """The per-round table; accuracy and loss say which split they are (a split column when rows differ)."""
    splits = {row.get("split") for row in table if row.get("split")}
    one = splits.pop() if len(splits) == 1 else None
    caption = f"{one}: {SPLITS[one][1]}; train s: the slowest silo's training" if one in SPLITS else None
    out = Table(title=title, caption=caption)
    names = ["round"] + ([] if one or not splits else ["split"])
    names += [f"{one} acc" if one else "accuracy", f"{one} loss" if one else "loss"]
    names += ["round s", "train s", "overhead", "bytes/silo"]
    for name in names:
        out.add_column(name, justify="right")
    for row in table:
        overhead = row.get("overhead_seconds")
        seconds = row.get("round_seconds")
        pct = f"{overhead:.1f}s {100 * overhead / seconds:.1f}%" if overhead is not None and seconds else "-"
        cells = [str(row["round"])] + ([] if one or not splits else [row.get("split") or "-"])
        cells += [_fmt(row.get("accuracy"), ".4f"), _fmt(row.get("loss"), ".4f"), _fmt(seconds, ".1f"),
                  _fmt(row.get("max_train_seconds"), ".1f"), pct, _fmt(row.get("bytes_per_silo"), ",")]
        out.add_row(*cells)
    return out


SPLITS = {
    "test": ("test", "evaluator's held-out data"),
    "validation": ("validation", "mean of the trainer silos' validation rows"),
}


def plot(table: list[dict[str, Any]], path: Path, title: str) -> None:
    """rounds.png (replaced atomically)."""
    fig = figure(table, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def figure(table: list[dict[str, Any]], title: str) -> Any:
    """Loss (left axis) and accuracy (right axis) per round, one line per split, every line in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax2 = None
    handles = []
    splits = [s for s in SPLITS if any(r.get("split") == s for r in table)]
    for split, (loss_style, acc_style) in zip(splits, (("o-", "s-"), ("o--", "s--")), strict=False):
        name = SPLITS[split][0]
        points = [r for r in table if r.get("split") == split and r.get("loss") is not None]
        handles += ax.plot([r["round"] for r in points], [r["loss"] for r in points], loss_style, color="tab:red",
                           label=f"{name} loss")
        accs = [r for r in points if r.get("accuracy") is not None]
        if accs:
            ax2 = ax2 or ax.twinx()
            handles += ax2.plot([r["round"] for r in accs], [r["accuracy"] for r in accs], acc_style,
                                color="tab:blue", label=f"{name} accuracy")
    ax.set_xlabel("round (0: untrained starting adapter)")
    ax.set_ylabel("loss", color="tab:red")
    if ax2 is not None:
        ax2.set_ylabel("accuracy", color="tab:blue")
    if handles:
        ax.legend(handles=handles, loc="best", fontsize="small")
    where = "; ".join(f"{SPLITS[s][0]}: {SPLITS[s][1]}" for s in splits)
    ax.set_title(f"{title}\n{where}" if where else title, fontsize="medium")
    ax.set_xticks([r["round"] for r in table])
    fig.tight_layout()
    return fig
