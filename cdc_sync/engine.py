"""One sync cycle: the only place that orders read → map → compare → push → record → advance.

A cycle scans the source from the watermark minus the lookback, page by page, then works through
the users whose transient failure is due for another attempt (re-reading each one's *current* row,
so a stale payload is never sent). Every decision is delegated to :mod:`cdc_sync.rules`.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from cdc_sync.engagelab import ApiResult, Verdict
from cdc_sync.errors import CdcSyncError, FatalApiError
from cdc_sync.mapping import Mapped, Payload, Skip, SourceRow, map_row
from cdc_sync.rules import Action, Position, Retry, Status, advance, decide, missed, settle
from cdc_sync.source import Horizon, Source, lookback_start
from cdc_sync.state import RunCounts, StateStore

log = structlog.get_logger("cdc_sync.engine")


class Pusher(Protocol):
    """What the engine needs from the EngageLab client."""

    def push_all(self, payloads: Sequence[Payload]) -> list[ApiResult | None]: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CycleReport:
    """What one cycle did; also written to the run history."""

    run_id: int
    outcome: str  # ok | stopped | fatal | error
    counts: RunCounts
    watermark_before: Position | None
    watermark_after: Position | None
    error: str | None = None


@dataclass(frozen=True)
class EngineSettings:
    name: str
    batch_size: int
    lookback: timedelta | int
    retry: Retry
    audit_rows: int = 0  # rows the audit sweep reads per cycle; 0: no audit


class Engine:
    """Runs cycles for one sync. Collaborators are passed in; only the CLI builds real ones."""

    def __init__(
        self,
        settings: EngineSettings,
        source: Source,
        state: StateStore,
        pusher: Pusher,
        *,
        clock: Callable[[], datetime] = utcnow,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.source = source
        self.state = state
        self.pusher = pusher
        self.clock = clock
        self.jitter = jitter

    def run_cycle(self, stop: threading.Event | None = None) -> CycleReport:
        """Run one cycle. ``stop`` is checked between pages: the page in flight is always finished
        and recorded. A fatal API answer is recorded in the run history and re-raised."""
        stop = stop or threading.Event()
        before = self.state.watermark()
        run_id = self.state.start_run(self.clock(), before)
        cycle = _Cycle(self, before)
        log.info("cycle_started", sync=self.settings.name, run_id=run_id)
        outcome, error = "ok", None
        try:
            cycle.horizon = self.source.horizon()
            cycle.scan(stop)
            if self.settings.audit_rows and not stop.is_set():
                cycle.audit(stop)
            if not stop.is_set():
                cycle.retry_due(stop)
            if stop.is_set():
                outcome = "stopped"
        except FatalApiError as exc:
            outcome, error = "fatal", str(exc)
            raise
        except CdcSyncError as exc:
            outcome, error = "error", str(exc)
            raise
        except Exception as exc:
            outcome, error = "error", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            counts = cycle.counts()
            lag = cycle.horizon.replica_lag
            self.state.finish_run(
                run_id, self.clock(), outcome, counts, cycle.watermark, error, lag
            )
            log.info(
                "cycle_finished",
                sync=self.settings.name,
                run_id=run_id,
                outcome=outcome,
                replica_lag_s=lag,
                **counts.as_dict(),
            )
        return CycleReport(run_id, outcome, counts, before, cycle.watermark, error)


class _Cycle:
    """The mutable bookkeeping of one cycle (watermark so far, counters)."""

    def __init__(self, engine: Engine, watermark: Position | None) -> None:
        self.engine = engine
        self.watermark = watermark
        self.horizon = Horizon()
        self.tally: Counter[str] = Counter()

    def scan(self, stop: threading.Event) -> None:
        e = self.engine
        size = e.settings.batch_size
        after: Position | None = None
        start = None
        if e.source.spec.gap_free:
            after = self.watermark  # exact: nothing can commit behind it
        else:
            start = lookback_start(self.watermark, e.settings.lookback)
        while True:
            rows = e.source.read_page(after, start, size)
            if not rows:
                return
            self.process(rows, retrying=False)
            after = Position(rows[-1].cursor, rows[-1].key)
            if len(rows) < size or stop.is_set():
                return

    def retry_due(self, stop: threading.Event) -> None:
        """Retry users whose backoff has expired, from their current source row."""
        e = self.engine
        now = e.clock()
        seen: set[str] = set()
        while not stop.is_set():
            keys = [k for k in e.state.due_retries(now, e.settings.batch_size) if k not in seen]
            if not keys:
                return
            seen.update(keys)
            rows = e.source.read_keys([e.source.key_from_text(k) for k in keys])
            self.process(rows, retrying=True)
            self.forget_vanished(set(keys) - {str(r.key) for r in rows})

    def process(self, rows: Sequence[SourceRow], *, retrying: bool) -> None:
        """Map, compare, push and record one page; move the watermark over what is recorded."""
        e = self.engine
        now = e.clock()
        salt = e.settings.name
        mapped = [map_row(row, salt=salt) for row in rows]
        keys = [str(row.key) for row in rows]
        records = e.state.records(keys)
        actions = [
            decide(m, records.get(k), now, retrying=retrying)
            for m, k in zip(mapped, keys, strict=True)
        ]
        sending = [i for i, action in enumerate(actions) if action is Action.PUSH]
        answers = e.pusher.push_all([_payload(mapped[i]) for i in sending])
        results: dict[int, ApiResult | None] = dict(zip(sending, answers, strict=True))

        updates, recorded = [], []
        for i, (m, key, action) in enumerate(zip(mapped, keys, actions, strict=True)):
            result = results.get(i)
            update = settle(
                key, m, action, records.get(key), result, now, e.settings.retry, e.jitter()
            )
            done = action is not Action.PUSH or update is not None
            recorded.append(done)
            if update is not None:
                updates.append(update)
            self.tally[_count_name(action, update.status if update else None, done)] += 1
        self.tally["rows_read"] += len(rows)

        watermark = self.watermark
        if not retrying:
            positions = [Position(row.cursor, row.key) for row in rows]
            watermark = advance(self.watermark, positions, recorded, self.horizon.ceiling)
        e.state.commit_page(updates, watermark, now)
        self.watermark = watermark
        log.info("page_recorded", sync=salt, rows=len(rows), pushed=len(sending), retrying=retrying)

        fatal = next((r for r in answers if r is not None and r.verdict is Verdict.FATAL), None)
        if fatal is not None:
            log.critical(
                "engagelab_refused",
                sync=salt,
                code=fatal.code,
                status=fatal.status,
                message=fatal.message,
            )
            raise FatalApiError(fatal.code, fatal.status, fatal.message)

    def audit(self, stop: threading.Event) -> None:
        """Sweep the next slice of the table in key order; re-queue users out of step.

        Only rows the poller is done with are judged: behind the watermark (and, in timestamp
        mode, behind its lookback window, which the next cycle reads again anyway). A re-queued
        user is due at once, so the retry phase of this very cycle pushes its current row.
        """
        e = self.engine
        if self.watermark is None:
            return
        done_below = (
            self.watermark if e.source.spec.gap_free
            else Position(lookback_start(self.watermark, e.settings.lookback), None)
        )
        budget = e.settings.audit_rows
        after = e.state.audit_position()
        while budget > 0 and not stop.is_set():
            size = min(budget, e.settings.batch_size)
            rows = e.source.read_by_key(after, size)
            if not rows and after is not None:  # the last slice ended exactly at the end
                after = None
                continue
            budget -= len(rows)
            after = rows[-1].key if len(rows) == size else None  # a short page: wrap around
            judged = [r for r in rows if _behind(r, done_below, e.source.spec.gap_free)]
            mapped = [map_row(r, salt=e.settings.name) for r in judged]
            keys = [str(r.key) for r in judged]
            records = e.state.records(keys)
            out = [(k, m.euid) for k, m in zip(keys, mapped, strict=True)
                   if missed(m, records.get(k))]
            e.state.requeue([k for k, _ in out], [euid for _, euid in out], e.clock(), after)
            self.tally["audit_checked"] += len(judged)
            self.tally["audit_misses"] += len(out)
            if out:
                log.warning("audit_found_misses", sync=e.settings.name, users=len(out))
            if after is None:
                return

    def forget_vanished(self, keys: set[str]) -> None:
        """Users due for a retry whose row is gone from the source are recorded as skipped."""
        if not keys:
            return
        e = self.engine
        now = e.clock()
        records = e.state.records(sorted(keys))
        updates = []
        for key, record in records.items():
            # An empty hash matches no payload, so the row is pushed if it ever comes back.
            mapped = Mapped(SourceRow(key, None, None, {}), _VANISHED, "")
            update = settle(key, mapped, Action.SKIP, record, None, now, e.settings.retry)
            assert update is not None
            updates.append(update)
        e.state.commit_page(updates, None, now)
        self.tally["skipped"] += len(updates)

    def counts(self) -> RunCounts:
        return RunCounts(**{name: self.tally[name] for name in RunCounts.names()})


_VANISHED = Skip("row no longer in the source")


def _behind(row: SourceRow, limit: Position, exact: bool) -> bool:
    if exact:
        return (row.cursor, row.key) <= (limit.cursor, limit.key)
    return bool(row.cursor < limit.cursor)


def _payload(mapped: Mapped) -> Payload:
    assert isinstance(mapped.result, Payload)
    return mapped.result


def _count_name(action: Action, status: Status | None, done: bool) -> str:
    if action is Action.PUSH:
        if not done:
            return "unsent"
        return {Status.SYNCED: "pushed", Status.RETRYING: "retrying"}.get(status, "failed")  # type: ignore[arg-type]
    return {
        Action.UNCHANGED: "unchanged",
        Action.CONFIRM: "unchanged",
        Action.DEFER: "deferred",
        Action.SKIP: "skipped",
    }[action]
