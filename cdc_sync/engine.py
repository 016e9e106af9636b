"""One sync cycle: the only place that orders read → map → compare → push → record → advance.

A cycle scans the source from the watermark minus the lookback, page by page, then works through
the users whose transient failure is due for another attempt (re-reading each one's *current* row,
so a stale payload is never sent). Every decision is delegated to :mod:`cdc_sync.rules`.

What happened is reported to one :class:`Observer` as it happens — a cycle started, a page was
recorded, a slice of the audit was judged, a cycle finished — in the vocabulary of
:mod:`cdc_sync.outcomes`; the run history, the log, the metrics and the daemon's watchdog are
observers, so a new signal is added where it is reported and read. Reports are per page
(counts), never a call per row.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

from cdc_sync.engagelab import ApiResult, Verdict
from cdc_sync.errors import CdcSyncError, FatalApiError, SourceError, Stopped
from cdc_sync.identity import Resolver
from cdc_sync.mapping import (
    VANISHED,
    Leave,
    Mapped,
    Payload,
    Policy,
    SourceRow,
    addressed,
    is_digest,
    leave,
    map_row,
    status_key,
)
from cdc_sync.outcomes import (
    AuditSlice,
    CycleCounts,
    CycleReport,
    CycleStart,
    GaveUp,
    PageReport,
    RowOutcome,
    RunOutcome,
)
from cdc_sync.rules import (
    Action,
    Position,
    Record,
    Retry,
    Status,
    advance,
    decide,
    missed,
    reread_from,
    settle,
)
from cdc_sync.source import Horizon, Source
from cdc_sync.state import Progress, RunHistory, StateStore

__all__ = ["CycleReport", "Engine", "EngineSettings", "Observer", "Observers", "Pusher", "Stop"]

log = structlog.get_logger("cdc_sync.engine")

PRUNE_EVERY = timedelta(hours=1)  # how often old run history is deleted
# How often rows outside the keyset scan's reach (a NULL or infinite cursor) are swept by key.
# A row can enter that set at any time (an insert without the cursor), so the sweep comes back;
# between sweeps it costs an idle cycle nothing. With the audit on, the audit covers them too.
REACH_EVERY = timedelta(hours=1)
ESTIMATE_CAP = 1_000_000  # rows a backlog estimate counts at most (an index range, bounded)


class Pusher(Protocol):
    """What the engine needs from the EngageLab client (``engagelab.EngageLabClient``)."""

    def submit(self, payloads: Sequence[Payload]) -> Future[list[ApiResult | None]]: ...

    def cancel(self) -> None:
        """Start no more requests: those not yet sent end as ``None`` at once, in flight are
        answered or time out. From any thread or a signal handler."""

    def resume(self) -> None:
        """Allow requests again (after a fatal answer or :meth:`cancel`)."""


class Stop(threading.Event):
    """The stop signal: an Event that, when set, also calls what is registered on it.

    It is set from a signal handler (``once``, the daemon) or another thread (the daemon's lock
    watch), and reaches what does not wait on the event itself: a cycle registers
    :meth:`Pusher.cancel`, so a page's answers, the client's pace and a ``Retry-After`` pause
    end at once, with no timer or polling while nothing stops.
    """

    def __init__(self) -> None:
        super().__init__()
        self._calls: list[Callable[[], None]] = []

    def set(self) -> None:
        if self.is_set():  # a second signal: everything registered has been told
            return
        super().set()
        for call in list(self._calls):
            call()

    @contextmanager
    def calling(self, call: Callable[[], None]) -> Iterator[None]:
        """Call ``call`` when set during the block, or at once if set already."""
        self._calls.append(call)
        try:
            if self.is_set():
                call()
            yield
        finally:
            self._calls.remove(call)


class Observer(Protocol):
    """Where the engine reports what a cycle does: the run history (``state.RunHistory``), the
    log (``logs.EventLog``), the metrics (``metrics.Metrics``) and the daemon's watchdog
    (``scheduler.Watchdog``) each implement it.

    Called on the engine's thread, in order: ``cycle_started``, then ``page_recorded`` once per
    page (after its commit) and ``slice_audited`` once per slice of the audit (after its
    re-queue), then ``cycle_finished`` (also when the cycle failed). An observer must not raise
    for anything but a failure of its own store.
    """

    def cycle_started(self, start: CycleStart) -> None: ...

    def page_recorded(self, page: PageReport) -> None: ...

    def slice_audited(self, audit: AuditSlice) -> None: ...

    def cycle_finished(self, report: CycleReport) -> None: ...


class Observers:
    """Several observers as one, called in the order given."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def cycle_started(self, start: CycleStart) -> None:
        for observer in self.observers:
            observer.cycle_started(start)

    def page_recorded(self, page: PageReport) -> None:
        for observer in self.observers:
            observer.page_recorded(page)

    def slice_audited(self, audit: AuditSlice) -> None:
        for observer in self.observers:
            observer.slice_audited(audit)

    def cycle_finished(self, report: CycleReport) -> None:
        for observer in self.observers:
            observer.cycle_finished(report)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class EngineSettings:
    name: str
    batch_size: int
    lookback: timedelta | int
    retry: Retry
    mapping: Policy  # how rows become payloads (salt, clearing, ...): passed to map_row as it is
    audit_rows: int = 0  # rows the audit sweep reads per cycle; 0: no audit
    keep_runs: timedelta = timedelta(days=30)  # run history older than this is pruned


class Engine:
    """Runs cycles for one sync. Collaborators are passed in; only the CLI builds real ones."""

    def __init__(
        self,
        settings: EngineSettings,
        source: Source,
        state: StateStore,
        pusher: Pusher,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], datetime] = utcnow,
        jitter: Callable[[], float] = random.random,
        observer: Observer | None = None,
    ) -> None:
        """``observer`` defaults to the run history and the log (:func:`default_observer`)."""
        self.settings = settings
        self.source = source
        self.state = state
        self.pusher = pusher
        self.resolver = resolver  # source.identity: the rows' EUIDs are resolved before a push
        self.clock = clock
        self.jitter = jitter
        self.observer = observer or default_observer(state)
        self._started = False
        self._pruned: datetime | None = None
        # Kept between cycles so an idle poll need not ask: while this instance holds the lock
        # it is the only writer of both. (After a lock is lost and won back, the watermark held
        # here can only be older than the stored one: rows are read again, never skipped.)
        self._watermark: Position | None = None
        self._seen: Any = None  # the horizon (Horizon.seen) of the last cycle's first read
        self._progress = Progress()  # what the state row said of the sweeps, when last read
        self._watermark_known = False
        self._next_due: datetime | None = None  # earliest next_attempt_at of a retrying user
        self._due_known = False
        # The operator epoch these were read under: an operator's command bumps it (retry,
        # resync, reset-watermark), and the next cycle then reads them all again.
        self._epoch: int | None = None

    def begin_tenure(self) -> None:
        """The lock was (re)acquired: another instance may have run meanwhile, so what this
        engine remembers (watermark, retry queue, whether killed runs were tidied, the status
        rows the state store keeps) is dropped and read again on the next cycle."""
        self._started = False
        self._epoch = None
        self._forget()

    def _read_progress(self) -> None:
        progress = self._progress = self.state.progress()
        self._watermark, self._seen = progress.watermark, progress.horizon

    def _forget(self) -> None:
        self._watermark_known = False
        self._due_known = False
        self.state.forget()

    def note_retry(self, when: datetime | None) -> None:
        """A user was (re)scheduled for a retry at ``when``."""
        if self._due_known and when is not None:
            self._next_due = when if self._next_due is None else min(self._next_due, when)

    def _note_held(self, cycle: _Cycle) -> None:
        """Rows stamped ahead of the source's clock hold the watermark: say so in the log, and
        in the state row for ``status`` when their number changes (not on every idle cycle)."""
        rows = cycle.ahead_rows
        by = cycle.ahead_by
        seconds = by.total_seconds() if isinstance(by, timedelta) else None
        if rows:
            log.warning(
                "watermark_held",
                sync=self.settings.name,
                rows_ahead=rows,
                ahead_by_s=seconds,
                reason="rows stamped ahead of the source's clock (a writer's clock or time zone "
                "ahead of the server's); the watermark waits at the clock, and they are re-read",
            )
        if rows != (self._progress.held_rows or 0):
            self._progress = self.state.store_held(self.clock(), rows, seconds)

    def reach_due(self, now: datetime) -> bool:
        """Whether rows outside the cursor's reach are to be swept this cycle: never swept, a
        sweep under way, or the last one finished REACH_EVERY ago."""
        p = self._progress
        return (
            p.reach_checked_at is None
            or p.reach_key is not None
            or now - p.reach_checked_at >= REACH_EVERY
        )

    def retries_may_be_due(self, now: datetime) -> bool:
        return not self._due_known or (self._next_due is not None and self._next_due <= now)

    def retries_checked(self) -> None:
        """The retry queue was worked through: learn when the next retry falls due."""
        self._next_due = self.state.earliest_retry()
        self._due_known = True

    def pending(self) -> int:
        """How many users the next read of their row would push: the whole table, mapped as a
        cycle maps it and compared with the status table, without a call or a write. It counts
        what a change of policy (normalisation turned on, clearing) would re-push."""
        size, now = self.settings.batch_size, self.clock()
        count, after = 0, None
        while True:
            rows = self.source.read_by_key(after, size)
            mapped = [map_row(row, self.settings.mapping) for row in rows]
            records = self.state.records([m.key for m in mapped])
            count += sum(decide(m, records.get(m.key), now) is Action.PUSH for m in mapped)
            if len(rows) < size:
                return count
            after = rows[-1].key

    def run_cycle(self, stop: Stop | None = None) -> CycleReport:
        """Run one cycle. A fatal API answer is recorded in the run history and re-raised.

        Once ``stop`` is set no request starts: those queued or waiting for their pace (a
        ``Retry-After`` pause too) end as not sent at once, the answers of those in flight are
        awaited (each at most the request timeout), the pages in hand are recorded, and the
        watermark stays before the first user not sent. No page is read after it, and a source
        read that is being retried gives up. The run is recorded ``stopped``.
        """
        stop = stop or Stop()
        abandoned = 0
        if not self._started:  # first cycle of this process: tidy what a killed one left
            self._started = True
            abandoned = self.state.close_abandoned_runs(self.clock())
        if self._pruned is None or self.clock() - self._pruned >= PRUNE_EVERY:
            self._pruned = self.clock()
            self.state.prune(self._pruned - self.settings.keep_runs)
        fresh = not self._watermark_known
        if not self._watermark_known:
            self._read_progress()
        before = self._watermark
        started = self.clock()
        run_id = self.state.start_run(started, before)
        if self.state.epoch != self._epoch:  # an operator's command, or a new tenure
            self._epoch = self.state.epoch
            self._forget()
            moved = self.state.reset_pending and self.state.apply_reset(run_id, self.clock())
            if moved or not fresh:
                self._read_progress()
                before = self._watermark
        name = self.settings.name
        cycle = _Cycle(self, run_id, started, before)
        self.observer.cycle_started(CycleStart(name, run_id, started, before, abandoned))
        outcome, error = RunOutcome.OK, None
        try:
            self.pusher.resume()
            with stop.calling(self.pusher.cancel):
                cycle.scan(stop)
                if self.reach_due(self.clock()) and not stop.is_set():
                    cycle.sweep_outside(stop)
                if self.settings.audit_rows and not stop.is_set():
                    cycle.audit(stop)
                if not stop.is_set():
                    cycle.retry_due(stop)
            if stop.is_set():
                outcome = RunOutcome.STOPPED
        except Stopped:
            outcome = RunOutcome.STOPPED
        except FatalApiError as exc:
            outcome, error = RunOutcome.FATAL, str(exc)
            raise
        except CdcSyncError as exc:
            outcome, error = RunOutcome.ERROR, str(exc)
            raise
        except Exception as exc:
            outcome, error = RunOutcome.ERROR, f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._watermark, self._watermark_known = cycle.watermark, True
            self._note_held(cycle)
            if cycle.horizon.seen is not None:  # the first read happened: the next window's anchor
                self._seen = cycle.horizon.seen
            report = CycleReport(
                name,
                run_id,
                outcome,
                cycle.counts(),
                before,
                cycle.watermark,
                started,
                self.clock(),
                error,
                cycle.horizon.replica_lag,
                cycle.estimated,
                cycle.horizon.ceiling,
                cycle.caught_up and not cycle.held,
            )
            self.observer.cycle_finished(report)
        return report

    def preview(self, sample: int = 10) -> Preview:
        """What the next cycle would do, without calling the API or writing anything: the rows
        it would read (from a pending watermark reset, if one waits) and the users due for a
        retry, with the action each would get."""
        reset = self.state.pending_reset()
        if reset is not None:  # applied, it starts the re-read window afresh
            return _Cycle(self, 0, self.clock(), reset[0]).preview(sample, None)
        progress = self.state.progress()
        cycle = _Cycle(self, 0, self.clock(), progress.watermark)
        return cycle.preview(sample, progress.horizon)


def default_observer(state: StateStore) -> Observer:
    """The observers every engine has: the run history, then the log."""
    from cdc_sync.logs import EventLog

    return Observers(RunHistory(state), EventLog())


@dataclass(frozen=True)
class Preview:
    """What a cycle would do (``once --dry-run``)."""

    watermark: Position | None
    rows_read: int
    actions: dict[str, int]  # by action (push, unchanged, confirm, defer, skip)
    retries_due: int  # users due for a retry, re-read and among the actions
    sample: list[str]  # keys of users that would be pushed, the first few


class _Batch:
    """One page on its way: what was read and decided, and the pushes in flight for it."""

    def __init__(
        self,
        rows: Sequence[SourceRow],
        mapped: list[Mapped],
        keys: list[str],
        records: dict[str, Record],
        actions: list[Action],
        sending: list[int],
        answers: Future[list[ApiResult | None]],
        now: datetime,
        unresolved: dict[int, ApiResult | None],
    ) -> None:
        self.rows, self.mapped, self.keys, self.records = rows, mapped, keys, records
        self.actions, self.sending, self.answers, self.now = actions, sending, answers, now
        self.unresolved = unresolved  # rows to push left without an EUID, and why


class _Cycle:
    """The mutable bookkeeping of one cycle (watermark so far, counters)."""

    def __init__(
        self, engine: Engine, run_id: int, started: datetime, watermark: Position | None
    ) -> None:
        self.engine = engine
        self.run_id = run_id  # 0: a preview, which records no run
        self.started = started
        self.watermark = watermark
        self.horizon = Horizon()
        self.held = False  # a row the watermark may not pass was met: it moves no further
        self.ahead_rows = 0  # rows read stamped ahead of the source's clock (they hold it)
        self.ahead_by: Any = None  # how far the furthest of them is ahead
        self.tally: Counter[str] = Counter()  # by CycleCounts field name
        # Users the scan deferred (a retry pending, not due): counted when the cycle ends, so a
        # user the retry phase then sends is counted once, by what the retry did.
        self.deferred: set[str] = set()
        self.estimated: int | None = None  # rows the scan is expected to read, if it counted
        self.caught_up = False  # the scan read to the end of the table

    def scan(self, stop: threading.Event) -> None:
        """Read pages from the watermark on; each page's pushes overlap the next page's reading.

        While page N's requests are in flight, page N+1 is read, mapped, compared and submitted,
        so requests keep flowing across page boundaries. Pages are recorded strictly in order.
        """
        e = self.engine
        size = e.settings.batch_size
        after, start = self.start(e._seen)
        pending: _Batch | None = None  # the page whose pushes are in flight
        try:
            self.horizon, rows = e.source.first_page(after, start, size, stop=stop)
            estimate = len(rows) == size  # a backlog: count it while the first page is pushed
            while True:
                done, pending = pending, self.send(rows, retrying=False) if rows else None
                if estimate:
                    estimate = False
                    self.estimated = e.source.count_from(after, start, ESTIMATE_CAP, stop=stop)
                if done is not None:
                    self.finish(done, retrying=False)
                if not rows or len(rows) < size or stop.is_set():
                    self.caught_up = not stop.is_set()
                    break
                after = Position(rows[-1].cursor, rows[-1].key)
                rows = e.source.read_page(after, None, size, stop=stop)
            last, pending = pending, None
            if last is not None:
                self.finish(last, retrying=False)
        except BaseException:
            if pending is not None:  # record what it did send before re-raising what went wrong
                with suppress(Exception):
                    self.finish(pending, retrying=False)
            raise

    def sweep_outside(self, stop: threading.Event) -> None:
        """Read the rows the keyset scan cannot reach (a NULL or infinite cursor) in key order,
        page by page, and sync them as the scan would, without moving the watermark.

        Where the sweep stands is stored after each page, so a stop or a restart resumes it; once
        done, the rows are counted (for ``status``) and the sweep rests for REACH_EVERY.
        """
        e = self.engine
        size = e.settings.batch_size
        after = e._progress.reach_key
        while not stop.is_set():
            rows = e.source.read_by_key(after, size, outside=True, stop=stop)
            if rows:
                self.finish(self.send(rows, retrying=False), retrying=False, sweep=True)
            after = rows[-1].key if len(rows) == size else None
            now = e.clock()
            if after is not None:
                e._progress = e.state.store_reach(now, after)
                continue
            nulls, infinite = e.source.outside_reach()
            e._progress = e.state.store_reach(now, None, nulls + infinite)
            if nulls or infinite:
                log.warning(
                    "rows_outside_cursor_reach",
                    sync=e.settings.name,
                    null_cursor=nulls,
                    infinite_cursor=infinite,
                    hint="read by key once an hour; run `cdc-sync check` for the schema fix",
                )
            return

    def start(self, seen: Any) -> tuple[Position | None, Any]:
        """Where a scan starts: at the watermark in xid8 mode (exact: nothing can commit behind
        it), else at its re-read window."""
        if self.engine.source.spec.gap_free:
            return self.watermark, None
        return self.window(seen)

    def window(self, seen: Any) -> tuple[Position | None, Any]:
        """Where a scan from the watermark held now starts (:func:`rules.reread_from`)."""
        lookback = self.engine.settings.lookback
        try:
            return reread_from(self.watermark, lookback, seen)
        except TypeError:  # the cursor column changed type under a stored watermark
            assert self.watermark is not None
            raise SourceError(
                f"the stored watermark {self.watermark.cursor!s} does not fit the cursor column "
                "(did its type change?)",
                "reset this sync's row in cdc_sync_state, or restore the column's type",
            ) from None

    def retry_due(self, stop: threading.Event) -> None:
        """Retry users whose backoff has expired, from their current source row."""
        e = self.engine
        now = e.clock()
        if not e.retries_may_be_due(now):
            return
        seen: set[str] = set()
        while not stop.is_set():
            # Users this cycle already sent wait for the next: one attempt per user per cycle.
            due = e.state.due_retries(now, e.settings.batch_size, before=self.started)
            keys = [k for k in due if k not in seen]
            if not keys:
                e.retries_checked()
                return
            seen.update(keys)
            rows = e.source.read_keys([e.source.key_from_text(k) for k in keys], stop=stop)
            batch = self.send(rows, retrying=True)
            self.finish(batch, retrying=True)
            self.forget_vanished(set(keys) - set(batch.keys))

    def plan(
        self,
        rows: Sequence[SourceRow],
        now: datetime,
        *,
        retrying: bool,
        mapped: list[Mapped] | None = None,
    ) -> tuple[list[Mapped], list[str], dict[str, Record], list[Action]]:
        """Map and compare a page (one state query): each row's payload, key, record, action.
        ``mapped``: users already mapped (those gone from the source), instead of ``rows``."""
        e = self.engine
        if mapped is None:
            identity = e.resolver is not None
            mapped = [map_row(row, e.settings.mapping, identity=identity) for row in rows]
        keys = [m.key for m in mapped]
        records = e.state.records(keys)
        actions = [
            decide(m, records.get(k), now, retrying=retrying)
            for m, k in zip(mapped, keys, strict=True)
        ]
        return mapped, keys, records, actions

    def preview(self, sample: int, seen: Any) -> Preview:
        """Read as :meth:`scan` and :meth:`retry_due` would, and only count what they would do."""
        e = self.engine
        size = e.settings.batch_size
        now = e.clock()
        tally: Counter[str] = Counter()
        pushed: list[str] = []
        attempted: set[str] = set()  # by the scan: the retry phase leaves them to the next cycle
        rows_read = 0

        def judge(rows: Sequence[SourceRow], retrying: bool) -> None:
            _, keys, _, actions = self.plan(rows, now, retrying=retrying)
            tally.update(action.name.lower() for action in actions)
            sent = [k for k, a in zip(keys, actions, strict=True) if a is Action.PUSH]
            if not retrying:
                attempted.update(sent)
            pushed.extend(sent)
            del pushed[sample:]

        _, rows = e.source.first_page(*self.start(seen), size)
        while rows:
            rows_read += len(rows)
            judge(rows, False)
            if len(rows) < size:
                break
            rows = e.source.read_page(Position(rows[-1].cursor, rows[-1].key), None, size)
        due = [k for k in e.state.due_retries(now, 1_000_000) if k not in attempted]
        for i in range(0, len(due), size):
            keys = due[i : i + size]
            judge(e.source.read_keys([e.source.key_from_text(k) for k in keys]), True)
        return Preview(self.watermark, rows_read, dict(tally), len(due), pushed)

    def send(
        self, rows: Sequence[SourceRow], *, retrying: bool, mapped: list[Mapped] | None = None
    ) -> _Batch:
        """Map and compare a page, and submit the pushes it needs (see :meth:`plan`)."""
        e = self.engine
        now = e.clock()
        mapped, keys, records, actions = self.plan(rows, now, retrying=retrying, mapped=mapped)
        sending = [i for i, action in enumerate(actions) if action is Action.PUSH]
        unresolved: dict[int, ApiResult | None] = {}
        if e.resolver is not None and sending:
            sending, unresolved = self.resolve(e.resolver, mapped, actions, sending)
        answers = e.pusher.submit([_payload(mapped[i]) for i in sending])
        return _Batch(rows, mapped, keys, records, actions, sending, answers, now, unresolved)

    def resolve(
        self, resolver: Resolver, mapped: list[Mapped], actions: list[Action], sending: list[int]
    ) -> tuple[list[int], dict[int, ApiResult | None]]:
        """Address the rows to push to their EUIDs (``source.identity``), resolving the unknown
        ones first; the rows still to push, and why the others have no EUID (their answer).

        A user who left is cleared only at an EUID already stored (never registered for it):
        without one they are recorded as left and nothing is sent."""
        # A row to push is named (map_row(identity=True) skips a row without a usable value),
        # unless its EUID is known already (a tracked user gone from the source).
        waiting = [i for i in sending if mapped[i].identity is not None and mapped[i].euid is None]
        if not waiting:
            return sending, {}
        leaving = {i for i in waiting if isinstance(mapped[i].result, Leave)}
        stored = resolver.known([v for i in leaving if (v := mapped[i].identity) is not None])
        values = [v for i in waiting if i not in leaving and (v := mapped[i].identity) is not None]
        resolution = resolver.resolve(values)
        self.tally["registered"] += resolution.registered
        euids = stored | resolution.euids
        ready, unresolved = [], {}
        for i in sending:
            value = mapped[i].identity
            euid = euids.get(value) if value is not None and i in waiting else None
            if euid is not None:
                mapped[i] = addressed(mapped[i], euid)
            elif i in leaving:
                result = mapped[i].result
                assert isinstance(result, Leave)
                mapped[i] = replace(mapped[i], result=replace(result, clears=None))
                actions[i] = Action.LEAVE
                continue
            elif value is not None and i in waiting:
                unresolved[i] = resolution.unresolved.get(value)
                continue
            ready.append(i)
        return ready, unresolved

    def finish(self, batch: _Batch, *, retrying: bool, sweep: bool = False) -> None:
        """Wait for a page's answers; record its outcomes and move the watermark, in one commit.

        Pages of retries and of the sweep by key (``sweep``) leave the watermark alone."""
        e = self.engine
        answers = batch.answers.result()
        results: dict[int, ApiResult | None] = dict(zip(batch.sending, answers, strict=True))
        results.update(batch.unresolved)
        updates, recorded, gave_up = [], [], []
        page: Counter[RowOutcome] = Counter()
        rows = zip(batch.mapped, batch.keys, batch.actions, strict=True)
        for i, (m, key, action) in enumerate(rows):
            previous = batch.records.get(key)
            update = settle(
                key, m, action, previous, results.get(i), batch.now, e.settings.retry, e.jitter()
            )
            done = action is not Action.PUSH or update is not None
            recorded.append(done)
            if update is not None:
                updates.append(update)
                if update.status is Status.RETRYING:
                    e.note_retry(update.next_attempt_at)
                elif update.status is Status.FAILED and action is Action.PUSH:
                    gave_up.append(GaveUp(key, update.euid, update.last_code, update.last_message))
            outcome = _outcome(action, update.status if update else None, done)
            if outcome is RowOutcome.DEFERRED:
                self.deferred.add(key)
            else:
                page[outcome] += 1
        if retrying and self.deferred:
            self.deferred.difference_update(batch.keys)
        self.tally.update(page)
        self.tally["rows_read"] += len(batch.rows)

        watermark = self.watermark
        ceiling = self.horizon.ceiling
        if not retrying and not sweep:
            positions = [Position(row.cursor, row.key) for row in batch.rows]
            if ceiling is not None and positions[-1].cursor > ceiling:  # in order: a suffix
                self.ahead_rows += sum(1 for p in positions if p.cursor > ceiling)
                self.ahead_by = positions[-1].cursor - ceiling
            if not self.held:
                watermark = advance(self.watermark, positions, recorded, ceiling)
                self.held = not all(recorded) or (
                    ceiling is not None and positions[-1].cursor > ceiling
                )
        moved = watermark if watermark != self.watermark else None
        e.state.commit_page(updates, moved, batch.now, self.horizon.seen)
        self.watermark = watermark

        fatal = next(
            (r for r in results.values() if r is not None and r.verdict is Verdict.FATAL), None
        )
        refused = None if fatal is None else FatalApiError(fatal.code, fatal.status, fatal.message)
        e.observer.page_recorded(
            PageReport(
                e.settings.name,
                self.run_id,
                len(batch.rows),
                len(batch.sending),
                page,
                self.counts(),
                retrying,
                watermark,
                bool(updates) or moved is not None,
                self.estimated,
                tuple(gave_up),
                refused,
            )
        )
        if refused is not None:
            raise refused

    def audit(self, stop: threading.Event) -> None:
        """Sweep the next slice of the table in key order; re-queue users out of step.

        Only rows the poller is done with are judged: behind the watermark (and, in timestamp
        mode, behind its lookback window, which the next cycle reads again anyway). A re-queued
        user is due at once, so the retry phase of this very cycle pushes its current row.
        """
        e = self.engine
        if self.watermark is None:
            return
        self.find_deleted(min(e.settings.audit_rows, e.settings.batch_size))
        if e.source.spec.gap_free:
            settled = _settled(self.watermark, None, e._progress.reach_checked_at is not None)
        else:
            window = self.window(self.horizon.seen or e._seen)
            settled = _settled(*window, e._progress.reach_checked_at is not None)
        budget = e.settings.audit_rows
        after = e.state.audit_position()
        while budget > 0 and not stop.is_set():
            size = min(budget, e.settings.batch_size)
            rows = e.source.read_by_key(after, size, stop=stop)
            if not rows and after is not None:  # the last slice ended exactly at the end
                after = None
                continue
            budget -= len(rows)
            after = rows[-1].key if len(rows) == size else None  # a short page: wrap around
            judged = [r for r in rows if settled(r)]
            identity = e.resolver is not None
            mapped = [map_row(r, e.settings.mapping, identity=identity) for r in judged]
            records = e.state.records([m.key for m in mapped])
            out = [(m.key, m.euid) for m in mapped if missed(m, records.get(m.key))]
            now = e.clock()
            e.state.requeue([k for k, _ in out], [euid for _, euid in out], now, after)
            if out:
                e.note_retry(now)
            self.tally["audit_checked"] += len(judged)
            self.tally["audit_misses"] += len(out)
            audited = AuditSlice(e.settings.name, self.run_id, len(judged), len(out))
            e.observer.slice_audited(audited)
            if after is None:
                return

    def find_deleted(self, size: int) -> None:
        """Check the next slice of tracked users against the source, by key (one query each
        side): those whose row is gone were deleted, and leave the sync."""
        e = self.engine
        keys = e.state.tracked_keys(e.state.tracked_position(), size)
        e.state.store_tracked_position(keys[-1] if len(keys) == size else None, e.clock())
        typed = {}
        for key in keys:
            if not is_digest(key):  # a key recorded under its digest cannot be read back
                with suppress(ValueError):  # nor can text that is no key of this column's type
                    typed[key] = e.source.key_from_text(key)
        rows = e.source.read_keys(list(typed.values()))
        vanished = set(typed) - {status_key(row.key)[0] for row in rows}
        if vanished:
            log.warning("audit_found_deleted", sync=e.settings.name, users=len(vanished))
            self.tally["audit_misses"] += len(vanished)
            self.forget_vanished(vanished)

    def forget_vanished(self, keys: set[str]) -> None:
        """Tracked users whose row is gone from the source have left the sync (a hard delete):
        cleared in EngageLab with ``on_leave: clear``, and recorded as left either way."""
        if not keys:
            return
        e = self.engine
        euids = e.state.euids(sorted(keys))
        gone = [
            leave(SourceRow(key, None, euid, {}), key, euid, VANISHED, e.settings.mapping)
            for key, euid in euids.items()
        ]
        self.finish(self.send([], retrying=True, mapped=gone), retrying=True)

    def counts(self) -> CycleCounts:
        return CycleCounts.of({**self.tally, RowOutcome.DEFERRED: len(self.deferred)})


def _settled(after: Position | None, start: Any, swept: bool) -> Callable[[SourceRow], bool]:
    """Whether the poller is done with a row: behind where the next scan starts, strictly after
    ``after`` or from ``start`` (:meth:`_Cycle.window`; in xid8 mode after the watermark). A
    row with no cursor (NULL or infinite) is done once the sweep by key has finished (``swept``).
    """

    def done(row: SourceRow) -> bool:
        if row.cursor is None:
            return swept
        if after is not None:
            return bool((row.cursor, row.key) <= (after.cursor, after.key))
        return bool(row.cursor < start)

    return done


def _payload(mapped: Mapped) -> Payload:
    result = mapped.result
    payload = result if isinstance(result, Payload) else result.clears
    assert payload is not None, "decide() pushes only payloads and clearing requests"
    return payload


def _outcome(action: Action, status: Status | None, done: bool) -> RowOutcome:
    """What the cycle did with a row, from the decision and the user's new status."""
    if action is Action.PUSH:
        if not done:
            return RowOutcome.UNSENT
        assert status is not None, "a push recorded has a status"
        return _SENT[status]
    return _NOT_SENT[action]


# A push's new status names its outcome; LEFT: a user who left, cleared (on_leave: clear).
_SENT = {status: RowOutcome(status.value) for status in Status}


_NOT_SENT = {
    Action.UNCHANGED: RowOutcome.UNCHANGED,
    Action.CONFIRM: RowOutcome.UNCHANGED,
    Action.DEFER: RowOutcome.DEFERRED,
    Action.SKIP: RowOutcome.SKIPPED,
    Action.LEAVE: RowOutcome.LEFT,  # a user who left, with nothing to clear: no call
}
