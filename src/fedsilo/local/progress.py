"""The live progress line of `fedsilo run`: what is really running, and scores kept apart.

- The phase comes from the round that is open (training: k of n updates in; aggregating),
  and after the last round from the silo processes still evaluating: a job whose rounds are
  over says so, and names who is still evaluating, until every silo has finished.
- Test accuracy (the evaluator silos' held-out data) and validation accuracy (the trainer
  silos' own held-out rows) are different numbers and never share a label: a job with an
  evaluator shows test scores only; a job without one shows the silos' validation mean.
- The line is cut to the terminal's width, least important part first, never wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from fedsilo.api.models import JobStatus, RoundInfo

SEPARATOR = " · "


@dataclass(frozen=True)
class Score:
    """The newest score of one split: which global version, on which data."""

    split: str
    version: int
    accuracy: float | None
    loss: float

    def describe(self) -> str:
        name = "test" if self.split == "test" else "validation"
        value = (f"{name} acc {self.accuracy:.3f}" if self.accuracy is not None
                 else f"{name} loss {self.loss:.3f}")
        source = "evaluator" if self.split == "test" else "silo mean"
        return f"{value} (v{self.version}, {source})"


def latest_score(evaluations: Sequence[dict[str, Any]], has_evaluator: bool) -> Score | None:
    """The newest version scored on test data (jobs with an evaluator) or on validation data (without)."""
    wanted = "test" if has_evaluator else "validation"
    scored = [e for e in evaluations if e.get("split") == wanted]
    if not scored:
        return None
    e = max(scored, key=lambda x: x["version"])
    return Score(wanted, int(e["version"]), e.get("accuracy"), float(e["loss"]))


def phase(status: JobStatus, current: RoundInfo | None, busy: Sequence[str]) -> str:
    """What the job is doing now, in words. `busy`: silo processes that have not finished yet."""
    if status.phase == "Pending":
        joined = sum(1 for s in status.silos if s.joined)
        return f"waiting for silos to join ({joined}/{len(status.silos)})"
    if status.phase == "Failed":
        return f"failed: {status.message}" if status.message else "failed"
    if status.phase == "Succeeded":
        if busy:
            return f"{status.rounds} rounds done; final evaluation by {', '.join(busy)}"
        return f"{status.rounds} rounds done"
    if current is None or current.round != status.round:
        return f"round {status.round}/{status.rounds}: starting"
    if current.state == "aggregating":
        return f"round {current.round}/{status.rounds}: aggregating {current.updates} updates"
    if current.state == "closed":
        return f"round {current.round}/{status.rounds}: closed"
    return f"round {current.round}/{status.rounds}: training, {current.updates}/{len(current.participants)} updates in"


def silo_states(status: JobStatus) -> str:
    return " ".join(f"{s.name}:{s.state}" for s in status.silos)


def fit(parts: Sequence[str], width: int) -> str:
    """Join `parts` (most important first) while they fit in `width`; the first is cut if it must be."""
    out = ""
    for part in parts:
        candidate = part if not out else out + SEPARATOR + part
        if len(candidate) <= width:
            out = candidate
        elif not out:
            return part[: max(width - 1, 0)] + "…" if width > 1 else part[:width]
        else:
            break
    return out


def elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def parts(
    status: JobStatus,
    history: Sequence[RoundInfo],
    evaluations: Sequence[dict[str, Any]],
    *,
    has_evaluator: bool,
    busy: Sequence[str] = (),
) -> tuple[str, str, str]:
    """(phase, score, silo states): the progress line's parts, most important first."""
    current = next((r for r in history if r.round == status.round), None)
    score = latest_score(evaluations, has_evaluator)
    shown = score.describe() if score else ("test acc -" if has_evaluator else "validation acc -")
    return phase(status, current, busy), shown, silo_states(status)


def line(phase_: str, score: str, silos: str, seconds: float, width: int) -> str:
    """The whole progress line, at most `width` characters: elapsed time and phase, score, silo states."""
    return fit([f"{elapsed(seconds)}  {phase_}", score, silos], width)


class Display:
    """Shows progress lines: one live line on a terminal; on a pipe or a file, a line per change."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Live | None = None
        self.last = ""

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    @property
    def width(self) -> int:
        return max(20, self.console.width - 1)

    def show(self, text: str, what: str) -> None:
        """`text` on the live line; without a terminal it is printed when `what` (the news in it) changes."""
        if self.live is not None:
            self.live.update(Text(text, no_wrap=True, overflow="ellipsis"))
        elif what != self.last:
            self.console.print(Text(text), soft_wrap=True)
        self.last = what
