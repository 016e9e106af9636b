"""The log as the engine's observer: what an operator following it sees, line by line."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from cdc_sync.logs import EventLog
from cdc_sync.outcomes import CycleCounts, CycleStart, PageReport, RowOutcome

START = datetime(2026, 12, 1, tzinfo=UTC)


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def page(done: int, estimated: int | None) -> PageReport:
    return PageReport(
        "users",
        7,
        500,
        500,
        {RowOutcome.SYNCED: 500},
        CycleCounts(rows_read=done, synced=done),
        False,
        None,
        True,
        estimated,
    )


def test_progress_is_logged_at_most_every_ten_seconds_with_rate_and_time_left() -> None:
    """During a long scan a cycle_progress line comes at most every 10 s: done, estimated
    total, rate and time remaining."""
    clock = Ticks()
    log = EventLog(clock=clock)
    log.cycle_started(CycleStart("users", 7, START, None))

    with structlog.testing.capture_logs() as logs:
        for n in range(1, 9):  # a page every 4 s, 500 rows each
            clock.now += 4
            log.page_recorded(page(500 * n, 10_000))

    progress = [line for line in logs if line["event"] == "cycle_progress"]
    assert [(p["rows_done"], p["rows_per_s"], p["remaining_s"]) for p in progress] == [
        (1500, 125.0, 68),  # at 12 s: 8500 rows left at 125 rows/s
        (3000, 125.0, 56),  # at 24 s
    ]
    assert {(p["run_id"], p["rows_estimated"]) for p in progress} == {(7, 10_000)}


def test_no_progress_without_an_estimate() -> None:
    """A cycle that met no backlog (no estimate) logs pages but no progress."""
    clock = Ticks()
    log = EventLog(clock=clock)
    log.cycle_started(CycleStart("users", 7, START, None))

    with structlog.testing.capture_logs() as logs:
        for n in range(1, 5):
            clock.now += 20
            log.page_recorded(page(500 * n, None))

    assert [line["event"] for line in logs] == ["page_recorded"] * 4
    assert all(line["run_id"] == 7 for line in logs)
