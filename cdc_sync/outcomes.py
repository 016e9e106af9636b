"""What a cycle did, in one vocabulary: how a run ended, what happened to each row, the counts.

Every other module — the engine, the run history (``cdc_sync_runs``), the log, ``status``,
``once``'s summary — takes these names from here, so they cannot drift apart:

* :class:`RunOutcome` — how one cycle (one row of ``cdc_sync_runs``) ended;
* :class:`RowOutcome` — what one cycle did with one row it read (exactly one per row);
* :class:`CycleCounts` — one cycle's counters, each saying what it counts (:class:`Unit`);
* :class:`CycleStart`, :class:`PageReport`, :class:`AuditSlice`, :class:`CycleReport` — what
  the engine tells its observers (``engine.Observer``) as cycles start, pages land, the audit
  moves on, and cycles end.

Pure values: nothing here touches a database or the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any

from cdc_sync.errors import FatalApiError
from cdc_sync.rules import Position


class RunOutcome(StrEnum):
    """How a cycle ended, as written to ``cdc_sync_runs.outcome``."""

    RUNNING = "running"  # under way (or its process died and no cycle has run since)
    OK = "ok"  # read to the end of the table and through the due retries
    STOPPED = "stopped"  # a signal or a lost lock ended it after the page in flight
    FATAL = "fatal"  # EngageLab refused the sync (credentials, project): no request sent after
    ERROR = "error"  # a database or unexpected error ended it
    ABANDONED = "abandoned"  # its process ended without finishing it (SIGKILL, power loss)


class RowOutcome(StrEnum):
    """What a cycle did with one row it read; each value is also a :class:`CycleCounts` field."""

    SYNCED = "synced"  # sent, and EngageLab accepted it
    UNCHANGED = "unchanged"  # nothing new since the last outcome (or back to what EngageLab holds)
    RETRYING = "retrying"  # sent, failed transiently: tried again later
    DEFERRED = "deferred"  # a retry is pending and not yet due: the retry queue will send it
    FAILED = "failed"  # sent, failed permanently (or too many transient failures in a row)
    SKIPPED = "skipped"  # not sendable (bad key or euid, a bad value, no contacts): recorded why
    LEFT = "left"  # left the sync (consent withdrawn, deleted): cleared (on_leave), or recorded
    UNSENT = "unsent"  # not sent: the cycle stopped on a fatal answer; read again next cycle


class Unit(StrEnum):
    """What a count counts."""

    ROWS = "rows"  # source rows read (a row read twice in one cycle counts twice)
    USERS = "users"  # users whose row this cycle handled, by what it did with it


def _count(unit: Unit, meaning: str) -> Any:
    return field(default=0, metadata={"unit": unit, "meaning": meaning})


@dataclass(frozen=True, slots=True)
class CycleCounts:
    """What one cycle did. Each field's ``unit`` and ``meaning`` are in its metadata
    (:meth:`unit`, :meth:`meaning`); the run history has a column of the same name."""

    rows_read: int = _count(Unit.ROWS, "read from the source, by the scan and for retries")
    synced: int = _count(Unit.USERS, "sent and accepted by EngageLab")
    unchanged: int = _count(Unit.USERS, "nothing new to send")
    retrying: int = _count(Unit.USERS, "sent, failed transiently, to be tried again")
    deferred: int = _count(Unit.USERS, "a retry pending, not yet due")
    failed: int = _count(Unit.USERS, "sent, failed permanently or retries exhausted")
    skipped: int = _count(Unit.USERS, "not sendable (bad key or euid, a bad value, no contacts)")
    left: int = _count(
        Unit.USERS, "left the sync (consent withdrawn, deleted): cleared in EngageLab, or recorded"
    )
    registered: int = _count(Unit.USERS, "given an EUID by register (source.identity)")
    audit_checked: int = _count(Unit.ROWS, "compared by the audit with the tracking table")
    audit_misses: int = _count(Unit.USERS, "found out of step by the audit and re-queued")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def unit(cls, name: str) -> Unit:
        unit: Unit = _field(cls, name).metadata["unit"]
        return unit

    @classmethod
    def meaning(cls, name: str) -> str:
        meaning: str = _field(cls, name).metadata["meaning"]
        return meaning

    @classmethod
    def comment(cls, name: str) -> str:
        """What the run-history column of this count says it counts."""
        return f"{cls.unit(name)}: {cls.meaning(name)}"

    @classmethod
    def of(cls, tally: Mapping[str, int]) -> CycleCounts:
        """The counts in ``tally`` (by field name); names it lacks are 0, others are ignored."""
        return cls(**{name: tally.get(name, 0) for name in cls.names()})

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.names()}


def _field(cls: type[CycleCounts], name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(name)


@dataclass(frozen=True, slots=True)
class CycleStart:
    """A cycle has started: its run row exists."""

    sync: str
    run_id: int
    started_at: datetime
    watermark: Position | None
    abandoned: int = 0  # runs a killed process left running, closed as abandoned just now


@dataclass(frozen=True, slots=True)
class GaveUp:
    """A user who failed for good in this page: permanently, or out of retries."""

    key: str
    euid: int | None
    code: int | None
    message: str


@dataclass(frozen=True, slots=True)
class PageReport:
    """One page recorded: its outcomes and the watermark are durable.

    ``outcomes`` counts this page's rows by :class:`RowOutcome`, all but ``deferred``: a user the
    scan defers may be sent by the retry phase of the same cycle, so the cycle counts its
    deferred users when it ends. ``total`` is the cycle's counts so far, this page included.
    ``retrying`` marks a page of the retry phase (rows re-read for due retries) rather than of
    the scan. ``wrote``: the page changed the tracking tables (an idle page of the lookback
    window does not). ``rows_estimated``: the scan's estimate of the rows it will read, when it
    met a backlog.
    """

    sync: str
    run_id: int
    rows: int
    sent: int
    outcomes: Mapping[RowOutcome, int]
    total: CycleCounts
    retrying: bool
    watermark: Position | None
    wrote: bool
    rows_estimated: int | None
    gave_up: tuple[GaveUp, ...] = ()
    refused: FatalApiError | None = None  # EngageLab refused the sync on this page


@dataclass(frozen=True, slots=True)
class AuditSlice:
    """One slice of the audit's sweep by key judged, and its misses re-queued (durable)."""

    sync: str
    run_id: int
    checked: int  # rows compared with the tracking table
    misses: int  # users found out of step and re-queued


@dataclass(frozen=True)
class CycleReport:
    """What one cycle did; also written to the run history."""

    sync: str
    run_id: int
    outcome: RunOutcome
    counts: CycleCounts
    watermark_before: Position | None
    watermark_after: Position | None
    started_at: datetime
    finished_at: datetime
    error: str | None = None
    replica_lag: float | None = None  # seconds the source replica was behind (None: no replica)
    rows_estimated: int | None = None  # rows the scan expected to read, when it met a backlog
    source_clock: Any = None  # the source's clock in the cursor's type (None: not a timestamp)
    caught_up: bool = False  # the scan read to the end and the watermark followed it

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a long scan has got: from rows done, rows estimated and seconds elapsed."""

    done: int
    estimated: int
    seconds: float

    @property
    def total(self) -> int:
        """The estimate, or the rows done where the table grew past it."""
        return max(self.done, self.estimated)

    @property
    def rate(self) -> float:
        """Rows a second so far."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def remaining_seconds(self) -> float | None:
        """At the rate so far (None: no rate yet)."""
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None


def describe(position: Position | None) -> str | None:
    """A human form of a watermark for run history, logs and status output."""
    if position is None:
        return None
    return json.dumps([_plain(position.cursor), _plain(position.key)])


def _plain(value: Any) -> Any:
    return value if isinstance(value, int | str) else str(value)
