"""Structured logging (structlog): JSON lines for journald and log shippers, or console for people.

Events are past-tense names (``cycle_finished``) with fields; contact values and the API secret
never appear in them. Only :func:`configure` touches global logging state; only the CLI calls it.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure(level: str = "INFO", fmt: Literal["json", "console"] = "json") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
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
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    # APScheduler warns each time a run is skipped because the previous cycle is still going;
    # one cycle at a time with missed runs coalesced is the design, so that is not news.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
