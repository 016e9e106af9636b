"""The daemon: the instance lock, an APScheduler 3.x interval job running one cycle at a time, and
signal handling.

SIGTERM or SIGINT stops taking new work: the cycle in flight stops at once (no request starts,
the answers of those in flight are awaited, each for at most the request timeout), records what
it has, the lock is released, and the process exits 0 (see :meth:`Engine.run_cycle`). Missed
runs are coalesced into one; a cycle never overlaps another, in this process (one worker) or in
any other (the lock).

Under systemd (``Type=notify``) the daemon says READY once its start-up checks have passed, puts
the last cycle's one-line summary in STATUS, and pings the watchdog only while work progresses:
each attempt at the lock while waiting for it, the start and end of each cycle, each page the
engine records, and each check between cycles as long as the next cycle is not overdue. A query
or request that hangs inside a cycle therefore stops the pings, and systemd restarts the service.
EngageLab refusing the credentials (or the project) in :data:`REFUSALS_BEFORE_EXIT` cycles in a
row ends the process with status 3, which the unit does not restart: a restart cannot fix them.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from types import FrameType

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from cdc_sync.engine import CycleReport, Engine, Stop, utcnow
from cdc_sync.errors import CdcSyncError, FatalApiError, first_line
from cdc_sync.lock import InstanceLock
from cdc_sync.notify import Notifier
from cdc_sync.outcomes import AuditSlice, CycleStart, PageReport

log = structlog.get_logger("cdc_sync.scheduler")

LOCK_POLL_MAX = 5.0  # seconds between attempts at the lock, and between checks that it is held
REFUSALS_BEFORE_EXIT = 3  # cycles in a row refused by EngageLab before the daemon exits 3


class Watchdog:
    """The engine's observer that pings systemd's watchdog as work lands: each page recorded
    and each slice of the audit judged (the daemon pings at the start and end of a cycle)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def cycle_started(self, start: CycleStart) -> None:
        pass

    def page_recorded(self, page: PageReport) -> None:
        self.notifier.watchdog()

    def slice_audited(self, audit: AuditSlice) -> None:
        self.notifier.watchdog()

    def cycle_finished(self, report: CycleReport) -> None:
        pass


class Daemon:
    """Runs ``engine`` every ``interval`` while it holds ``lock``, until :meth:`stop` (or a signal).

    It waits for the lock before the first cycle, trying every ``min(5 s, interval)``; a stop
    while waiting ends it with no cycle run. Holding the lock, it checks every ``min(5 s,
    interval)`` and before each cycle that the lock is still held. If the lock is lost (its
    PostgreSQL session ended: server restart, network cut, backend terminated; or its lock file
    deleted), the daemon logs ``lock_lost``, stops the cycle in flight as a signal does, schedules
    no more cycles and goes back to waiting for the lock: another instance may have taken over
    in the meantime, and the process stays up (exit 0 on SIGTERM) rather than relying on a
    restart to come back.

    ``lock`` defaults to the sync's lock in ``engine``'s tracking database; ``notifier``, to
    none (outside systemd). ``summary`` is the one-line STATUS of a finished cycle.
    """

    def __init__(
        self,
        engine: Engine,
        interval: timedelta,
        lock: InstanceLock | None = None,
        notifier: Notifier | None = None,
        summary: Callable[[CycleReport], str] = str,
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.lock = lock or InstanceLock(engine.state.engine, engine.settings.name)
        self.notifier = notifier or Notifier({})
        self.summary = summary
        self.poll = min(LOCK_POLL_MAX, interval.total_seconds())
        if self.notifier.watchdog_seconds is not None:  # systemd asks for pings twice as often
            self.poll = min(self.poll, self.notifier.watchdog_seconds / 2)
        self.stopping = threading.Event()
        # Set to end the current tenure of the lock (stop, or lock lost); it stops the cycle in
        # flight. A fresh one for every tenure.
        self.halt = Stop()
        self.exit_status = 0
        self._refusals = 0  # cycles in a row EngageLab refused
        self._cycling = False  # a cycle is in flight: only its progress pings the watchdog
        self._idle_since = time.monotonic()  # when the last cycle ended (or the tenure began)

    def cycle(self) -> None:
        """One scheduled cycle. Errors are logged and the daemon carries on with the next one:
        a fatal API answer (bad credentials) costs one request per interval until fixed."""
        if self.halt.is_set():
            return
        if not self.lock.still_held():
            self._lock_lost()
            return
        self._cycling = True
        self.notifier.watchdog()
        try:
            report = self.engine.run_cycle(self.halt)
        except FatalApiError as exc:  # its cycle_finished line said so, at CRITICAL
            self._refused(exc)
        except CdcSyncError as exc:
            log.error("cycle_failed", error=str(exc))
            self.notifier.status(f"last cycle failed: {first_line(exc)}")
        except Exception as exc:
            log.exception("cycle_crashed")
            self.notifier.status(f"last cycle crashed: {type(exc).__name__}")
        else:
            self._refusals = 0
            self.notifier.status(self.summary(report))
        finally:
            self._idle_since = time.monotonic()
            self._cycling = False
            self.notifier.watchdog()

    def _refused(self, exc: FatalApiError) -> None:
        """EngageLab refused the cycle: say so in STATUS; exit 3 once it has kept refusing."""
        self._refusals += 1
        self.notifier.status(
            f"EngageLab refused {self._refusals} cycle(s) in a row (HTTP {exc.status}, "
            f"code {exc.code}: {exc.message}); "
            "fix the credentials or the project, then restart"
        )
        if self._refusals >= REFUSALS_BEFORE_EXIT:
            log.critical("daemon_giving_up", sync=self.engine.settings.name, cycles=self._refusals)
            self.exit_status = exc.exit_code
            self.stop()

    def run(self) -> int:
        """Block until a signal arrives; returns the process exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info(
            "daemon_started",
            sync=self.engine.settings.name,
            interval_s=self.interval.total_seconds(),
        )
        self.notifier.ready(f"waiting for the lock {self.lock.describe}")
        try:
            while self.lock.acquire(self.stopping, self.poll, self.notifier.watchdog):
                self.notifier.status("holding the lock; the first cycle is starting")
                self._serve()
                self.lock.release()  # after the last cycle of this tenure has finished
        finally:
            self.lock.release()
        log.info("daemon_stopped", sync=self.engine.settings.name, status=self.exit_status)
        return self.exit_status

    def stop(self) -> None:
        self.stopping.set()
        self.halt.set()

    def _serve(self) -> None:
        """Run cycles while the lock is held; return once stopped or the lock is lost, after the
        cycle in flight has ended."""
        self.halt = Stop()
        if self.stopping.is_set():  # a stop that came before this tenure's halt existed
            return
        self.engine.begin_tenure()  # another instance may have synced while we waited
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        scheduler.add_job(
            self.cycle,
            "interval",
            seconds=self.interval.total_seconds(),
            next_run_time=datetime.now(utcnow().tzinfo),
            id="cycle",
        )
        scheduler.start()
        self._idle_since = time.monotonic()
        # Between cycles the lock is watched here too, so a long cycle stops when it is lost.
        while not self.halt.wait(self.poll):
            if not self.lock.still_held():
                self._lock_lost()
            elif self._waiting_on_schedule():
                self.notifier.watchdog()
        scheduler.shutdown(wait=True)  # the cycle in flight ends: the halt stopped it

    def _waiting_on_schedule(self) -> bool:
        """No cycle is in flight and the next one is not overdue: idle is progress too."""
        overdue = self.interval.total_seconds() + self.poll
        return not self._cycling and time.monotonic() - self._idle_since <= overdue

    def _lock_lost(self) -> None:
        if not self.halt.is_set():
            log.error("lock_lost", sync=self.engine.settings.name, lock=self.lock.describe)
        self.halt.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.notifier.stopping()
        self.stop()
