"""Prometheus metrics of the daemon, served on ``metrics.listen`` at ``/metrics``.

:class:`Metrics` is an observer of the engine (``engine.Observer``): it counts what each page and
cycle report says, per page, never per row. The client's loop thread reports each answer to
:meth:`Metrics.answered` (one histogram observation, a lock and a bisect). The users by status
and the retry queue are read from the tracking database when Prometheus scrapes, at most every
:data:`TABLE_EVERY` seconds. Every series is labelled with the sync's name (``sync``); the
registry is the daemon's own, with the process's CPU, memory and start time beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cdc_sync.engagelab import ApiResult, Verdict
from cdc_sync.errors import SetupError, StateError
from cdc_sync.outcomes import (
    AuditSlice,
    CycleReport,
    CycleStart,
    PageReport,
    RowOutcome,
    RunOutcome,
)
from cdc_sync.rules import Status
from cdc_sync.state import StateStore

TABLE_EVERY = 5.0  # seconds a scrape reuses the tracking table's counts for

# Pushes take milliseconds to the timeout (10 s by default); cycles an idle poll to a backfill.
PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CYCLE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Metrics:
    """The metrics of one sync, in a registry of their own (:attr:`registry`)."""

    def __init__(
        self,
        sync: str,
        state: StateStore,
        interval: float,
        *,
        now: Callable[[], float] = time.time,
        process: bool = True,
    ) -> None:
        self.sync = sync
        self.now = now
        self.registry = CollectorRegistry(auto_describe=True)
        r, label = self.registry, ["sync"]

        def counter(name: str, text: str, *more: str) -> Counter:
            return Counter(name, text, [*label, *more], registry=r)

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, label, registry=r)

        self._rows = counter("cdc_sync_rows_read", "Source rows read.").labels(sync)
        pushes = counter(
            "cdc_sync_pushes",
            "Users handled by a cycle, by what it did with them (synced: sent and accepted).",
            "outcome",
        )
        self._pushes = {outcome: pushes.labels(sync, outcome.value) for outcome in RowOutcome}
        self._errors = counter(
            "cdc_sync_api_errors",
            "EngageLab answers that were not a success, by API code "
            "(http_<status> without one, network when none came).",
            "code",
        )
        self._push_seconds = Histogram(
            "cdc_sync_push_duration_seconds",
            "Time from sending a push to its answer.",
            label,
            registry=r,
            buckets=PUSH_BUCKETS,
        ).labels(sync)
        self._cycle_seconds = Histogram(
            "cdc_sync_cycle_duration_seconds",
            "Time a cycle took.",
            label,
            registry=r,
            buckets=CYCLE_BUCKETS,
        ).labels(sync)
        cycles = counter("cdc_sync_cycles", "Cycles finished, by outcome.", "outcome")
        self._cycles = {outcome: cycles.labels(sync, outcome.value) for outcome in RunOutcome}
        self._audit_misses = counter(
            "cdc_sync_audit_misses", "Users the audit found out of step and re-queued."
        ).labels(sync)
        self._registered = counter(
            "cdc_sync_registered_users", "Users given an EUID by register (source.identity)."
        ).labels(sync)
        self._last_success = gauge(
            "cdc_sync_last_success_timestamp_seconds",
            "When the last cycle ended ok with nobody left retrying (Unix time; the daemon's "
            "start when none has since the run history began).",
        ).labels(sync)
        self._healthy = gauge(
            "cdc_sync_healthy",
            "1 unless the last cycle ended fatal (EngageLab refused the sync) or in error.",
        ).labels(sync)
        self._watermark_lag = gauge(
            "cdc_sync_watermark_lag_seconds",
            "The source's clock minus the watermark's cursor at the end of the last cycle; "
            "0 when it read to the end of the table.",
        ).labels(sync)
        self._replica_lag = gauge(
            "cdc_sync_replica_lag_seconds",
            "Seconds the source replica was behind its primary at the last cycle.",
        ).labels(sync)
        self._backlog = gauge(
            "cdc_sync_backlog_rows",
            "Rows the cycle under way has still to read, estimated (0 when there is no backlog).",
        ).labels(sync)
        gauge("cdc_sync_interval_seconds", "schedule.interval: time between cycle starts.").labels(
            sync
        ).set(interval)
        self._healthy.set(1)
        last = state.last_success()
        self._last_success.set(last.timestamp() if last is not None else now())
        r.register(_TableCollector(sync, state, now))
        if process:
            ProcessCollector(registry=r)

    # -- engine.Observer ------------------------------------------------------------------------

    def cycle_started(self, start: CycleStart) -> None:
        pass

    def page_recorded(self, page: PageReport) -> None:
        self._rows.inc(page.rows)
        for outcome, count in page.outcomes.items():
            self._pushes[outcome].inc(count)
        if page.rows_estimated is not None:
            self._backlog.set(max(page.rows_estimated - page.total.rows_read, 0))

    def slice_audited(self, audit: AuditSlice) -> None:
        pass  # its misses are counted with the cycle's, deleted rows the audit found among them

    def cycle_finished(self, report: CycleReport) -> None:
        self._cycles[report.outcome].inc()
        self._pushes[RowOutcome.DEFERRED].inc(report.counts.deferred)  # known when it ends
        self._cycle_seconds.observe(report.seconds)
        self._audit_misses.inc(report.counts.audit_misses)
        self._registered.inc(report.counts.registered)
        self._backlog.set(0)
        failed = report.outcome in (RunOutcome.FATAL, RunOutcome.ERROR)
        self._healthy.set(0 if failed else 1)
        if report.outcome is RunOutcome.OK and not report.counts.retrying:
            self._last_success.set(self.now())
        if report.replica_lag is not None:
            self._replica_lag.set(report.replica_lag)
        lag = watermark_lag(report)
        if lag is not None:
            self._watermark_lag.set(lag)

    # -- the client's loop thread ---------------------------------------------------------------

    def answered(self, result: ApiResult, seconds: float) -> None:
        """One answer (or failure) of a push, ``seconds`` after it was sent."""
        self._push_seconds.observe(seconds)
        if result.verdict is not Verdict.SUCCESS:
            self._errors.labels(self.sync, _code(result)).inc()

    # -- serving --------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` from a thread of its own until closed."""
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise SetupError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                "set metrics.listen to a free HOST:PORT on this machine",
            ) from None
        return MetricsServer(server, thread)


class MetricsServer:
    """The running ``/metrics`` endpoint."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def watermark_lag(report: CycleReport) -> float | None:
    """The source's clock minus the watermark's cursor: 0 when the cycle read to the end (the
    table is quiet, not behind), None when the cursor is not a time or either is unknown."""
    if report.caught_up:
        return 0.0
    clock, mark = report.source_clock, report.watermark_after
    if mark is None or not isinstance(clock, date) or not isinstance(mark.cursor, date):
        return None
    if isinstance(clock, datetime) != isinstance(mark.cursor, datetime):
        return None
    return max((clock - mark.cursor).total_seconds(), 0.0)


def _code(result: ApiResult) -> str:
    if result.code is not None:
        return str(result.code)
    return f"http_{result.status}" if result.status is not None else "network"


class _TableCollector(Collector):
    """``cdc_sync_users{status}`` and ``cdc_sync_retry_queue_users``, read from the tracking
    database when scraped, at most every :data:`TABLE_EVERY` seconds (two indexed counts)."""

    def __init__(self, sync: str, state: StateStore, now: Callable[[], float]) -> None:
        self.sync, self.state, self.now = sync, state, now
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._users: dict[str, int] = {}
        self._due = 0

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            at = time.monotonic()
            if self._read_at is None or at - self._read_at >= TABLE_EVERY:
                self._read_at = at
                try:
                    self._users = self.state.counts_by_status()
                    self._due = self.state.retry_queue(datetime.fromtimestamp(self.now(), UTC))
                except StateError:  # the cycles say so in the log; serve the other metrics
                    pass
        yield from self._families()

    def _families(self) -> Iterator[Metric]:
        users = GaugeMetricFamily(
            "cdc_sync_users",
            "Users in the tracking table, by status now.",
            labels=["sync", "status"],
        )
        for status in Status:
            users.add_metric([self.sync, status.value], self._users.get(status.value, 0))
        yield users
        due = GaugeMetricFamily(
            "cdc_sync_retry_queue_users",
            "Retrying users whose next attempt is due now.",
            labels=["sync"],
        )
        due.add_metric([self.sync], self._due)
        yield due
