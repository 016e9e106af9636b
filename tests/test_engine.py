"""Whole cycles: a real PostgreSQL source, the emulator over HTTP, both state backends."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from harness import World, wait_for
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import event, select
from userdb import CONTACT_COLUMNS

from cdc_sync.emulator import Faults
from cdc_sync.engagelab import MAX_RETRY_AFTER, EngageLabClient
from cdc_sync.engine import Observers, Stop
from cdc_sync.errors import FatalApiError
from cdc_sync.mapping import VANISHED
from cdc_sync.models import sync_runs
from cdc_sync.outcomes import AuditSlice, CycleReport, CycleStart, PageReport
from cdc_sync.state import RunHistory, StateStore


@pytest.fixture
def world(pg_database: str, state_url: str) -> Iterator[World]:
    with World.running(pg_database, state_url) as w:
        yield w


def test_first_cycle_pushes_every_user_with_contacts(world: World) -> None:
    """Every user with contacts and a valid euid reaches EngageLab once; the rest are skipped."""
    world.users.add_users(range(1, 26))
    world.users.insert(
        [
            {"id": 26, "email": "x@example.com", "engagelab_euid": None},
            {"id": 27, "email": "y@example.com", "engagelab_euid": -5},
            {"id": 28, "email": " ", "mobile": None, "engagelab_euid": 1028},
        ]
    )

    report = world.cycle()

    assert world.emulator.contacts == world.users.expected_contacts()
    assert all(len(world.emulator.received(1000 + i)) == 1 for i in range(1, 26))
    assert (report.outcome, report.counts.synced, report.counts.skipped) == ("ok", 25, 3)
    assert world.status(26).last_message == "euid is empty"
    assert world.status(27).last_message == "euid -5 is not positive"
    assert world.status(28).last_message == "no contact values"
    assert world.status(1).status == "synced"


def test_second_cycle_makes_no_call(world: World) -> None:
    """Re-reading unchanged rows (the lookback window) makes no API call and writes nothing."""
    world.users.add_users(range(1, 30))
    world.cycle()
    before = world.requests()

    report = world.cycle()

    assert world.requests() == before
    assert (report.counts.synced, report.counts.unchanged) == (0, report.counts.rows_read)


def test_changed_email_pushes_exactly_that_user(world: World) -> None:
    """Changing one user's email sends one request, for that user, with the new value."""
    world.users.add_users(range(1, 30))
    world.cycle()
    before = world.requests()

    world.users.change(7, email="new@example.com")
    world.cycle()

    assert world.requests() == before + 1
    assert world.emulator.received(1007)[-1] == {"email": "new@example.com"}


def test_unrelated_column_change_makes_no_call(world: World) -> None:
    """An update of a column that is not mapped makes no API call."""
    world.users.add_users(range(1, 10))
    world.cycle()
    before = world.requests()

    world.users.change(3, name="someone else")
    report = world.cycle()

    assert world.requests() == before
    assert report.counts.unchanged >= 1


def test_rows_sharing_a_cursor_value_across_pages_are_all_read_once(world: World) -> None:
    """Forty rows with one updated_at, read in pages of ten, are each pushed exactly once."""
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    world.users.add_users(range(1, 41), updated_at=stamp)

    report = world.cycle()

    assert report.counts.synced == 40
    assert all(len(world.emulator.received(1000 + i)) == 1 for i in range(1, 41))
    assert report.watermark_after is not None and report.watermark_after.key == 40


def test_lookback_catches_a_row_that_commits_late(world: World) -> None:
    """A row whose updated_at is behind the watermark, but within the lookback, is still seen."""
    world.users.add_users(range(1, 5))
    world.cycle()

    world.users.add_users([5], updated_at=datetime.now(UTC) - timedelta(minutes=2))
    world.cycle()

    assert world.emulator.received(1005) == [{"email": "user5@example.com"}]


def test_without_lookback_a_late_row_is_missed(world: World) -> None:
    """The counter-case: with no lookback the late row is behind the watermark and lost."""
    world.lookback = timedelta(0)
    world.users.add_users(range(1, 5))
    world.cycle()

    world.users.add_users([5], updated_at=datetime.now(UTC) - timedelta(minutes=2))
    world.cycle()

    assert world.emulator.received(1005) == []


def test_transient_failure_is_retried_later_and_does_not_hold_the_watermark(world: World) -> None:
    """A code -1 answer marks the user retrying with backoff; the others and the watermark go on."""
    world.users.add_users(range(1, 11))
    world.emulator.set_faults(Faults(fail_codes={1003: -1}))

    report = world.cycle()

    assert report.counts.retrying == 1 and report.counts.synced == 9
    assert report.watermark_after is not None and report.watermark_after.key == 10
    status = world.status(3)
    assert (status.status, status.attempts, status.last_code) == ("retrying", 1, -1)
    assert status.next_attempt_at == world.clock.now + timedelta(seconds=15)


def test_pending_retry_is_deferred_until_due(world: World) -> None:
    """Before its next attempt is due, a retrying user re-read in the lookback is not sent."""
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    world.cycle()
    world.emulator.set_faults(Faults())
    before = world.requests()

    report = world.cycle()

    assert world.requests() == before
    assert report.counts.deferred == 1


def test_due_retry_sends_the_current_row(world: World) -> None:
    """A due retry re-reads the source: it sends the row's current value, not the failed one."""
    world.lookback = timedelta(0)  # keep user 2 out of the scan: only the retry queue sends it
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    world.cycle()
    world.emulator.set_faults(Faults())
    world.users.change(2, touch=False, email="current@example.com")
    world.clock.now += timedelta(minutes=1)

    world.cycle()

    assert world.emulator.received(1002) == [{"email": "current@example.com"}]
    assert world.status(2).status == "synced"


def test_newer_change_supersedes_a_pending_retry(world: World) -> None:
    """A user who changes again while a retry is pending is sent at once with the newer value."""
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    world.cycle()
    world.emulator.set_faults(Faults())

    world.users.change(2, email="newer@example.com")
    world.cycle()

    assert world.emulator.received(1002) == [{"email": "newer@example.com"}]
    assert (world.status(2).status, world.status(2).attempts) == ("synced", 0)


def test_retry_of_a_deleted_row_is_recorded_as_left(world: World) -> None:
    """A user whose row disappears while a retry is pending has left, and is not retried."""
    world.lookback = timedelta(0)
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    world.cycle()
    with world.users.engine.begin() as connection:
        connection.execute(world.users.table.delete().where(world.users.table.c.id == 2))
    world.clock.now += timedelta(minutes=1)

    world.cycle()

    status = world.status(2)
    assert (status.status, status.last_message) == ("left", VANISHED)
    assert world.emulator.received(1002) == []  # nothing of it reached EngageLab: nothing to clear


def test_retry_of_a_deleted_row_clears_what_was_pushed_with_on_leave_clear(world: World) -> None:
    """With on_leave clear, a user deleted while a retry is pending is sent "" for every
    configured contact, once, and recorded as left."""
    world.lookback, world.on_leave = timedelta(0), "clear"
    world.users.add_users([1, 2])
    world.cycle()
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    world.users.change(2, email="new2@example.com")
    world.cycle()
    world.emulator.set_faults(Faults())
    with world.users.engine.begin() as connection:
        connection.execute(world.users.table.delete().where(world.users.table.c.id == 2))
    world.clock.now += timedelta(minutes=1)

    world.cycle()
    world.clock.now += timedelta(hours=1)
    world.cycle()

    cleared = dict.fromkeys(CONTACT_COLUMNS, "")
    assert world.emulator.received(1002)[-1] == cleared
    assert [c for c in world.emulator.received(1002) if c == cleared] == [cleared]
    assert 1002 not in world.emulator.contacts or world.emulator.contacts[1002] == {}
    assert world.status(2).status == "left"
    assert world.status(1).status == "synced"


def test_permanent_failure_waits_for_the_row_to_change(world: World) -> None:
    """A 55004 answer is recorded as failed and not retried until the user's row changes."""
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1001: 55004}))
    world.cycle()
    world.clock.now += timedelta(hours=2)
    before = world.requests()

    world.cycle()
    unchanged = world.requests()
    world.emulator.set_faults(Faults())
    world.users.change(1, email="fixed@example.com")
    world.cycle()

    assert (world.status(1).status, world.status(1).last_code) == ("synced", 0)
    assert unchanged == before
    assert world.requests() == before + 1


def test_fatal_answer_stops_the_cycle_and_loses_nothing(world: World) -> None:
    """Wrong credentials stop the cycle at once; no user is marked; a fixed config pushes all."""
    world.users.add_users(range(1, 31))
    wrong = EngageLabClient(world.server.url, "key", "wrong", concurrency=2)

    with pytest.raises(FatalApiError) as refused:
        world.cycle(wrong)
    wrong.close()

    assert refused.value.code == 40050
    assert world.requests() <= 2
    assert world.state.counts_by_status() == {}
    assert world.state.watermark() is None
    with world.state.engine.connect() as connection:
        assert connection.scalar(select(sync_runs.c.outcome)) == "fatal"
    world.cycle()
    assert world.emulator.contacts == world.users.expected_contacts()


def test_too_many_transient_failures_mark_the_user_failed(world: World) -> None:
    """After max_attempts transient failures in a row a user is failed and no longer retried."""
    world.users.add_users([1])
    world.emulator.set_faults(Faults(fail_codes={1001: -1}))

    for _ in range(5):
        world.cycle()
        world.clock.now += timedelta(hours=1)

    status = world.status(1)
    assert (status.status, status.attempts) == ("failed", 5)
    assert (status.last_message or "").startswith("gave up after 5 attempts")


def test_one_bad_row_never_stops_the_others(world: World) -> None:
    """Rows with bad euids or no contacts sit among good ones; every good one is pushed."""
    world.users.add_users(range(1, 21))
    for bad in (4, 9, 15):
        world.users.change(bad, engagelab_euid=-bad)
    world.users.change(12, email=None)

    report = world.cycle()

    assert report.counts.synced == 16 and report.counts.skipped == 4
    assert world.emulator.contacts == world.users.expected_contacts()


def test_run_history_records_each_cycle(world: World) -> None:
    """Each cycle leaves one finished run row with its counts and watermarks."""
    world.users.add_users(range(1, 6))

    world.cycle()
    world.cycle()

    runs = world.state.recent_runs()
    assert [r.outcome for r in runs] == ["ok", "ok"]
    assert [r.counts.synced for r in runs] == [0, 5]
    assert runs[1].watermark_before is None and runs[0].watermark_before is not None
    assert all(r.finished_at is not None for r in runs)


def test_clear_empty_empties_a_contact_in_engagelab(world: World) -> None:
    """With clearing on, a contact set to NULL is emptied in EngageLab, and a user with nothing
    left is emptied entirely, then recorded as skipped."""
    world.clear = True
    world.users.add_users(range(1, 4), mobile="+8190")
    world.cycle()

    world.users.change(1, mobile=None)
    world.users.change(2, email=None, mobile=None)
    world.cycle()
    world.cycle()

    assert world.emulator.contacts[1001] == {"email": "user1@example.com"}
    assert world.emulator.contacts[1002] == {}
    assert world.emulator.received(1002)[-1] == {
        "email": "",
        "mobile_phone": "",
        "landline_phone": "",
        "whatsapp_phone": "",
    }
    assert world.status(2).status == "skipped"
    assert world.emulator.contacts[1003] == {"email": "user3@example.com", "mobile_phone": "+8190"}


def test_without_clearing_a_nulled_contact_is_kept(world: World) -> None:
    """By default a contact set to NULL is left out, and EngageLab keeps the old value."""
    world.users.add_users([1], mobile="+8190")
    world.cycle()

    world.users.change(1, mobile=None)
    world.cycle()

    assert world.emulator.contacts[1001] == {"email": "user1@example.com", "mobile_phone": "+8190"}


def test_a_new_process_closes_the_run_a_killed_one_left(world: World) -> None:
    """The first cycle of a new engine marks a run left 'running' as abandoned."""
    world.users.add_users([1])
    left_running = world.state.start_run(world.clock.now, None)

    world.cycle()

    outcomes = {run.id: run.outcome for run in world.state.recent_runs()}
    assert outcomes[left_running] == "abandoned"
    assert list(outcomes.values()).count("ok") == 1


def count_statements(database: SqlEngine) -> list[str]:
    """Every statement ``database`` receives from now on, by its first word."""
    seen: list[str] = []
    event.listen(
        database,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: seen.append(statement.split()[0].upper()),
    )
    return seen


def test_an_idle_cycle_asks_the_tracking_database_little(world: World) -> None:
    """A long-running engine's idle cycle reads no watermark, retry queue or last hashes it
    already knows: one run start, one run end."""
    engine = world.engine()
    world.users.add_users(range(1, 4))
    engine.run_cycle()
    engine.run_cycle()
    seen = count_statements(world.state.engine)

    idle = engine.run_cycle()

    assert idle.counts.unchanged == 3  # the lookback window, compared with remembered hashes
    assert seen == ["INSERT", "UPDATE"]


def test_an_idle_cycle_reads_the_source_once(world: World) -> None:
    """The source's clock and replay lag come with the first page: one statement a cycle."""
    engine = world.engine()
    world.users.add_users(range(1, 4))
    engine.run_cycle()
    seen = count_statements(world.source_engine)

    idle = engine.run_cycle()

    assert (idle.counts.rows_read, idle.counts.unchanged) == (3, 3)  # the lookback window
    assert seen == ["SELECT"]


def test_a_long_running_engine_still_retries_when_due(world: World) -> None:
    """Knowing the retry queue in memory never delays a retry past its time, nor makes one early."""
    world.lookback = timedelta(0)  # only the retry queue can send user 2 again
    engine = world.engine()
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    engine.run_cycle()
    world.emulator.set_faults(Faults())

    world.clock.now += timedelta(seconds=10)
    early = engine.run_cycle()
    world.clock.now += timedelta(seconds=10)  # 20 s after the failure: due (backoff 15 s)
    due = engine.run_cycle()

    assert (early.counts.synced, due.counts.synced) == (0, 1)
    assert world.status(2).status == "synced"


def test_a_new_tenure_of_the_lock_reads_the_state_again(world: World) -> None:
    """After the lock is won back the engine forgets what it remembered: watermark, retry queue
    and abandoned runs are read from the tracking database again (another instance may have
    changed them)."""
    engine = world.engine()
    world.users.add_users(range(1, 4))
    engine.run_cycle()
    engine.run_cycle()
    engine.begin_tenure()
    seen = count_statements(world.state.engine)

    engine.run_cycle()

    assert seen.count("SELECT") == 4  # watermark, last hashes, due retries, earliest retry
    assert seen.count("UPDATE") == 2  # abandoned runs, run end


def test_an_idle_cycle_after_a_burst_re_reads_none_of_it(world: World) -> None:
    """Once a read has seen past a burst by more than the lookback, idle cycles (of this engine
    or of a restarted one) re-read nothing, and the next change is still pushed."""
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    world.users.add_users(range(1, 41), updated_at=an_hour_ago)  # a migration touching every row
    engine = world.engine()
    first = engine.run_cycle()

    idle = engine.run_cycle()
    restarted = world.cycle()
    world.users.change(5, email="new@example.com")
    changed = world.cycle()

    assert first.counts.synced == 40
    assert (idle.counts.rows_read, restarted.counts.rows_read) == (0, 0)
    assert (changed.counts.rows_read, changed.counts.synced) == (1, 1)
    assert world.emulator.received(1005)[-1] == {"email": "new@example.com"}


def outside_reach(world: World) -> None:
    """Users 1-5 stamped as usual; 6-30 from before the cursor existed (NULL), 31 and 32 stamped
    'infinity' and '-infinity' (legacy sentinels)."""
    with world.users.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE users ALTER COLUMN updated_at DROP NOT NULL")
    world.users.add_users(range(1, 6))
    world.users.add_users(range(6, 31), updated_at=None)
    world.users.add_users([31], updated_at="infinity")
    world.users.add_users([32], updated_at="-infinity")


def test_rows_outside_the_cursors_reach_are_synced_once_by_key(world: World) -> None:
    """NULL and infinite cursors never crash a cycle: each such row is pushed once, in pages by
    key, the cycle is recorded, and later cycles (a restarted engine too) push nothing again."""
    outside_reach(world)

    first = world.cycle()
    second = world.cycle()

    assert (first.outcome, first.counts.synced) == ("ok", 32)
    assert world.emulator.contacts == world.users.expected_contacts()
    assert (second.outcome, second.counts.synced, second.counts.rows_read) == ("ok", 0, 5)
    progress = world.state.progress()
    assert (progress.reach_rows, progress.reach_key) == (27, None)
    assert first.watermark_after is not None and first.watermark_after.key == 5


def test_the_audit_finds_a_change_to_a_row_with_no_cursor(world: World) -> None:
    """A NULL-cursor row that changes (its cursor stays NULL) is found by the audit and pushed."""
    outside_reach(world)
    world.audit_rows = 100
    world.cycle()

    world.users.change(7, touch=False, email="changed@example.com")
    report = world.cycle()

    assert report.counts.audit_misses == 1
    assert world.emulator.received(1007)[-1] == {"email": "changed@example.com"}


def test_a_stop_ends_a_cycle_held_by_retry_after_and_loses_nothing(world: World) -> None:
    """A stop during a Retry-After pause ends the cycle at once as stopped: the told user is
    retrying after the capped pause, the users not sent are not recorded and the watermark
    stays before them; the next cycle sends them."""
    world.users.add_users(range(1, 21))
    world.emulator.set_faults(Faults(throttled_euids=[1005], retry_after=600))
    stop = Stop()

    def stop_once_told() -> None:
        wait_for(lambda: world.emulator.stats()["faults"]["throttled"] == 1, "the 429")
        stop.set()

    with ThreadPoolExecutor(2) as pool:
        pool.submit(stop_once_told)
        report = pool.submit(world.engine().run_cycle, stop).result(timeout=60)  # hang guard

    sent = {euid - 1000 for euid in world.emulator.all_received()}
    recorded = {int(key) for key in world.state.records([str(i) for i in range(1, 21)])}
    watermark = world.state.watermark()
    told = world.status(5)
    assert report.outcome == "stopped"
    assert (told.status, told.last_code) == ("retrying", 429)
    assert told.next_attempt_at == world.clock.now + timedelta(seconds=MAX_RETRY_AFTER)
    assert recorded == sent | {5}
    assert len(recorded) < 20
    assert watermark is not None and watermark.key < min(set(range(1, 21)) - recorded)

    world.emulator.set_faults(Faults())
    world.clock.now += timedelta(seconds=1)
    later = EngageLabClient(world.server.url, "key", "secret")  # this one's pause is still on
    world.cycle(later)
    later.close()

    assert world.emulator.received(1005) == []
    assert set(world.emulator.all_received()) == {1000 + i for i in range(1, 21)} - {1005}
    assert all(len(got) == 1 for got in world.emulator.all_received().values())


def test_a_stop_calls_what_is_registered_while_it_is_registered() -> None:
    """A Stop calls a registered call once when set, at once if set already, never after."""
    calls: list[str] = []
    stop, early = Stop(), Stop()
    early.set()

    with stop.calling(lambda: calls.append("during")), early.calling(lambda: calls.append("set")):
        stop.set()
        stop.set()
    after = Stop()
    with after.calling(lambda: calls.append("after")):
        pass
    after.set()

    assert calls == ["set", "during"]


class RunRowProbe:
    """An observer placed after the run history: what the run row says as each page lands."""

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.seen: list[tuple[str, int, int, int | None]] = []

    def cycle_started(self, start: CycleStart) -> None:
        pass

    def page_recorded(self, page: PageReport) -> None:
        [run] = self.state.recent_runs(1)
        self.seen.append((run.outcome, run.counts.rows_read, run.counts.synced, run.rows_estimated))

    def slice_audited(self, audit: AuditSlice) -> None:
        pass

    def cycle_finished(self, report: CycleReport) -> None:
        pass


def test_the_run_row_shows_the_counts_and_the_estimate_as_pages_land(world: World) -> None:
    """While a cycle works through a backlog its run row holds the counts so far and the
    scan's row estimate, so ``status`` can show how far it has got."""
    world.users.add_users(range(1, 36))  # pages of 10: four
    probe = RunRowProbe(world.state)
    engine = world.engine(observer=Observers(RunHistory(world.state, save_every=0), probe))

    report = engine.run_cycle()

    assert probe.seen == [
        ("running", 10, 10, 35),
        ("running", 20, 20, 35),
        ("running", 30, 30, 35),
        ("running", 35, 35, 35),
    ]
    [run] = world.state.recent_runs(1)
    assert (run.outcome, run.counts.synced, run.rows_estimated) == ("ok", 35, 35)
    assert report.rows_estimated == 35


def test_a_short_scan_counts_no_backlog(world: World) -> None:
    """A first page that is not full is all there is: no estimate is asked of the source."""
    world.users.add_users(range(1, 6))

    report = world.cycle()

    assert report.rows_estimated is None
    assert world.state.recent_runs(1)[0].rows_estimated is None


def test_a_user_who_fails_permanently_gets_a_warning_line(world: World) -> None:
    """A permanent failure logs one WARNING with key, euid, code and message, no contact value."""
    world.users.add_users(range(1, 6))
    world.emulator.set_faults(Faults(fail_codes={1003: 55108}))

    with structlog.testing.capture_logs() as logs:
        report = world.cycle()

    failed = [line for line in logs if line["event"] == "user_failed"]
    assert failed == [
        {
            "event": "user_failed",
            "log_level": "warning",
            "sync": "users",
            "run_id": report.run_id,
            "key": "3",
            "euid": 1003,
            "code": 55108,
            "message": "error 55108 forced by the emulator",
        }
    ]
    assert not [line for line in logs if "@example.com" in repr(line)]


def test_a_user_out_of_retries_gets_one_warning_line(world: World) -> None:
    """A user whose transient failures use up retry.max_attempts is logged once, as given up."""
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))

    with structlog.testing.capture_logs() as logs:
        for _ in range(6):  # max_attempts is 5
            world.cycle()
            world.clock.now += timedelta(hours=1)

    failed = [line for line in logs if line["event"] == "user_failed"]
    assert [(line["key"], line["code"]) for line in failed] == [("2", -1)]
    assert failed[0]["message"].startswith("gave up after 5 attempts")
    assert world.status(2).status == "failed"


def test_cycle_finished_says_how_long_what_and_where(world: World) -> None:
    """One cycle_finished line per cycle: run id, outcome, duration, counts and watermark."""
    world.users.add_users(range(1, 4))

    with structlog.testing.capture_logs() as logs:
        report = world.cycle()

    [line] = [line for line in logs if line["event"] == "cycle_finished"]
    assert line["run_id"] == report.run_id
    assert (line["outcome"], line["rows_read"], line["synced"]) == ("ok", 3, 3)
    assert line["duration_s"] == report.seconds
    assert line["watermark"] is not None and line["watermark"].endswith(", 3]")


class LaterAfterTheScan:
    """An observer that moves the engine's clock an hour on after each scan page, as a long
    backfill cycle's clock moves on before its retry phase."""

    def __init__(self, world: World) -> None:
        self.world = world

    def cycle_started(self, start: CycleStart) -> None:
        pass

    def page_recorded(self, page: PageReport) -> None:
        if not page.retrying:
            self.world.clock.now += timedelta(hours=1)

    def slice_audited(self, audit: AuditSlice) -> None:
        pass

    def cycle_finished(self, report: CycleReport) -> None:
        pass


def test_a_user_is_sent_at_most_once_a_cycle_and_counted_once(world: World) -> None:
    """A user failing in the scan of a long cycle, due again by its retry phase, waits for the
    next cycle: one request, counted once as retrying (cycles counted attempts, status users)."""
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    observer = Observers(RunHistory(world.state), LaterAfterTheScan(world))

    report = world.engine(observer=observer).run_cycle()

    assert len(world.emulator.received(1002)) == 0 and world.requests() == 3
    assert (report.counts.synced, report.counts.retrying) == (2, 1)
    assert world.state.counts_by_status() == {"synced": 2, "retrying": 1}


def test_a_deferred_user_the_retry_phase_sends_is_counted_once(world: World) -> None:
    """A user the scan defers and the retry phase then sends counts once, by the retry's outcome."""
    world.users.add_users(range(1, 4))
    world.emulator.set_faults(Faults(fail_codes={1002: -1}))
    world.cycle()
    world.emulator.set_faults(Faults())
    world.clock.now += timedelta(seconds=1)  # not yet due: the scan defers user 2
    observer = Observers(RunHistory(world.state), LaterAfterTheScan(world))

    report = world.engine(observer=observer).run_cycle()

    assert world.emulator.received(1002) == [{"email": "user2@example.com"}]
    assert (report.counts.deferred, report.counts.synced, report.counts.unchanged) == (0, 1, 2)
