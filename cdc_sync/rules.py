"""The decisions of a sync, as pure functions over plain values.

* :func:`decide` — given a mapped row and what the status table says about that user, what to do;
* :func:`settle` — given that decision and the API's answer, the user's new status row;
* :func:`backoff` — when a transiently failed user is tried again;
* :func:`advance` — how far the watermark may move after a page;
* :func:`reread_from` — where the next cycle starts reading, to catch rows that commit late.

None of these touch a database or the network, so they are pinned by tables and properties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from cdc_sync.engagelab import ApiResult, Verdict
from cdc_sync.mapping import Leave, Mapped, Skip
from cdc_sync.redact import clean, digits

CODE_MIN, CODE_MAX = -(2**31), 2**31 - 1  # the range of cdc_sync_status.last_code


class Status(StrEnum):
    """A user's state in the sync-status table."""

    SYNCED = "synced"  # EngageLab holds the payload whose hash is ``pushed_hash``
    RETRYING = "retrying"  # a transient failure; tried again at ``next_attempt_at``
    FAILED = "failed"  # a permanent failure, or too many transient ones; waits for a change
    SKIPPED = "skipped"  # nothing to push (bad euid, no contacts); waits for a change
    LEFT = "left"  # out of the sync (consent withdrawn, deleted); cleared if on_leave is clear


class Action(StrEnum):
    """What one cycle does with one row."""

    PUSH = "push"  # send it
    UNCHANGED = "unchanged"  # nothing new since the last outcome: no call, no write
    DEFER = "defer"  # a retry is pending and not due; the retry queue will send it
    SKIP = "skip"  # record why it is not sent, no call
    CONFIRM = "confirm"  # the row came back to what EngageLab already holds: mark synced, no call
    LEAVE = "leave"  # the user left the sync and nothing is to be cleared: record it, no call


@dataclass(frozen=True, slots=True)
class Record:
    """What the sync-status table holds about one user (the part decisions need)."""

    status: Status
    pushed_hash: str | None
    attempted_hash: str | None
    attempts: int
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class Retry:
    """The backoff policy for transient failures."""

    base: timedelta
    cap: timedelta
    max_attempts: int


@dataclass(frozen=True, slots=True)
class Update:
    """A user's new status row. ``None`` in a ``*_at``/hash field means: keep what is stored."""

    key: str
    euid: int | None
    status: Status
    pushed_hash: str | None
    attempted_hash: str
    attempts: int
    last_code: int | None
    last_message: str
    attempted_at: datetime | None
    succeeded_at: datetime | None
    next_attempt_at: datetime | None


def decide(
    mapped: Mapped, record: Record | None, now: datetime, *, retrying: bool = False
) -> Action:
    """What to do with a row. ``retrying`` is set when the row was re-read for a due retry."""
    h = mapped.hash
    if isinstance(mapped.result, Leave):
        if record is not None and record.status is Status.LEFT and record.attempted_hash == h:
            return Action.UNCHANGED
        holds_values = record is not None and record.pushed_hash not in (None, h)
        if mapped.result.clears is None or not holds_values:
            return Action.LEAVE
        # on_leave is clear and EngageLab holds what cdc-sync pushed: empty it, as a push.
    elif isinstance(mapped.result, Skip):
        holds_values = record is not None and record.pushed_hash not in (None, h)
        if mapped.result.clears is None or not holds_values:
            if record and record.status is Status.SKIPPED and record.attempted_hash == h:
                return Action.UNCHANGED
            return Action.SKIP
        # Every contact became empty and clearing is on: empty what EngageLab still holds.
    if record is None:
        return Action.PUSH
    if record.pushed_hash == h:
        return Action.UNCHANGED if record.status is Status.SYNCED else Action.CONFIRM
    if record.attempted_hash == h:
        if record.status is Status.FAILED:
            return Action.UNCHANGED
        if record.status is Status.RETRYING and not retrying:
            due = record.next_attempt_at is None or record.next_attempt_at <= now
            return Action.PUSH if due else Action.DEFER
    return Action.PUSH


def backoff(attempts: int, policy: Retry, jitter: float) -> timedelta:
    """Delay before attempt ``attempts + 1``: doubling from ``base``, capped, with equal jitter.

    ``jitter`` in [0, 1) spreads the delay over its upper half so users that failed together do
    not all come back in the same second.
    """
    exponent = min(max(attempts - 1, 0), 32)
    delay: timedelta = min(policy.base * (2**exponent), policy.cap)
    return delay * (0.5 + jitter / 2)


def settle(
    key: str,
    mapped: Mapped,
    action: Action,
    record: Record | None,
    result: ApiResult | None,
    now: datetime,
    policy: Retry,
    jitter: float = 0.0,
) -> Update | None:
    """The new status row for ``key``, or None when nothing needs writing.

    ``result`` is the API's answer for a PUSH; a PUSH without one (never sent, because the cycle
    stopped on a fatal answer) or refused for the whole sync writes nothing, so the row is read
    again next cycle.
    """
    h = mapped.hash
    euid = mapped.euid
    pushed = record.pushed_hash if record else None
    if action in (Action.UNCHANGED, Action.DEFER):
        return None
    if action is Action.SKIP:
        assert isinstance(mapped.result, Skip)
        reason = clean(mapped.result.reason)
        return Update(key, euid, Status.SKIPPED, pushed, h, 0, None, reason, None, None, None)
    if action is Action.LEAVE:
        assert isinstance(mapped.result, Leave)
        reason = clean(mapped.result.reason)
        return Update(key, euid, Status.LEFT, pushed, h, 0, None, reason, None, None, None)
    if action is Action.CONFIRM:
        return Update(
            key,
            euid,
            Status.SYNCED,
            pushed,
            h,
            0,
            None,
            "unchanged since last push",
            None,
            None,
            None,
        )
    if result is None or result.verdict is Verdict.FATAL:
        return None  # not this user's doing: read the row again once the sync may proceed
    prior = record.attempts if record and record.attempted_hash == h else 0
    code, message = stored_answer(result)
    if result.verdict is Verdict.SUCCESS:
        if isinstance(mapped.result, Leave):  # the clearing request of a user who left
            message = clean(f"{mapped.result.reason}; contacts cleared in EngageLab")
            return Update(key, euid, Status.LEFT, h, h, 0, code, message, now, now, None)
        return Update(key, euid, Status.SYNCED, h, h, 0, code, message, now, now, None)
    attempts = prior + 1
    if result.verdict is Verdict.TRANSIENT and attempts < policy.max_attempts:
        delay = backoff(attempts, policy, jitter)
        if result.retry_after is not None:  # honoured up to retry.max, the longest wait
            wait = min(result.retry_after, policy.cap.total_seconds())
            delay = max(delay, timedelta(seconds=wait))
        return Update(
            key, euid, Status.RETRYING, pushed, h, attempts, code, message, now, None, now + delay
        )
    if result.verdict is Verdict.TRANSIENT:
        message = clean(f"gave up after {attempts} attempts: {message}")
    return Update(key, euid, Status.FAILED, pushed, h, attempts, code, message, now, None, None)


def stored_answer(result: ApiResult) -> tuple[int | None, str]:
    """An answer's code and message as the status table stores them.

    ``last_code`` is a 32-bit column: a code outside its range is stored as NULL and written
    at the head of the message instead (``code 3000000000: ...``), never clamped to a value
    that could be mistaken for a real code. The message is cut and cleaned (it normally is
    already: :func:`~cdc_sync.engagelab.classify` redacts and cleans what it returns).
    """
    message = result.message or result.verdict.value
    code = result.code
    if code is not None and not CODE_MIN <= code <= CODE_MAX:
        message, code = f"code {digits(code)}: {message}", None
    return code, clean(message)


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in the source's ``(cursor, key)`` order."""

    cursor: Any
    key: Any


def advance(
    current: Position | None,
    page: Sequence[Position],
    recorded: Sequence[bool],
    ceiling: Any = None,
) -> Position | None:
    """The watermark after a page: the last row of the longest fully recorded prefix, never lower.

    ``page`` is in ``(cursor, key)`` order and ``recorded[i]`` says whether row i's outcome is
    durable. A row that was not recorded (the cycle stopped before it was sent) holds the watermark
    before it, so it is read again; rows after it that were recorded are re-read and found
    unchanged, at the cost of a hash comparison. A row whose cursor is beyond ``ceiling`` (the
    source's clock) holds it too: it was stamped by a clock running ahead, and moving past it
    would skip rows that commit later with honest timestamps.
    """
    best = current
    for position, done in zip(page, recorded, strict=True):
        if not done or (ceiling is not None and position.cursor > ceiling):
            break
        if best is None or (position.cursor, position.key) > (best.cursor, best.key):
            best = position
    return best


def reread_from(
    watermark: Position | None, lookback: Any, seen: Any = None
) -> tuple[Position | None, Any]:
    """Where a cycle starts reading, as ``(after, start)``: strictly after the position
    ``after``, or from the cursor value ``start`` inclusive (both None: from the top).

    ``seen`` is the previous cycle's horizon: the time up to which every commit was visible to
    its first read (the source's clock on a primary; on a standby how far replay had got). None
    when unknown (a restart before the migration, a numeric cursor, SQLite): then the window is
    ``lookback`` behind the watermark, as it always was.

    Why ``seen - lookback`` is far enough back. The lookback is the promise that a transaction
    commits (becomes visible) within ``lookback`` of the cursor value it stamps, its start time
    or later. A row the previous read could not see belongs to a transaction that had not
    committed by ``seen``, so it stamped a cursor after ``seen - lookback``. Every row stamped
    before that was visible to the previous read, and the previous cycle read every visible row
    from its own start on, up to where the watermark now stands (the watermark only moves over
    rows read and recorded; rows before that cycle's start are the same argument one cycle
    earlier). So only rows stamped at or after ``seen - lookback`` can be new behind the
    watermark. When that edge is past the watermark's cursor, nothing behind the watermark can
    be new, and the cycle resumes strictly after it: rows tied at the watermark's value are not
    re-read either. The old window, ``lookback`` behind the watermark, is anchored to the last
    change instead of to time: after a burst it re-read the whole burst every idle cycle until
    the next write. An older ``seen`` paired with a newer watermark (the horizon is stored only
    when the watermark moves) only widens the window, which is always safe.
    """
    if watermark is None:
        return None, None
    if seen is None:
        return None, watermark.cursor - lookback
    edge = seen - lookback
    if edge > watermark.cursor:
        return watermark, None
    return None, edge


def missed(mapped: Mapped, record: Record | None) -> bool:
    """Whether the audit should re-queue a user the poller is done with.

    In step means: EngageLab holds this payload (``pushed_hash``), or its outcome is recorded or
    pending (``attempted_hash``: retrying, failed, or skipped for this very content). A row
    whose key the status table cannot hold is never re-queued: it could not be read back by key.
    """
    if isinstance(mapped.result, Skip) and mapped.result.key_refused:
        return False
    return record is None or mapped.hash not in (record.pushed_hash, record.attempted_hash)
