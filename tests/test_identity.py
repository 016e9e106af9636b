"""EUID resolution (``source.identity``): a real PostgreSQL source, the emulator's register over
HTTP, both tracking backends; and a real ``cdc-sync once`` killed between register and push."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from harness import World
from sqlalchemy import create_engine, select
from test_engine import count_statements
from userdb import UserDb, write_config

from cdc_sync.emulator import Emulator, EmulatorServer, Faults, euid_for
from cdc_sync.engagelab import ApiResult, EngageLabClient, Registration, Verdict
from cdc_sync.errors import FatalApiError
from cdc_sync.identity import chunks, read_answers
from cdc_sync.models import sync_identities
from cdc_sync.state import StateStore

DEADLINE = 60.0  # seconds a readiness wait may take before the test fails


@pytest.fixture
def world(pg_database: str, state_url: str) -> Iterator[World]:
    with World.running(pg_database, state_url) as w:
        w.identity = "user_id"
        yield w


def euid(user: int) -> int:
    """The EUID the emulator gives user ``user`` (its identity is the ``name`` column)."""
    return euid_for(0, "user_id", f"user {user}")


def stored_identities(world: World) -> dict[str, int]:
    with world.state.engine.connect() as connection:
        c = sync_identities.c
        return {value: euid for value, euid in connection.execute(select(c.identity_value, c.euid))}


def resolved_once(emulator: Emulator) -> bool:
    """Whether register answered no identity value with its EUID more than once."""
    return all(count == 1 for count in emulator.resolved().values())


def test_chunks_are_at_most_100_values_in_order() -> None:
    """Values are sent in consecutive calls of at most 100, in their order."""
    values = [str(i) for i in range(250)]

    assert [list(c) for c in chunks(values)] == [values[:100], values[100:200], values[200:]]


def test_read_answers_says_why_each_value_is_unresolved() -> None:
    """A value left out of a success is transient with code 0; a failed call's values carry its
    answer; an unsent call's values carry None."""
    ok = ApiResult(Verdict.SUCCESS, 0, 200, "success")
    down = ApiResult(Verdict.TRANSIENT, -1, 500, "internal error")

    resolution = read_answers(
        "user_id",
        [["a", "b"], ["c"], ["d"]],
        [Registration(ok, {"a": 1}), Registration(down, {}), None],
    )

    assert resolution.euids == {"a": 1}
    left_out = resolution.unresolved["b"]
    assert left_out is not None
    assert (left_out.verdict, left_out.code, left_out.status) == (Verdict.TRANSIENT, 0, 200)
    assert resolution.unresolved["c"] == down
    assert resolution.unresolved["d"] is None


def test_every_user_is_resolved_in_calls_of_at_most_100_and_pushed(world: World) -> None:
    """250 users on one page are resolved in three register calls, stored, and each pushed to
    the EUID register gave."""
    world.batch_size = 250
    world.users.add_users(range(1, 251))

    report = world.cycle()

    calls = world.emulator.register_calls()
    assert sorted(len(values) for _, values in calls) == [50, 100, 100]
    assert {name for name, _ in calls} == {"user_id"}
    assert (report.counts.synced, report.counts.registered) == (250, 250)
    assert world.emulator.contacts == {
        euid(i): {"email": f"user{i}@example.com"} for i in range(1, 251)
    }
    assert stored_identities(world) == {f"user {i}": euid(i) for i in range(1, 251)}
    assert world.status(7).euid == euid(7)


def test_a_resolved_user_is_never_registered_again(world: World) -> None:
    """A changed contact of a resolved user is pushed with the stored EUID, no register call;
    an idle cycle makes no call and no identity query at all."""
    world.users.add_users(range(1, 21))
    engine = world.engine()
    engine.run_cycle()
    calls = len(world.emulator.register_calls())
    world.users.change(5, email="new@example.com")

    changed = engine.run_cycle()
    engine.run_cycle()  # reads user 5's new status row once, as any engine does after a write
    seen = count_statements(world.state.engine)
    idle = engine.run_cycle()

    assert len(world.emulator.register_calls()) == calls
    assert resolved_once(world.emulator)
    assert world.emulator.received(euid(5))[-1] == {"email": "new@example.com"}
    assert (changed.counts.synced, idle.counts.synced) == (1, 0)
    assert changed.counts.registered == 0  # its EUID was stored
    assert seen == ["INSERT", "UPDATE"]  # run start, run end: the idle poll stays cheap


def test_a_restarted_process_finds_resolved_users_in_the_tracking_database(world: World) -> None:
    """A new engine with nothing in memory reads the stored EUIDs instead of registering again."""
    world.users.add_users(range(1, 11))
    world.cycle()
    world.state = StateStore(world.state.engine, "users")  # a new process remembers nothing
    world.users.change(3, email="again@example.com")

    world.cycle()

    assert resolved_once(world.emulator)
    assert world.emulator.received(euid(3))[-1] == {"email": "again@example.com"}


def test_a_partial_register_answer_retries_only_the_users_left_out(world: World) -> None:
    """Values missing from a code-0 answer are recorded as retrying with the reason, the others
    push and the watermark passes; the left-out users resolve and push once due."""
    world.users.add_users(range(1, 11))
    world.emulator.set_faults(Faults(register_drop=frozenset({"user 3", "user 8"})))

    first = world.cycle()

    assert first.counts.synced == 8 and first.counts.retrying == 2
    assert first.watermark_after is not None and first.watermark_after.key == 10
    left_out = world.status(3)
    assert (left_out.status, left_out.last_code, left_out.euid) == ("retrying", 0, None)
    assert left_out.last_message == "register answered code 0 but left this user_id unresolved"
    assert euid(3) not in world.emulator.contacts

    world.emulator.set_faults(Faults())
    world.clock.now += timedelta(minutes=1)
    second = world.cycle()

    assert second.counts.synced == 2
    assert world.status(3).status == world.status(8).status == "synced"
    assert world.emulator.contacts[euid(8)] == {"email": "user8@example.com"}
    assert resolved_once(world.emulator)


def test_a_register_5xx_is_retried_with_backoff_without_holding_others(world: World) -> None:
    """A register call answered with HTTP 500 (code -1) leaves its users retrying with that
    code; other pages push, and the users resolve once their retry is due."""
    world.users.add_users(range(1, 21))  # two pages of ten: two register calls
    world.emulator.set_faults(Faults(register_codes={"user 4": -1}))

    first = world.cycle()

    assert (first.counts.synced, first.counts.retrying) == (10, 10)
    assert world.status(1).status == "retrying" and world.status(1).last_code == -1
    assert world.status(15).status == "synced"
    assert first.watermark_after is not None and first.watermark_after.key == 20

    world.emulator.set_faults(Faults())
    world.clock.now += timedelta(minutes=1)
    world.cycle()

    assert world.emulator.contacts == {
        euid(i): {"email": f"user{i}@example.com"} for i in range(1, 21)
    }
    assert resolved_once(world.emulator)


def test_a_fatal_register_answer_stops_the_cycle_and_nothing_is_lost(world: World) -> None:
    """A fatal code in the second of three register calls stops every further request; nothing
    is recorded past it, and the next cycle resolves the rest and pushes everyone."""
    world.batch_size = 250
    world.users.add_users(range(1, 251))
    world.emulator.set_faults(Faults(register_codes={"user 150": 50031}))
    one_at_a_time = EngageLabClient(world.server.url, "key", "secret", concurrency=1)
    try:
        with pytest.raises(FatalApiError):
            world.cycle(one_at_a_time)

        assert len(world.emulator.register_calls()) == 2  # the third call never started
        assert world.emulator.contacts == {}  # no push after the refusal
        assert len(stored_identities(world)) == 100  # the first call's answer is kept
        assert world.state.status_of("1") is None  # unsent: read again next cycle
        assert world.state.watermark() is None

        world.emulator.set_faults(Faults())
        report = world.cycle(one_at_a_time)
    finally:
        one_at_a_time.close()

    assert report.counts.synced == 250
    assert resolved_once(world.emulator)
    assert len(world.emulator.register_calls()) == 4  # the two calls of the values not resolved


def test_an_unusable_identity_is_skipped_with_its_reason(world: World) -> None:
    """A NULL or over-long identity is skipped without a register call; the others sync."""
    world.users.add_users(range(1, 4))
    world.users.change(2, name=None)
    world.users.change(3, name="x" * 257)

    report = world.cycle()

    assert (report.counts.synced, report.counts.skipped) == (1, 2)
    assert world.status(2).last_message == "identity is empty"
    assert world.status(3).last_message == "identity is 257 characters long, more than 256"
    assert [values for _, values in world.emulator.register_calls()] == [("user 1",)]


# -- a real process, killed between register and push ----------------------------------------


def cdc_sync(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_sync.cli", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ),
    )


def test_sigkill_between_register_and_push_never_resolves_a_user_twice(
    users: UserDb, state_url: str, tmp_path: Path
) -> None:
    """``cdc-sync once`` killed after the register answers are stored but before any push is
    answered loses nothing: the next ``once`` pushes everyone without registering anyone again."""
    emulator = Emulator("key", "secret", faults=Faults(hold_contacts=True))
    users.add_users(range(1, 31))
    with EmulatorServer(emulator) as api:
        config = write_config(
            tmp_path / "config.yaml",
            source_url=users.url,
            state_url=state_url,
            api_url=api.url,
            source={"euid": None, "identity": {"name": "user_id", "column": "name"}},
        )
        assert cdc_sync(config, "migrate").returncode == 0
        state = create_engine(state_url)
        count = select(sync_identities.c.identity_value)
        process = subprocess.Popen(
            [sys.executable, "-m", "cdc_sync.cli", "-c", str(config), "once"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + DEADLINE
            while True:  # a readiness wait: the first page's register answers are stored
                with state.connect() as connection:
                    if len(connection.execute(count).all()) == 30:
                        break
                assert process.poll() is None, "once ended before its pushes were answered"
                assert time.monotonic() < deadline, "the identities were never stored"
                time.sleep(0.02)
            assert emulator.contacts == {}  # every push is held
            process.send_signal(signal.SIGKILL)
            assert process.wait() == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

        emulator.set_faults(Faults())
        again = cdc_sync(config, "once")
        state.dispose()

    assert again.returncode == 0, again.stderr
    assert emulator.contacts == {euid(i): {"email": f"user{i}@example.com"} for i in range(1, 31)}
    assert Counter(v for _, values in emulator.register_calls() for v in values) == Counter(
        f"user {i}" for i in range(1, 31)
    )
