"""The daemon: an APScheduler 3.x interval job running one cycle at a time, and signal handling.

SIGTERM or SIGINT stops taking new work: the cycle in flight finishes the page it is on, records
it, and the process exits 0. Missed runs are coalesced into one; a cycle never overlaps another.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timedelta
from types import FrameType

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from cdc_sync.engine import Engine, utcnow
from cdc_sync.errors import CdcSyncError, FatalApiError

log = structlog.get_logger("cdc_sync.scheduler")


class Daemon:
    """Runs ``engine`` every ``interval`` until :meth:`stop` (or a signal) says otherwise."""

    def __init__(self, engine: Engine, interval: timedelta) -> None:
        self.engine = engine
        self.interval = interval
        self.stopping = threading.Event()
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )

    def cycle(self) -> None:
        """One scheduled cycle. Errors are logged and the daemon carries on with the next one:
        a fatal API answer (bad credentials) costs one request per interval until fixed."""
        if self.stopping.is_set():
            return
        try:
            self.engine.run_cycle(self.stopping)
        except FatalApiError as exc:
            log.critical("cycle_refused", error=str(exc), code=exc.code, status=exc.status)
        except CdcSyncError as exc:
            log.error("cycle_failed", error=str(exc))
        except Exception:
            log.exception("cycle_crashed")

    def run(self) -> int:
        """Block until a signal arrives; returns the process exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.scheduler.add_job(
            self.cycle,
            "interval",
            seconds=self.interval.total_seconds(),
            next_run_time=datetime.now(utcnow().tzinfo),
            id="cycle",
        )
        self.scheduler.start()
        log.info(
            "daemon_started",
            sync=self.engine.settings.name,
            interval_s=self.interval.total_seconds(),
        )
        self.stopping.wait()
        self.scheduler.shutdown(wait=True)  # lets the cycle in flight finish its page
        log.info("daemon_stopped", sync=self.engine.settings.name)
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop()
