"""The read models' database-side sums agree with the row-by-row summary they stand in for."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.aggregator import reads
from fedsilo.aggregator.store import EvaluationRow, JobRow, make_sessions

REPORT = st.tuples(
    st.sampled_from(["test", "validation"]),
    st.floats(0, 20, allow_nan=False),
    st.one_of(st.none(), st.floats(0, 1, allow_nan=False)),
    st.integers(1, 5_000),
)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_sessions(f"sqlite:///{Path(tmp_path_factory.mktemp('reads')) / 'store.db'}")


@settings(max_examples=60, deadline=None)
@given(reports=st.lists(REPORT, max_size=12))
def test_headline_is_the_summary_the_status_shows(sessions, reports) -> None:  # type: ignore[no-untyped-def]
    with sessions.begin() as s:
        s.query(JobRow).delete()
        s.add(JobRow(name="j", document={"kind": "FederatedJob"}, rounds=1))
        s.flush()
        for i, (split, loss, accuracy, n) in enumerate(reports):
            s.add(EvaluationRow(job="j", version=3, silo=f"s{i}", split=split, loss=loss, accuracy=accuracy,
                                n_examples=n, extra={}))
        s.flush()
        summary = reads.version_summary(s, "j", 3)
        headline = reads.headline(s, "j", 3)
        assert reads.latest_evaluated(s, "j") == (3 if reports else -1)
    if summary is None:
        assert headline is None
        return
    assert headline is not None
    assert headline[0] == summary["split"]
    assert headline[1] == pytest.approx(summary["loss"], rel=1e-9, abs=1e-9)
    if summary["accuracy"] is None:
        assert headline[2] is None
    else:
        assert headline[2] == pytest.approx(summary["accuracy"], rel=1e-9, abs=1e-9)
