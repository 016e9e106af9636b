"""An engine assembled from real parts for tests: source table, emulator, state store, clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import create_engine
from userdb import CONTACT_COLUMNS, UserDb

from cdc_sync.cli import state_engine
from cdc_sync.emulator import Emulator, EmulatorServer
from cdc_sync.engagelab import EngageLabClient
from cdc_sync.engine import CycleReport, Engine, EngineSettings, Observer
from cdc_sync.identity import Resolver
from cdc_sync.mapping import Policy
from cdc_sync.rules import Retry
from cdc_sync.source import Source, SourceSpec
from cdc_sync.state import StateStore, UserStatus


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll a condition until it holds (a readiness wait; it never stands in for correctness)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Clock:
    """The engine's clock, moved by the test (the source's clock stays real)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class World:
    """A source table, the emulator, a migrated state store and an engine over them.

    ``read_url`` points the reader elsewhere than where the table is written (a standby);
    ``xid8`` adds the gap-free cursor column and reads in that mode.
    """

    def __init__(
        self,
        source_url: str,
        state_url: str,
        server: EmulatorServer,
        emulator: Emulator,
        *,
        xid8: bool = False,
        read_url: str | None = None,
    ) -> None:
        self.users = UserDb(source_url, xid8=xid8)
        self.xid8 = xid8
        self.emulator = emulator
        self.server = server
        self.clock = Clock()
        self.state = StateStore(state_engine(state_url), "users")
        self.state.migrate()
        self.source_engine = create_engine(read_url or source_url)
        self.client = EngageLabClient(server.url, "key", "secret", concurrency=4)
        self.lookback: timedelta | int = timedelta(minutes=5)
        self.batch_size = 10
        self.audit_rows = 0
        self.clear = False
        self.on_leave: Literal["keep", "clear"] = "keep"
        self.identity: str | None = None  # source.identity's name; its column is ``name``

    def engine(
        self, client: EngageLabClient | None = None, observer: Observer | None = None
    ) -> Engine:
        spec = SourceSpec(
            "users",
            "id",
            "cdc_xid" if self.xid8 else "updated_at",
            "engagelab_euid" if self.identity is None else "name",
            CONTACT_COLUMNS,
            cursor_mode="xid8" if self.xid8 else "timestamp",
        )
        retry = Retry(timedelta(seconds=30), timedelta(minutes=10), 5)
        settings = EngineSettings(
            "users",
            self.batch_size,
            self.lookback,
            retry,
            Policy(
                "users", self.clear, on_leave=self.on_leave, contact_keys=tuple(CONTACT_COLUMNS)
            ),
            self.audit_rows,
        )
        client = client or self.client
        resolver = None
        if self.identity is not None:
            resolver = Resolver(self.identity, self.state, client, self.clock)
        return Engine(
            settings,
            Source(self.source_engine, spec),
            self.state,
            client,
            resolver=resolver,
            clock=self.clock,
            jitter=lambda: 0.0,
            observer=observer,
        )

    def cycle(self, client: EngageLabClient | None = None) -> CycleReport:
        return self.engine(client).run_cycle()

    def requests(self) -> int:
        return int(self.emulator.stats()["requests"])

    def status(self, user_id: int) -> UserStatus:
        found = self.state.status_of(str(user_id))
        assert found is not None, f"user {user_id} has no status row"
        return found

    def close(self) -> None:
        self.client.close()
        self.users.dispose()
        self.source_engine.dispose()
        self.state.engine.dispose()

    @classmethod
    @contextmanager
    def running(cls, source_url: str, state_url: str, **options: Any) -> Iterator[World]:
        """A world with its own emulator server, closed afterwards."""
        emulator = Emulator("key", "secret")
        with EmulatorServer(emulator) as server:
            world = cls(source_url, state_url, server, emulator, **options)
            try:
                yield world
            finally:
                world.close()
