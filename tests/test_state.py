"""The state store on SQLite and PostgreSQL: upserts, watermark, retries, schema checks."""

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from values import any_text, column_value

from cdc_sync.cli import state_engine
from cdc_sync.engagelab import ApiResult, Verdict
from cdc_sync.errors import StateError
from cdc_sync.mapping import Policy, Skip, SourceRow, map_row
from cdc_sync.models import sync_runs
from cdc_sync.outcomes import CycleCounts, RunOutcome
from cdc_sync.rules import Action, Position, Record, Retry, Status, Update, settle
from cdc_sync.state import StateStore, decode_value, encode_value

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    s = StateStore(state_engine(state_url), "users")
    s.migrate()
    yield s
    s.engine.dispose()


def upd(
    key: str,
    status: Status = Status.SYNCED,
    *,
    pushed: str | None = "h1",
    attempted: str = "h1",
    attempts: int = 0,
    attempted_at: datetime | None = NOW,
    succeeded_at: datetime | None = NOW,
    next_at: datetime | None = None,
    code: int | None = 0,
    message: str = "success",
) -> Update:
    return Update(
        key,
        42,
        status,
        pushed,
        attempted,
        attempts,
        code,
        message,
        attempted_at,
        succeeded_at,
        next_at,
    )


def test_commit_page_inserts_then_updates(store: StateStore) -> None:
    """A user's row is created once and then updated in place, keeping first_seen_at."""
    store.commit_page([upd("1")], None, NOW)
    later = NOW + timedelta(hours=1)

    store.commit_page(
        [
            upd(
                "1",
                Status.RETRYING,
                attempted="h2",
                attempts=1,
                attempted_at=later,
                succeeded_at=None,
                next_at=later + timedelta(seconds=30),
                code=-1,
                message="internal error",
                pushed=None,
            )
        ],
        None,
        later,
    )

    row = store.status_of("1")
    assert row is not None
    assert (row.status, row.attempts, row.last_code) == ("retrying", 1, -1)
    assert row.pushed_hash == "h1"  # a failed attempt never forgets what EngageLab holds
    assert row.last_success_at == NOW  # kept when the update carries none
    assert (row.first_seen_at, row.updated_at, row.last_attempt_at) == (NOW, later, later)
    assert row.next_attempt_at == later + timedelta(seconds=30)


def test_records_reads_a_page_in_one_call(store: StateStore) -> None:
    """records() returns exactly the known users among the keys asked for."""
    store.commit_page([upd(str(i)) for i in range(5)], None, NOW)

    found = store.records(["1", "3", "99"])

    assert found == {k: Record(Status.SYNCED, "h1", "h1", 0, None) for k in ("1", "3")}
    assert store.records([]) == {}


def test_watermark_round_trips_and_is_per_sync(store: StateStore) -> None:
    """The watermark keeps its types and belongs to one sync name only."""
    position = Position(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), 12345)

    store.commit_page([], position, NOW)
    other = StateStore(store.engine, "other")

    assert store.watermark() == position
    assert other.watermark() is None


def test_page_outcomes_and_watermark_commit_together(store: StateStore) -> None:
    """A failure while recording a page leaves neither its outcomes nor its watermark behind."""
    bad = upd("2", attempts=None)  # type: ignore[arg-type]  # NOT NULL on both backends

    with pytest.raises(StateError):
        store.commit_page([upd("1"), bad], Position(5, 5), NOW)

    assert store.records(["1", "2"]) == {}
    assert store.watermark() is None


def test_due_retries_are_oldest_first_and_only_due(store: StateStore) -> None:
    """Only retrying users whose next attempt has come are returned, earliest first."""
    store.commit_page(
        [
            upd("late", Status.RETRYING, next_at=NOW + timedelta(minutes=5)),
            upd("b", Status.RETRYING, next_at=NOW - timedelta(minutes=1)),
            upd("a", Status.RETRYING, next_at=NOW - timedelta(minutes=9)),
            upd("failed", Status.FAILED),
        ],
        None,
        NOW,
    )

    assert store.due_retries(NOW, 10) == ["a", "b"]
    assert store.due_retries(NOW, 1) == ["a"]


def test_runs_are_started_and_finished(store: StateStore) -> None:
    """A run row is opened as running and closed with its outcome and counts."""
    run_id = store.start_run(NOW, Position(1, 2))
    counts = CycleCounts(rows_read=3, synced=2, skipped=1)
    store.finish_run(run_id, NOW, RunOutcome.OK, counts, Position(3, 4))

    [run] = store.recent_runs()
    assert run.outcome == "ok"
    assert (run.counts.rows_read, run.counts.synced, run.counts.skipped) == (3, 2, 1)
    assert (run.watermark_before, run.watermark_after) == ("[1, 2]", "[3, 4]")


def test_problems_list_failed_before_retrying_before_skipped(store: StateStore) -> None:
    """The status view lists users that did not reach EngageLab, worst first, never synced ones."""
    store.commit_page(
        [upd("s", Status.SKIPPED), upd("r", Status.RETRYING), upd("f", Status.FAILED), upd("ok")],
        None,
        NOW,
    )

    assert [p.source_key for p in store.recent_problems()] == ["f", "r", "s"]
    assert store.counts_by_status() == {"synced": 1, "retrying": 1, "failed": 1, "skipped": 1}


def test_remembered_records_follow_this_stores_writes(store: StateStore) -> None:
    """Status rows are remembered once read, dropped when this store writes them, and all
    dropped by forget(): a write by another process is seen only after forget()."""
    store.commit_page([upd("a", Status.RETRYING)], None, NOW)
    assert store.records(["a", "b"])["a"].status is Status.RETRYING
    store.commit_page([upd("a"), upd("b")], None, NOW)
    assert {k: r.status for k, r in store.records(["a", "b"]).items()} == {
        "a": Status.SYNCED,
        "b": Status.SYNCED,
    }

    other = StateStore(store.engine, store.sync_name)
    other.commit_page([upd("a", Status.FAILED)], None, NOW)
    before = store.records(["a"])["a"].status
    store.forget()

    assert (before, store.records(["a"])["a"].status) == (Status.SYNCED, Status.FAILED)


def test_a_new_status_table_gets_statistics_so_lookups_probe_the_key(pg_database: str) -> None:
    """A page's status lookup, once psycopg prepares it, may run on one generic plan for the
    connection's life. Planned on a table without statistics, that plan scans the whole table
    for every key; the store analyses a new table once a page has landed in it."""
    store = StateStore(state_engine(pg_database), "users")
    store.migrate()
    with store.engine.begin() as connection:  # only the store may analyse it: no autovacuum
        connection.execute(text("ALTER TABLE cdc_sync_status SET (autovacuum_enabled = false)"))
    store.commit_page([upd(str(i)) for i in range(999)], None, NOW)
    store.commit_page([upd("999")], None, NOW)  # the 1000th row written
    with store.engine.begin() as connection:  # the backfill goes on
        connection.execute(
            text(
                "INSERT INTO cdc_sync_status (sync_name, source_key, status, attempts, "
                "first_seen_at, updated_at) SELECT 'users', g::text, 'synced', 0, now(), now() "
                "FROM generate_series(1000, 19999) g"
            )
        )
        # The store's lookup, as PostgreSQL plans it once it settles on a generic plan.
        connection.execute(
            text(
                "PREPARE lookup(varchar, varchar[]) AS SELECT source_key, status "
                "FROM cdc_sync_status WHERE sync_name = $1 AND source_key = ANY ($2)"
            )
        )
        connection.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
        plan = "\n".join(connection.scalars(text("EXPLAIN EXECUTE lookup('users', '{1,2}')")))
    store.engine.dispose()
    assert "Index Scan using pk_cdc_sync_status" in plan, plan


def test_a_failed_analyse_leaves_the_page_recorded(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Analysing is for speed only: if it fails, the page it followed stays committed."""
    store = StateStore(state_engine(pg_database), "users")
    store.migrate()

    def unreachable() -> None:
        raise StateError("the tracking database went away")

    monkeypatch.setattr(store, "_connect", unreachable)  # what runs after the page's commit
    store.commit_page([upd(str(i)) for i in range(1000)], None, NOW)
    monkeypatch.undo()

    assert store.status_of("999") is not None
    store.engine.dispose()


def test_unmigrated_database_names_the_fix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A tracking database without tables is refused with the command that fixes it."""
    store = StateStore(state_engine(f"sqlite:///{tmp_path}/empty.db"), "users")

    with pytest.raises(StateError) as error:
        store.require_schema()

    assert "has no tracking tables" in str(error.value)
    assert error.value.hint == "run `cdc-sync migrate`"


def test_database_behind_names_the_fix(state_url: str) -> None:
    """A tracking database at an older revision is refused the same way."""
    store = StateStore(state_engine(state_url), "users")
    store.migrate()
    store.downgrade("base")

    with pytest.raises(StateError, match="run `cdc-sync migrate`"):
        store.require_schema()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:hunter2@127.0.0.1:1/state",
        "postgresql+psycopg://u@127.0.0.1:1/state?password=hunter2",
    ],
)
def test_unreachable_database_is_a_state_error(url: str) -> None:
    """A tracking database that cannot be reached gives a StateError naming it, without password."""
    store = StateStore(state_engine(url), "users")

    with pytest.raises(StateError) as error:
        store.watermark()

    assert "127.0.0.1:1/state" in str(error.value)
    assert "hunter2" not in str(error.value)


values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=30),
    st.datetimes(timezones=st.sampled_from([UTC, None])),
    st.dates(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.uuids(),
    st.sampled_from(["a\x00b", "a\udcffb"]),  # a SQLite source's keys (see source.py)
)


@given(values)
def test_watermark_values_round_trip(value: object) -> None:
    """Every cursor or key type comes back from the database equal and of the same type."""
    decoded = decode_value(encode_value(value))

    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize("value", [True, 1.5, b"x", None])
def test_unsupported_watermark_types_are_refused(value: object) -> None:
    """A boolean, float, bytes or NULL cursor is refused rather than stored lossily."""
    with pytest.raises(TypeError):
        encode_value(value)


def test_encoded_values_are_readable() -> None:
    """The stored text names its type and is readable by an operator."""
    assert encode_value(42) == "int:42"
    assert encode_value(uuid.UUID(int=1)) == "uuid:00000000-0000-0000-0000-000000000001"
    assert encode_value(date(2026, 1, 2)) == "date:2026-01-02"
    assert encode_value(Decimal("1.50")) == "decimal:1.50"


def test_runs_left_running_are_marked_abandoned(store: StateStore) -> None:
    """A run a killed process left 'running' is closed as 'abandoned'; finished runs are kept."""
    killed = store.start_run(NOW, None)
    done = store.start_run(NOW, None)
    store.finish_run(done, NOW, RunOutcome.OK, CycleCounts(), None)

    closed = store.close_abandoned_runs(NOW)

    outcomes = {run.id: run.outcome for run in store.recent_runs()}
    assert closed == 1
    assert outcomes == {killed: "abandoned", done: "ok"}


def test_old_runs_are_pruned(store: StateStore) -> None:
    """Runs that started before the cut-off are deleted; newer ones and other syncs' stay."""
    old = store.start_run(NOW - timedelta(days=31), None)
    new = store.start_run(NOW - timedelta(days=1), None)
    other = StateStore(store.engine, "other")
    other.start_run(NOW - timedelta(days=31), None)

    store.prune(NOW - timedelta(days=30))

    assert [run.id for run in store.recent_runs()] == [new]
    assert old != new
    assert len(other.recent_runs()) == 1


POLICY = Retry(timedelta(seconds=30), timedelta(hours=1), 5)


@pytest.mark.parametrize(
    ("answer", "stored"),
    [
        (ApiResult(Verdict.PERMANENT, 3_000_000_000, 400, "no"), (None, "code 3000000000: no")),
        (ApiResult(Verdict.PERMANENT, 10**20, 400, "no"), (None, f"code {10**20}: no")),
        (ApiResult(Verdict.PERMANENT, 55004, 400, "a\x00b"), (55004, "a\ufffdb")),
        (ApiResult(Verdict.PERMANENT, 55004, 400, "a\ud800b"), (55004, "a\ufffdb")),
        (ApiResult(Verdict.TRANSIENT, -1, 500, "x" * 5000), (-1, "x" * 199 + "\u2026")),
    ],
    ids=["code 3e9", "code 1e20", "NUL", "lone surrogate", "5000 characters"],
)
def test_hostile_answers_are_stored(
    store: StateStore, answer: ApiResult, stored: tuple[int | None, str]
) -> None:
    """An answer's code beyond 32 bits, or a message with a NUL, an unpaired surrogate or of any
    length, is stored on both backends (once: out of range, OverflowError, invalid json)."""
    mapped = map_row(SourceRow(1, 1, 7, {"email": "a@b.c"}), Policy("s"))
    update = settle(mapped.key, mapped, Action.PUSH, None, answer, NOW, POLICY)
    assert update is not None

    store.commit_page([update], None, NOW)

    row = store.status_of("1")
    assert row is not None and (row.last_code, row.last_message) == stored


def test_a_key_with_a_nul_is_a_storable_watermark(store: StateStore) -> None:
    """A text key holding a NUL (a SQLite source) is stored as the watermark and read back."""
    position = Position(5, "a\x00b")

    store.commit_page([], position, NOW)

    assert store.watermark() == position


def test_a_run_error_of_any_text_is_stored(store: StateStore) -> None:
    """A cycle's error is stored whatever it holds: cleaned and cut, never refused."""
    run = store.start_run(NOW, None)

    given = "bad \x00 \ud800 " + "x" * 5000
    store.finish_run(run, NOW, RunOutcome.ERROR, CycleCounts(), None, given)

    with store.engine.connect() as connection:
        error = connection.scalar(select(sync_runs.c.error).where(sync_runs.c.id == run))
    assert error is not None and error.startswith("bad \ufffd \ufffd xxx") and len(error) == 2000


answers = st.builds(
    ApiResult,
    st.sampled_from([Verdict.SUCCESS, Verdict.TRANSIENT, Verdict.PERMANENT]),
    st.one_of(st.none(), st.integers()),
    st.one_of(st.none(), st.integers(100, 599)),
    st.one_of(any_text, st.text(min_size=150, max_size=400)),
    st.one_of(st.none(), st.floats(min_value=0)),
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=column_value,
    euid=column_value,
    contact=column_value,
    answer=answers,
    attempts=st.integers(0, 10),
)
def test_whatever_the_rules_produce_is_stored(
    store: StateStore, key: object, euid: object, contact: object, answer: ApiResult, attempts: int
) -> None:
    """Any row and any answer settle into an Update that both tracking backends store as it is."""
    mapped = map_row(SourceRow(key, 1, euid, {"email": contact}), Policy("s"))
    action = Action.SKIP if isinstance(mapped.result, Skip) else Action.PUSH
    record = Record(Status.RETRYING, None, mapped.hash, attempts, None)
    update = settle(mapped.key, mapped, action, record, answer, NOW, POLICY, jitter=0.5)
    assert update is not None
    example = StateStore(store.engine, uuid.uuid4().hex[:16])  # a fresh status row each time

    example.commit_page([update], None, NOW)

    row = example.status_of(update.key)
    assert row is not None
    assert (row.status, row.last_code, row.last_message, row.euid) == (
        update.status.value,
        update.last_code,
        update.last_message,
        update.euid,
    )


def test_every_recorded_outcome_is_kept_in_the_users_history(store: StateStore) -> None:
    """Each status write appends the outcome (status, attempts, code, message, hash) to the
    user's history, newest first; the status row keeps only the last."""
    later = NOW + timedelta(minutes=1)
    store.commit_page(
        [
            upd(
                "1",
                Status.RETRYING,
                attempted="h2",
                attempts=1,
                code=-1,
                message="internal error",
                pushed=None,
            )
        ],
        None,
        NOW,
    )
    store.commit_page([upd("1", attempted="h2", pushed="h2"), upd("2")], None, later)

    history = store.history("1")

    assert [(h.at, h.status, h.attempts, h.code, h.message, h.attempted_hash) for h in history] == [
        (later, Status.SYNCED, 0, 0, "success", "h2"),
        (NOW, Status.RETRYING, 1, -1, "internal error", "h2"),
    ]
    assert len(store.history("2")) == 1


def test_prune_keeps_each_users_newest_outcomes_and_recent_ones(store: StateStore) -> None:
    """Pruning drops outcomes older than the cut-off and all but each user's newest N."""
    for minute in range(5):
        store.commit_page([upd("a", message=f"m{minute}")], None, NOW + timedelta(minutes=minute))
    store.commit_page([upd("b")], None, NOW - timedelta(days=40))

    pruned = store.prune(NOW - timedelta(days=30), per_user=3)

    assert pruned.history == 3  # two of a's beyond the newest three, and b's old one
    assert [h.message for h in store.history("a")] == ["m4", "m3", "m2"]
    assert store.history("b") == []


def test_operator_requests_bump_the_epoch_read_with_the_run_start(store: StateStore) -> None:
    """retry, resync and a reset each bump the epoch, and start_run reads it back."""
    store.start_run(NOW, None)
    first = store.epoch
    store.commit_page([upd("a", Status.FAILED, attempted="h9", pushed=None)], None, NOW)

    assert store.retry_now([], True, NOW) == 1
    store.resync(["b"], NOW)
    store.request_reset(None, NOW)
    store.start_run(NOW, None)

    assert (first, store.epoch) == (0, 3)
    assert store.records(["a"])["a"].attempted_hash == ""  # matches no payload: pushed again
    b = store.status_of("b")
    assert b is not None and (b.status, b.pushed_hash, b.next_attempt_at) == ("retrying", "", NOW)


def test_a_requested_reset_is_applied_once_by_the_next_run(store: StateStore) -> None:
    """A reset waits in the state row until a run applies it, moving the watermark and the
    run's watermark_before; applying again finds nothing."""
    store.commit_page([], Position(10, 10), NOW)
    store.request_reset(Position(3, 3), NOW)
    run_id = store.start_run(NOW, Position(10, 10))

    applied = store.apply_reset(run_id, NOW)
    again = store.apply_reset(run_id, NOW)

    assert (applied, again) == (True, False)
    assert store.watermark() == Position(3, 3)
    assert store.pending_reset() is None
    assert store.recent_runs()[0].watermark_before == "[3, 3]"
