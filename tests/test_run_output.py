"""What a run shows and keeps, without training: run folders, the progress line, the plot, the card, the logs."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import job_document

from fedsilo.api.models import JobStatus, PrivacyStatus, RoundInfo, SiloStatus
from fedsilo.local import card, progress, report, runs
from fedsilo.logfmt import Logfmt, event, quote
from fedsilo.silo_agent.quiet import LoadReportFilter
from fedsilo.spec import parse_job

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _status(phase: str = "Running", round_: int = 2, version: int = 1, **kw: Any) -> JobStatus:
    silos = [SiloStatus(name=n, role=r, state="training", joined=True, last_seen=NOW, rounds_completed=1)
             for n, r in (("alpha", "trainer"), ("beta", "trainer"), ("audit", "evaluator"))]
    return JobStatus(name="demo", phase=phase, round=round_, rounds=3, version=version, accuracy=None, loss=None,
                     silos=silos, created_at=NOW, started_at=NOW, finished_at=None, **kw)  # type: ignore[arg-type]


def _round(number: int, state: str = "closed", updates: int = 2) -> RoundInfo:
    return RoundInfo(round=number, state=state, participants=["alpha", "beta"], updates=updates, examples=100,
                     bytes_received=2000, opened_at=NOW, closed_at=NOW + timedelta(seconds=10),
                     duration_seconds=10.0, aggregation_seconds=0.01, max_train_seconds=9.5, accuracy=None,
                     loss=None, split=None)  # type: ignore[arg-type]


EVALUATIONS = [  # version 1: the evaluator's test score; version 2: only the silos' validation so far
    {"version": 0, "split": "test", "accuracy": 0.5, "loss": 0.70},
    {"version": 1, "split": "test", "accuracy": 0.655, "loss": 0.66},
    {"version": 2, "split": "validation", "accuracy": 0.760, "loss": 0.55},
]


# ---- run folders ---------------------------------------------------------------------------


def test_every_run_gets_its_own_folder_and_latest_follows_the_newest(tmp_path: Path) -> None:
    first = runs.new_run_dir(tmp_path, "demo", NOW)
    (first / "keep.txt").write_text("results of the first run")
    second = runs.new_run_dir(tmp_path, "demo", NOW)  # same second: a suffix, never the same folder
    assert first.name == "20260102T030405Z" and second.name == "20260102T030405Z-2"
    assert (first / "keep.txt").read_text() == "results of the first run"
    assert (tmp_path / "demo" / "latest").resolve() == second.resolve()
    assert not (tmp_path / "demo" / "latest").readlink().is_absolute()  # the runs folder can move
    runs.RunRecord("demo", "running", NOW.isoformat(), 3).save(second)
    assert runs.resolve(tmp_path / "demo") == second.resolve()
    with pytest.raises(runs.RunsError, match="not a run folder"):
        runs.resolve(first)


# ---- progress line -------------------------------------------------------------------------


def test_progress_keeps_test_accuracy_apart_from_silo_validation() -> None:
    status = _status()
    history = [_round(1), _round(2, "open", updates=1)]
    phase, score, _silos = progress.parts(status, history, EVALUATIONS, has_evaluator=True)
    assert phase == "round 2/3: training, 1/2 updates in"
    assert score == "test acc 0.655 (v1, evaluator)"  # not the silos' 0.760 for version 2
    _, score, _ = progress.parts(status, history, EVALUATIONS, has_evaluator=False)
    assert score == "validation acc 0.760 (v2, silo mean)"


def test_progress_says_who_still_evaluates_after_the_last_round() -> None:
    done = _status("Succeeded", round_=3, version=3)
    phase, _, _ = progress.parts(done, [], EVALUATIONS, has_evaluator=True, busy=["audit"])
    assert phase == "3 rounds done; final evaluation by audit"
    assert progress.parts(done, [], EVALUATIONS, has_evaluator=True)[0] == "3 rounds done"
    aggregating = progress.parts(_status(), [_round(2, "aggregating")], [], has_evaluator=True)
    assert aggregating[0] == "round 2/3: aggregating 2 updates"


@pytest.mark.parametrize("width", [20, 40, 60, 80, 200])
def test_progress_line_never_exceeds_the_terminal_width(width: int) -> None:
    phase, score, silos = progress.parts(_status(), [_round(2, "open", 1)], EVALUATIONS, has_evaluator=True)
    line = progress.line(phase, score, silos, 125.0, width)
    assert len(line) <= width and line.startswith("2:05")
    if width >= 80:
        assert "test acc 0.655" in line


# ---- plot, table, card ---------------------------------------------------------------------


def test_the_plot_has_a_legend_and_names_its_split() -> None:
    table = report.rows([_round(1), _round(2)], [*EVALUATIONS[:2], {**EVALUATIONS[1], "version": 2}])
    fig = report.figure(table, "demo: global adapter per round")
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert labels == {"test loss", "test accuracy"}
    assert "test: evaluator's held-out data" in fig.axes[0].get_title()
    rich = report.rich_table(table, "t")
    assert [c.header for c in rich.columns][1:3] == ["test acc", "test loss"]


def test_card_states_an_interrupted_run_and_privacy_as_the_aggregator_reports_it() -> None:
    job = parse_job(job_document())
    status = _status(privacy=PrivacyStatus(secure_aggregation=True, dp=True, epsilon=2.5, delta=1e-5,
                                           noise_multiplier=1.1, clip_norm=1.0))
    info = card.AdapterInfo(job=job, version=1, sha256="ab" * 32, outcome="interrupted",
                            table=report.rows([_round(1)], EVALUATIONS), status=status, saved_at=NOW.isoformat())
    text = card.render(info)
    assert text.startswith("---\nlibrary_name: peft\nbase_model: models/tiny\n")
    assert "**not final**: the run was interrupted after round 1 of 2" in text
    assert "secure aggregation on" in text and "ε = 2.5 spent at δ = 1e-05" in text
    assert "| 1 | fresh |" not in text and "| 1 | pos |" in text  # the job's own class names
    assert "alpha, beta" in text and "alpha.csv" not in text  # silo names, never their data paths
    meta = card.metadata(info)
    assert meta["id2label"] == {"0": "neg", "1": "pos"} and meta["privacy"]["epsilon"] == 2.5
    assert [r["round"] for r in meta["rounds_table"]] == [0, 1]
    json.dumps(meta)  # plain JSON


def test_card_reads_privacy_from_the_spec_when_no_status_is_known() -> None:
    job = parse_job(job_document())
    assert card.privacy(job, None)["secure_aggregation"] is False and card.privacy(job, None)["dp"] is False


# ---- logs ----------------------------------------------------------------------------------


def test_logfmt_lines_are_one_record_each_and_quote_what_needs_it(caplog: pytest.LogCaptureFixture) -> None:
    assert quote("silo-a") == "silo-a" and quote("two words") == '"two words"' and quote(None) == "-"
    assert quote('say "hi"\nbye') == '"say \\"hi\\"\\nbye"' and quote(0.123456) == "0.1235"
    logger = logging.getLogger("fedsilo.test.logfmt")
    with caplog.at_level(logging.INFO, logger="fedsilo.test.logfmt"):
        event(logger, "refused", logging.WARNING, status=401, reason="unauthorized", detail="bad token")
    line = Logfmt("aggregator").format(caplog.records[-1])
    assert "\n" not in line
    assert line.split(" ", 2)[1:] == ["level=warning",
                                     'proc=aggregator event=refused status=401 reason=unauthorized detail="bad token"']


def _report_record(rows: str) -> logging.LogRecord:
    msg = ("\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: /models/x\nKey | Status | \n"
           "---+---+-\n" + rows + "\n\nNotes:\n- MISSING:\tthose params were newly initialized")
    return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, msg, (), None)


def test_a_load_report_of_only_the_new_head_becomes_one_info_line() -> None:
    record = _report_record("classifier.bias   | \x1b[31mMISSING\x1b[0m | \nclassifier.weight | MISSING | ")
    assert LoadReportFilter().filter(record)
    assert record.levelno == logging.INFO and "\n" not in record.getMessage()
    assert record.getMessage().startswith("new classification head (classifier.bias, classifier.weight)")


def test_a_load_report_naming_other_keys_stays_a_warning() -> None:
    record = _report_record("classifier.weight | MISSING | \nencoder.layer.0.query.weight | MISSING | ")
    assert LoadReportFilter().filter(record)
    assert record.levelno == logging.WARNING and "encoder.layer.0.query.weight" in record.getMessage()
    assert "\x1b[" not in record.getMessage()
