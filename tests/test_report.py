"""The operator views: the lookback warning of ``check``, status's progress, the text table."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cdc_sync.cli import state_engine
from cdc_sync.outcomes import CycleCounts
from cdc_sync.report import lookback_warning, render_status, status_data, table
from cdc_sync.state import StateStore

M5 = timedelta(minutes=5)


@pytest.mark.parametrize(
    ("lookback", "lag", "declared", "observed", "warns"),
    [
        (M5, None, None, None, False),
        (M5, 0.0, None, 12.0, False),
        (M5, 250.0, timedelta(seconds=40), None, False),
        (M5, 250.0, timedelta(seconds=60), None, True),
        (M5, None, timedelta(minutes=6), None, True),
        (M5, 10.0, None, 295.0, True),
        (timedelta(0), 0.0, None, 0.5, True),
        (1000, 99999.0, timedelta(hours=5), 99999.0, False),  # a sequence cursor: no clock
    ],
)
def test_lookback_warning(lookback, lag, declared, observed, warns) -> None:  # type: ignore[no-untyped-def]
    """check warns exactly when lookback < replica lag + the longest write transaction."""
    assert (lookback_warning(lookback, lag, declared, observed) is not None) is warns


def test_lookback_warning_says_what_to_set() -> None:
    """The warning names the setting, the figure to exceed and the alternative mode."""
    warning = lookback_warning(timedelta(seconds=30), 12.0, timedelta(minutes=1), None)

    assert warning == (
        "lookback 30s is shorter than replica lag (12.0s) plus the longest write transaction "
        "(60.0s); raise source.lookback above 72s, or use cursor_mode xid8"
    )


def test_table_aligns_columns_and_shows_missing_values() -> None:
    """Columns are padded to their widest cell, None shows as '-', times to the second."""
    text = table(["a", "bb"], [[1, None], ["long", datetime(2026, 1, 2, 3, 4, 5, 999)]])

    assert text.splitlines() == [
        "  a     bb",
        "  1     -",
        "  long  2026-01-02 03:04:05",
    ]


def test_status_is_formatted_from_values_alone() -> None:
    """``render_status`` needs no database: a view built by hand gives the whole report."""
    from cdc_sync.rules import Position, Status
    from cdc_sync.state import Progress, RunRow, StatusView, UserStatus

    at = datetime(2026, 1, 2, 3, 4, 5)
    run = RunRow(
        7, at, at, "ok", CycleCounts(rows_read=3, synced=2), None, 1.5, None, '[1, "a"]', None
    )
    user = UserStatus(
        "a", 42, Status.FAILED, None, "h", 1, 40007, "bad email", at, at, None, None, at
    )
    progress = Progress(watermark=Position(1, "a"))
    view = StatusView("users", progress, {"synced": 2, "failed": 1}, [run], [user])

    text = render_status(view, at)

    lines = text.splitlines()
    assert lines[:2] == ["sync users", '  watermark: [1, "a"]']
    assert "  users: synced 2, retrying 0, failed 1, skipped 0, left 0 (total 3)" in lines
    assert "  7    2026-01-02 03:04:05  ok       3     2" in text
    assert "1.5s" in text
    assert "  a    42    failed  1         40007  bad email" in text


def test_status_shows_the_progress_of_a_running_scan(tmp_path: Path) -> None:
    """A run still reading a backlog shows rows done of the estimate, its rate and time left."""
    state = StateStore(state_engine(f"sqlite:///{tmp_path}/s.db"), "users")
    state.migrate()
    start = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    run = state.start_run(start, None)
    state.save_progress(run, CycleCounts(rows_read=50_000, synced=49_000), None, 200_000)

    now = start + timedelta(seconds=40)

    data = status_data(state.status_view(), now)

    assert data["progress"] == {
        "run": run,
        "rows_done": 50_000,
        "rows_estimated": 200_000,
        "rows_per_s": 1250.0,
        "remaining_s": 120,
    }
    assert (
        "progress: run 1 has read 50,000 of about 200,000 rows, 1,250 rows/s, about 2m left"
        in render_status(state.status_view(), now)
    )
    state.engine.dispose()
