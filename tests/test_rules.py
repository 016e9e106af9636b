"""The pure decisions: decide, settle, backoff, advance and reread_from."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_sync.engagelab import ApiResult, Verdict
from cdc_sync.mapping import Payload, Policy, SourceRow, map_row
from cdc_sync.rules import (
    Action,
    Position,
    Record,
    Retry,
    Status,
    advance,
    backoff,
    decide,
    missed,
    reread_from,
    settle,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
POLICY = Retry(timedelta(seconds=30), timedelta(hours=1), max_attempts=5)
PUSHABLE = map_row(SourceRow(1, 1, 7, {"email": "a@b.c"}), Policy("s"))
OTHER = map_row(SourceRow(1, 1, 7, {"email": "x@b.c"}), Policy("s"))
SKIPPED = map_row(SourceRow(1, 1, "bad", {"email": "a@b.c"}), Policy("s"))
EMPTIED = map_row(SourceRow(1, 1, 7, {"email": None}), Policy("s", True))
H, X, S, E = PUSHABLE.hash, OTHER.hash, SKIPPED.hash, EMPTIED.hash
LATER, EARLIER = NOW + timedelta(minutes=1), NOW - timedelta(minutes=1)

OK = ApiResult(Verdict.SUCCESS, 0, 200, "success")
FLAKY = ApiResult(Verdict.TRANSIENT, -1, 500, "internal error")
BAD = ApiResult(Verdict.PERMANENT, 55004, 400, "bad parameter")
REFUSED = ApiResult(Verdict.FATAL, 50031, 401, "project id invalid")


def rec(
    status: Status,
    pushed: str | None,
    attempted: str | None,
    attempts: int = 0,
    next_at: datetime | None = None,
) -> Record:
    return Record(status, pushed, attempted, attempts, next_at)


@pytest.mark.parametrize(
    ("mapped", "record", "retrying", "expected"),
    [
        (PUSHABLE, None, False, Action.PUSH),
        (PUSHABLE, rec(Status.SYNCED, H, H), False, Action.UNCHANGED),
        (PUSHABLE, rec(Status.SYNCED, X, X), False, Action.PUSH),
        (PUSHABLE, rec(Status.RETRYING, X, H, 1, LATER), False, Action.DEFER),
        (PUSHABLE, rec(Status.RETRYING, X, H, 1, EARLIER), False, Action.PUSH),
        (PUSHABLE, rec(Status.RETRYING, X, H, 1, LATER), True, Action.PUSH),
        (PUSHABLE, rec(Status.RETRYING, None, X, 1, LATER), False, Action.PUSH),  # newer change
        (PUSHABLE, rec(Status.RETRYING, H, X, 1, LATER), False, Action.CONFIRM),  # changed back
        (PUSHABLE, rec(Status.FAILED, None, H, 1), False, Action.UNCHANGED),
        (PUSHABLE, rec(Status.FAILED, None, X, 1), False, Action.PUSH),
        (PUSHABLE, rec(Status.SKIPPED, None, S), False, Action.PUSH),
        (SKIPPED, None, False, Action.SKIP),
        (SKIPPED, rec(Status.SKIPPED, None, S), False, Action.UNCHANGED),
        (SKIPPED, rec(Status.SYNCED, H, H), False, Action.SKIP),
        (EMPTIED, None, False, Action.SKIP),  # nothing to clear in EngageLab
        (EMPTIED, rec(Status.SKIPPED, None, E), False, Action.UNCHANGED),
        (EMPTIED, rec(Status.SYNCED, H, H), False, Action.PUSH),  # clear what it holds
        (EMPTIED, rec(Status.SYNCED, E, E), False, Action.SKIP),  # cleared already: record why
        (EMPTIED, rec(Status.SKIPPED, E, E), False, Action.UNCHANGED),
        (EMPTIED, rec(Status.RETRYING, H, E, 1, LATER), False, Action.DEFER),
    ],
)
def test_decide(mapped, record, retrying, expected) -> None:  # type: ignore[no-untyped-def]
    """Each combination of row and recorded state leads to exactly one action."""
    assert decide(mapped, record, NOW, retrying=retrying) is expected


def test_success_marks_synced_and_resets_attempts() -> None:
    """A success stores the pushed hash, clears the retry and stamps the success time."""
    update = settle(
        "1", PUSHABLE, Action.PUSH, rec(Status.RETRYING, X, H, 3, EARLIER), OK, NOW, POLICY
    )

    assert update is not None
    assert (update.status, update.pushed_hash, update.attempts) == (Status.SYNCED, H, 0)
    assert (update.succeeded_at, update.next_attempt_at) == (NOW, None)


def test_transient_failure_schedules_a_retry_with_backoff() -> None:
    """A transient failure keeps the old pushed hash and schedules the next attempt."""
    update = settle("1", PUSHABLE, Action.PUSH, rec(Status.SYNCED, X, X), FLAKY, NOW, POLICY, 0.0)

    assert update is not None
    assert (update.status, update.pushed_hash, update.attempted_hash) == (Status.RETRYING, X, H)
    assert update.attempts == 1
    assert update.next_attempt_at == NOW + timedelta(seconds=15)
    assert update.last_code == -1


def test_attempts_count_only_for_the_same_payload() -> None:
    """A newer payload starts counting attempts from one again."""
    same = settle("1", PUSHABLE, Action.PUSH, rec(Status.RETRYING, None, H, 2), FLAKY, NOW, POLICY)
    newer = settle("1", PUSHABLE, Action.PUSH, rec(Status.RETRYING, None, X, 2), FLAKY, NOW, POLICY)

    assert same is not None and same.attempts == 3
    assert newer is not None and newer.attempts == 1


def test_too_many_transient_failures_mark_failed() -> None:
    """After max_attempts transient failures the user is failed, with no further retry."""
    update = settle(
        "1", PUSHABLE, Action.PUSH, rec(Status.RETRYING, None, H, 4), FLAKY, NOW, POLICY
    )

    assert update is not None
    assert (update.status, update.next_attempt_at) == (Status.FAILED, None)
    assert update.last_message.startswith("gave up after 5 attempts")


def test_retry_after_lengthens_the_backoff() -> None:
    """A Retry-After longer than the backoff sets the next attempt."""
    throttled = ApiResult(
        Verdict.TRANSIENT, None, 429, "slow down", retry_after=600, throttled=True
    )

    update = settle("1", PUSHABLE, Action.PUSH, None, throttled, NOW, POLICY)

    assert update is not None and update.next_attempt_at == NOW + timedelta(seconds=600)


def test_retry_after_is_honoured_up_to_retry_max() -> None:
    """A Retry-After of millennia waits retry.max, the longest wait (once an OverflowError)."""
    throttled = ApiResult(Verdict.TRANSIENT, None, 429, "slow down", retry_after=1e12)

    update = settle("1", PUSHABLE, Action.PUSH, None, throttled, NOW, POLICY)

    assert update is not None and update.next_attempt_at == NOW + POLICY.cap


@pytest.mark.parametrize(
    ("code", "stored"),
    [
        (55004, (55004, "bad")),
        (2**31 - 1, (2**31 - 1, "bad")),
        (3_000_000_000, (None, "code 3000000000: bad")),
        (-(2**31) - 1, (None, "code -2147483649: bad")),
        (10**40, (None, "code of more than 30 digits: bad")),
    ],
)
def test_a_code_beyond_the_column_is_kept_in_the_message(
    code: int, stored: tuple[int | None, str]
) -> None:
    """A code outside last_code's 32 bits is stored as NULL, its value at the message's head."""
    answer = ApiResult(Verdict.PERMANENT, code, 400, "bad")

    update = settle("1", PUSHABLE, Action.PUSH, None, answer, NOW, POLICY)

    assert update is not None and (update.last_code, update.last_message) == stored


def test_permanent_failure_marks_failed_with_code() -> None:
    """A permanent answer is recorded with its code and message, not retried."""
    update = settle("1", PUSHABLE, Action.PUSH, None, BAD, NOW, POLICY)

    assert update is not None
    assert (update.status, update.last_code, update.last_message) == (
        Status.FAILED,
        55004,
        "bad parameter",
    )
    assert update.next_attempt_at is None


@pytest.mark.parametrize("result", [None, REFUSED])
def test_unsent_or_refused_push_records_nothing(result: ApiResult | None) -> None:
    """A push that was never sent, or was refused for the whole sync, leaves the row unrecorded."""
    assert settle("1", PUSHABLE, Action.PUSH, None, result, NOW, POLICY) is None


@pytest.mark.parametrize("action", [Action.UNCHANGED, Action.DEFER])
def test_no_write_for_unchanged_or_deferred(action: Action) -> None:
    """Rows that need nothing are not written."""
    assert settle("1", PUSHABLE, action, rec(Status.SYNCED, H, H), None, NOW, POLICY) is None


def test_skip_records_reason_and_keeps_pushed_hash() -> None:
    """A skip stores its reason; what EngageLab last accepted is remembered."""
    update = settle("1", SKIPPED, Action.SKIP, rec(Status.SYNCED, H, H), None, NOW, POLICY)

    assert update is not None
    assert (update.status, update.pushed_hash, update.last_message) == (
        Status.SKIPPED,
        H,
        "euid 'bad' is not an integer",
    )


def test_confirm_marks_synced_without_a_call() -> None:
    """A row that returned to what EngageLab holds is marked synced."""
    update = settle(
        "1", PUSHABLE, Action.CONFIRM, rec(Status.RETRYING, H, X, 2, LATER), None, NOW, POLICY
    )

    assert update is not None and (update.status, update.attempts) == (Status.SYNCED, 0)


@pytest.mark.parametrize(
    ("attempts", "jitter", "seconds"),
    [
        (1, 0.0, 15),
        (1, 0.999999, 29.99997),
        (2, 0.0, 30),
        (3, 0.0, 60),
        (8, 0.0, 1800),
        (9, 0.0, 1800),
        (1000, 0.0, 1800),
    ],
)
def test_backoff_doubles_up_to_the_cap(attempts: int, jitter: float, seconds: float) -> None:
    """Backoff doubles from base per attempt, capped, spread over its upper half by jitter."""
    assert backoff(attempts, POLICY, jitter).total_seconds() == pytest.approx(seconds)


def p(c: int, k: int) -> Position:
    return Position(c, k)


@pytest.mark.parametrize(
    ("current", "page", "recorded", "expected"),
    [
        (None, [p(1, 1), p(1, 2), p(2, 1)], [True, True, True], p(2, 1)),
        (None, [p(1, 1), p(1, 2), p(2, 1)], [True, False, True], p(1, 1)),
        (None, [p(1, 1)], [False], None),
        (p(5, 5), [p(3, 1), p(4, 1)], [True, True], p(5, 5)),  # lookback rows never move it back
        (p(5, 5), [p(4, 1), p(5, 6), p(6, 1)], [True, True, False], p(5, 6)),
        (p(5, 5), [], [], p(5, 5)),
    ],
)
def test_advance(current, page, recorded, expected) -> None:  # type: ignore[no-untyped-def]
    """The watermark moves to the end of the recorded prefix, and never backwards."""
    assert advance(current, page, recorded) == expected


@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.booleans()), max_size=20),
    st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(0, 5))),
)
def test_advance_never_passes_an_unrecorded_row(rows, start) -> None:  # type: ignore[no-untyped-def]
    """Whatever the page, the new watermark is below every unrecorded row not already behind it."""
    rows = sorted(set(rows), key=lambda r: (r[0], r[1]))
    rows = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1][:2] != r[:2]]
    current = Position(*start) if start else None
    page = [Position(c, k) for c, k, _ in rows]

    after = advance(current, page, [done for *_, done in rows])

    if current is not None:
        assert after is not None and after >= current
    first_gap = next((pos for pos, (*_, done) in zip(page, rows, strict=True) if not done), None)
    if first_gap is not None and (current is None or first_gap > current):
        assert after is None or after < first_gap


def test_the_audit_never_requeues_a_row_whose_key_the_status_table_cannot_hold() -> None:
    """A row recorded under its key's digest is never re-queued by the audit: the retry phase
    reads rows back by key, and no row has that key."""
    long_key = map_row(SourceRow("k" * 300, 1, 7, {"email": "a@b.c"}), Policy("s"))

    assert missed(long_key, None) is False
    assert missed(PUSHABLE, None) is True


M5 = timedelta(minutes=5)


@pytest.mark.parametrize(
    ("watermark", "lookback", "seen", "window"),
    [
        (None, M5, NOW, (None, None)),
        (Position(NOW, 7), M5, None, (None, NOW - M5)),  # horizon unknown: behind the watermark
        (Position(1000, 7), 50, None, (None, 950)),
        (Position(NOW, 7), M5, NOW + timedelta(seconds=1), (None, NOW - M5 + timedelta(seconds=1))),
        (Position(NOW, 7), M5, NOW + M5, (None, NOW)),  # the edge at the watermark: ties re-read
        (Position(NOW, 7), M5, NOW + M5 * 2, (Position(NOW, 7), None)),  # an idle table
        (Position(NOW, 7), timedelta(0), NOW, (None, NOW)),
        (Position(NOW, 7), timedelta(0), LATER, (Position(NOW, 7), None)),
        (Position(NOW, 7), M5, EARLIER, (None, EARLIER - M5)),  # a standby behind the rows
    ],
)
def test_reread_from(watermark, lookback, seen, window) -> None:  # type: ignore[no-untyped-def]
    """The window reaches back the lookback from what the last read saw, or the watermark."""
    assert reread_from(watermark, lookback, seen) == window


@given(
    mark=st.tuples(st.integers(0, 100), st.integers(0, 5)),
    lookback=st.integers(0, 50),
    seen=st.none() | st.integers(0, 200),
    row=st.tuples(st.integers(0, 200), st.integers(0, 5)),
)
def test_reread_from_reaches_every_row_that_may_be_new(mark, lookback, seen, row) -> None:  # type: ignore[no-untyped-def]
    """Every row after the watermark, and every row the last read may not have seen (stamped at
    or after ``seen - lookback``, or ``lookback`` behind the watermark when unknown), is read."""
    after, start = reread_from(Position(*mark), lookback, seen)

    read = row > (after.cursor, after.key) if after is not None else row[0] >= start
    anchor = mark[0] if seen is None else seen
    if row > mark or row[0] >= anchor - lookback:
        assert read


LEAVE_KEEP = map_row(SourceRow(1, 1, 7, {"email": "a@b.c"}, consent=False), Policy("s"))
LEAVE_CLEAR = map_row(
    SourceRow(1, 1, 7, {"email": "a@b.c"}, deleted="2026-12-01"), Policy("s", on_leave="clear")
)
LK, LC = LEAVE_KEEP.hash, LEAVE_CLEAR.hash


@pytest.mark.parametrize(
    ("mapped", "record", "expected"),
    [
        (LEAVE_KEEP, None, Action.LEAVE),  # never pushed: recorded, no call
        (LEAVE_KEEP, rec(Status.SYNCED, H, H), Action.LEAVE),  # keep: EngageLab keeps it
        (LEAVE_KEEP, rec(Status.LEFT, H, LK), Action.UNCHANGED),
        (LEAVE_CLEAR, None, Action.LEAVE),  # nothing cdc-sync pushed to clear
        (LEAVE_CLEAR, rec(Status.SKIPPED, None, S), Action.LEAVE),
        (LEAVE_CLEAR, rec(Status.SYNCED, H, H), Action.PUSH),  # empty what it holds
        (LEAVE_CLEAR, rec(Status.LEFT, LC, LC), Action.UNCHANGED),  # cleared already
        (LEAVE_CLEAR, rec(Status.RETRYING, H, LC, 1, LATER), Action.DEFER),
        (LEAVE_CLEAR, rec(Status.FAILED, H, LC, 1), Action.UNCHANGED),
        (PUSHABLE, rec(Status.LEFT, H, LK), Action.CONFIRM),  # back; EngageLab kept it
        (PUSHABLE, rec(Status.LEFT, LC, LC), Action.PUSH),  # back after a clear
    ],
)
def test_decide_for_users_who_leave(mapped, record, expected) -> None:  # type: ignore[no-untyped-def]
    """A user who left is recorded without a call unless cdc-sync pushed something to clear,
    is never pushed twice for the same departure, and comes back as a change."""
    assert decide(mapped, record, NOW) is expected


def test_leaving_is_recorded_as_left_with_the_reason() -> None:
    """Leaving without a call and a clearing request accepted both record ``left``; the hash
    of the clearing request is what EngageLab now holds."""
    quiet = settle("1", LEAVE_KEEP, Action.LEAVE, rec(Status.SYNCED, H, H), None, NOW, POLICY)
    cleared = settle("1", LEAVE_CLEAR, Action.PUSH, rec(Status.SYNCED, H, H), OK, NOW, POLICY)
    refused = settle("1", LEAVE_CLEAR, Action.PUSH, rec(Status.SYNCED, H, H), BAD, NOW, POLICY)

    assert quiet is not None and cleared is not None and refused is not None
    assert (quiet.status, quiet.pushed_hash, quiet.attempted_hash) == (Status.LEFT, H, LK)
    assert quiet.last_message.startswith("consent withdrawn")
    assert (cleared.status, cleared.pushed_hash) == (Status.LEFT, LC)
    assert cleared.last_message.startswith("soft-deleted") and "cleared" in cleared.last_message
    assert refused.status is Status.FAILED


def test_a_clearing_request_empties_every_configured_contact() -> None:
    """With ``on_leave: clear`` the request sets ``""`` for each configured contact key."""
    policy = Policy("s", on_leave="clear", contact_keys=("email", "mobile_phone"))

    mapped = map_row(SourceRow(1, 1, 7, {"email": "a@b.c"}, consent="no"), policy)

    assert mapped.result.clears == Payload(7, {"email": "", "mobile_phone": ""})  # type: ignore[union-attr]
