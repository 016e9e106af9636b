"""Structured logging (structlog): JSON lines for journald and log shippers, or console for people.

Events are past-tense names (``cycle_finished``) with fields; contact values and the API secret
never appear in them. Only :func:`configure` touches global logging state; only the CLI calls it.

When stderr is the journal (systemd sets ``$JOURNAL_STREAM`` to its device and inode), each line
starts with its syslog priority, ``<4>`` for a warning, which journald takes off and records
(``SyslogLevelPrefix=``, on by default), so ``journalctl -p warning`` shows every warning.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

import structlog

from cdc_sync.outcomes import (
    AuditSlice,
    CycleReport,
    CycleStart,
    PageReport,
    Progress,
    RunOutcome,
    describe,
)

# syslog(3) priorities of structlog's level names (add_log_level calls exception() "error").
PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def priority_prefix(level: str) -> str:
    """The ``<N>`` prefix journald reads as the priority of a line logged at ``level``."""
    return f"<{PRIORITIES.get(level.lower(), 6)}>"


def to_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """Whether ``stream`` is connected to the journal, as ``sd_journal_stream_fd`` documents:
    ``$JOURNAL_STREAM`` holds the device and inode of the journal's stream, ``DEV:INO``."""
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        found = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (found.st_dev, found.st_ino) == (device, inode)


class JournalPriority:
    """Wraps a renderer: the rendered line is prefixed with its level's priority."""

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event: structlog.typing.EventDict) -> Any:
        prefix = priority_prefix(event.get("level", "info"))
        return prefix + str(self._renderer(logger, name, event))


class _PriorityFormatter(logging.Formatter):
    """The same prefix on the standard library's lines (libraries' warnings)."""

    def format(self, record: logging.LogRecord) -> str:
        return priority_prefix(record.levelname) + super().format(record)


def configure(
    level: str = "INFO", fmt: Literal["json", "console"] = "json", *, journal: bool = False
) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    if journal:
        renderer = JournalPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library; keep them quiet unless something is wrong.
    handler = logging.StreamHandler(sys.stderr)
    formatter = _PriorityFormatter if journal else logging.Formatter
    handler.setFormatter(formatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    # APScheduler warns each time a run is skipped because the previous cycle is still going;
    # one cycle at a time with missed runs coalesced is the design, so that is not news.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


PROGRESS_EVERY = 10.0  # seconds between progress lines of a long scan, at least


class EventLog:
    """The log as an observer of the engine (``engine.Observer``).

    Per cycle: ``cycle_started`` and one ``cycle_finished`` (duration, the counts, run id,
    watermark; WARNING or worse when the cycle did not end well). Per page: ``page_recorded``.
    Per user who fails for good (permanently, or out of retries): a WARNING ``user_failed`` with
    key, euid, code and message, never a contact value. During a long scan, ``cycle_progress`` at
    most every ``progress_every`` seconds: rows done, estimated total, rate, time remaining.
    """

    def __init__(
        self,
        *,
        progress_every: float = PROGRESS_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = structlog.get_logger("cdc_sync.engine")
        self.progress_every = progress_every
        self.clock = clock
        self._started = self._said = clock()

    def cycle_started(self, start: CycleStart) -> None:
        self._started = self._said = self.clock()
        if start.abandoned:
            self.log.warning("abandoned_runs_closed", sync=start.sync, runs=start.abandoned)
        self.log.info(
            "cycle_started",
            sync=start.sync,
            run_id=start.run_id,
            watermark=describe(start.watermark),
        )

    def page_recorded(self, page: PageReport) -> None:
        log = self.log
        for user in page.gave_up:
            log.warning(
                "user_failed",
                sync=page.sync,
                run_id=page.run_id,
                key=user.key,
                euid=user.euid,
                code=user.code,
                message=user.message,
            )
        log.info(
            "page_recorded",
            sync=page.sync,
            run_id=page.run_id,
            rows=page.rows,
            sent=page.sent,
            retrying=page.retrying,
            rows_read=page.total.rows_read,
        )
        now = self.clock()
        if page.rows_estimated is not None and now - self._said >= self.progress_every:
            self._said = now
            progress = Progress(page.total.rows_read, page.rows_estimated, now - self._started)
            remaining = progress.remaining_seconds
            log.info(
                "cycle_progress",
                sync=page.sync,
                run_id=page.run_id,
                rows_done=progress.done,
                rows_estimated=progress.total,
                rows_per_s=round(progress.rate, 1),
                remaining_s=None if remaining is None else round(remaining),
            )

    def slice_audited(self, audit: AuditSlice) -> None:
        if audit.misses:
            self.log.warning("audit_found_misses", sync=audit.sync, users=audit.misses)

    def cycle_finished(self, report: CycleReport) -> None:
        counts = report.counts
        level = _LEVELS.get(report.outcome, logging.INFO)
        self.log.log(
            level,
            "cycle_finished",
            sync=report.sync,
            run_id=report.run_id,
            outcome=report.outcome.value,
            duration_s=round(report.seconds, 3),
            watermark=describe(report.watermark_after),
            replica_lag_s=report.replica_lag,
            error=report.error,
            **counts.as_dict(),
        )


_LEVELS = {RunOutcome.FATAL: logging.CRITICAL, RunOutcome.ERROR: logging.ERROR}
