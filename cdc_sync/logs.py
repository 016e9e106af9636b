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
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog

from cdc_sync.outcomes import AuditSlice, CycleReport, CycleStart, PageReport

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


class EventLog:
    """The log as an observer of the engine (``engine.Observer``): a line when a cycle starts,
    one per page recorded, one when it finishes, and warnings for what needs a look."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("cdc_sync.engine")

    def cycle_started(self, start: CycleStart) -> None:
        if start.abandoned:
            self.log.warning("abandoned_runs_closed", sync=start.sync, runs=start.abandoned)
        self.log.info("cycle_started", sync=start.sync, run_id=start.run_id)

    def page_recorded(self, page: PageReport) -> None:
        self.log.info(
            "page_recorded",
            sync=page.sync,
            rows=page.rows,
            pushed=page.sent,
            retrying=page.retrying,
        )
        refused = page.refused
        if refused is not None:
            self.log.critical(
                "engagelab_refused",
                sync=page.sync,
                code=refused.code,
                status=refused.status,
                message=refused.message,
            )

    def slice_audited(self, audit: AuditSlice) -> None:
        if audit.misses:
            self.log.warning("audit_found_misses", sync=audit.sync, users=audit.misses)

    def cycle_finished(self, report: CycleReport) -> None:
        counts = report.counts
        self.log.info(
            "cycle_finished",
            sync=report.sync,
            run_id=report.run_id,
            outcome=report.outcome.value,
            replica_lag_s=report.replica_lag,
            **counts.as_dict(),
        )
