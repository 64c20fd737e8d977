"""`fedsilo status` and `fedsilo pull`: a running aggregator seen from the user's machine.

Both speak the `/v1` API with the job's admin token, to any aggregator URL: a local run's,
one behind an Ingress, or `kubectl port-forward svc/<job>-aggregator 8080:http`. `pull`
writes the same run folder a local run writes (adapter with model card, rounds.csv,
rounds.png, job.json), so a cluster user takes home the same artefact as a local user.
A local run folder answers `status` too: live while its runner lives, else from its files.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedsilo.api.client import Client, ClientError
from fedsilo.api.models import JobStatus, RoundInfo
from fedsilo.local import card, progress, report, runs
from fedsilo.local.results import Results

HINT_401 = ("use the job's admin token; in a cluster: kubectl -n <namespace> get secret <job>-tokens "
            "-o jsonpath='{.data.admin-token}' | base64 -d")


class RemoteError(RuntimeError):
    """The aggregator cannot be reached or refuses; the message says what to do."""


@dataclass(frozen=True)
class Target:
    """One job on one aggregator, and the admin token to read it."""

    url: str
    job: str
    token: str
    ca_bundle: Path | None = None
    server_name: str | None = None  # the certificate's name when the URL is a port-forward

    def client(self) -> Client:
        return Client(self.url, self.job, self.token, retries=2, timeout=60.0, ca_bundle=self.ca_bundle,
                      server_name=self.server_name, backoff_cap=2.0)


@dataclass(frozen=True)
class Snapshot:
    status: JobStatus
    history: list[RoundInfo]
    evaluations: list[dict[str, Any]]


def _explain(target: Target, exc: Exception) -> RemoteError:
    if isinstance(exc, httpx.TransportError):
        return RemoteError(f"cannot reach the aggregator at {target.url}: {exc or type(exc).__name__} "
                           "(is the URL right, is `kubectl port-forward` still running?)")
    assert isinstance(exc, ClientError)
    if exc.status == 401:
        return RemoteError(f"the aggregator refused the token (HTTP 401): {HINT_401}")
    if exc.status == 404:
        return RemoteError(f"{target.url}: {exc.detail}")
    return RemoteError(f"{target.url}: {exc}")


def snapshot(target: Target) -> Snapshot:
    """Status, round history and evaluations of the job, read once."""
    client = target.client()
    try:
        return Snapshot(client.status(), client.rounds(), client.evaluations())
    except (httpx.TransportError, ClientError) as exc:
        raise _explain(target, exc) from None
    finally:
        client.close()


def pull(target: Target, out: Path, version: int | None = None) -> Results:
    """Write runs/<job>/<UTC now>/ (and `latest`) with adapter `version` (default: the newest) and its card."""
    client = target.client()
    try:
        job = client.spec()
        status = client.status()
        newest = status.version
        if version is None and newest < 1:
            raise RemoteError(f"job {target.job} has no trained global adapter yet ({status.phase}, round "
                              f"{status.round}/{status.rounds}); pass --version 0 for the untrained starting one")
        if version is not None and not 0 <= version <= newest:
            raise RemoteError(f"job {target.job} has global adapter versions 0-{newest}, not {version}")
        run_dir = runs.new_run_dir(out.resolve(), job.metadata.name)
        source = {"kind": "pull", "url": target.url, "phase": status.phase}
        record = runs.RunRecord(job.metadata.name, "pulled", runs.now().isoformat(timespec="seconds"),
                                job.spec.training.rounds, source=source)
        results = Results(run_dir, job, record)
        results.refresh(client, version=newest if version is None else version)
        results.write("pulled", status.message, plot=True)
        return results
    except (httpx.TransportError, ClientError) as exc:
        raise _explain(target, exc) from None
    finally:
        client.close()


def render(snap: Snapshot, has_evaluator: bool) -> RenderableType:
    """The status view: where the job stands, its newest score, privacy, silos, and the round table."""
    status = snap.status
    current = next((r for r in snap.history if r.round == status.round), None)
    score = progress.latest_score(snap.evaluations, has_evaluator)
    evaluating = [s.name for s in status.silos if s.state == "evaluating"]
    head = Text.assemble((status.name, "bold"), "  ", (status.phase, _colour(status.phase)),
                         f"  {progress.phase(status, current, evaluating)}  ·  global version {status.version}")
    lines: list[RenderableType] = [head]
    if score is not None:
        lines.append(Text(score.describe()))
    lines.append(Text(f"privacy: {card.privacy_sentence(status.privacy.model_dump())}"))
    silos = Table(box=None, pad_edge=False, show_edge=False)
    for name in ("silo", "role", "state", "rounds", "last seen"):
        silos.add_column(name)
    for s in status.silos:
        seen = s.last_seen.strftime("%Y-%m-%d %H:%M:%S UTC") if s.last_seen else "never"
        silos.add_row(s.name, s.role, s.state, str(s.rounds_completed), seen)
    lines += [silos, report.rich_table(report.rows(snap.history, snap.evaluations), f"{status.name}: rounds")]
    return Group(*lines)


def _colour(phase: str) -> str:
    return {"Succeeded": "green", "Failed": "red", "Running": "cyan"}.get(phase, "yellow")


def local_target(run_dir: Path) -> Target | None:
    """The live aggregator of a local run that is still going, or None."""
    record = runs.RunRecord.load(run_dir)
    url, pid = record.source.get("aggregator_url"), record.source.get("runner_pid")
    token_file = run_dir / "state" / "admin-token"
    if record.outcome != "running" or not url or not pid or not token_file.is_file() or not _alive(int(pid)):
        return None
    ca = record.source.get("ca_bundle")
    return Target(str(url), record.job, token_file.read_text().strip(), Path(ca) if ca else None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def saved_rows(run_dir: Path) -> list[dict[str, Any]]:
    """rounds.csv back as typed rows (numbers as numbers, empty cells as None)."""
    path = run_dir / "rounds.csv"
    if not path.is_file():
        return []
    return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(path.open())]


def _number(value: str) -> Any:
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def render_saved(run_dir: Path) -> RenderableType:
    """A finished (or abandoned) local run or pull, from its files."""
    record = runs.RunRecord.load(run_dir)
    outcome: str = record.outcome
    if outcome == "running":
        outcome = "running? its runner is gone: the run ended without recording how (killed?)"
    version = record.adapter_version if record.adapter_version is not None else "-"
    head = Text.assemble((record.job, "bold"), f"  {outcome}", f"  ·  {record.rounds_completed}/{record.rounds} rounds"
                         f"  ·  adapter version {version}")
    lines: list[RenderableType] = [head, Text(f"folder {run_dir}  (started {record.started_at}, "
                                              f"finished {record.finished_at or '-'})")]
    if record.message:
        lines.append(Text(record.message))
    rows = saved_rows(run_dir)
    if rows:
        lines.append(report.rich_table(rows, f"{record.job}: rounds"))
    return Group(*lines)
