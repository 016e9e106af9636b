"""Fixtures shared by the whole suite: the PostgreSQL servers the suite starts for itself.

A test that needs a server is marked ``postgres`` automatically (``pytest -m "not postgres"`` runs
the rest). Where no server can start, such tests are skipped, except under CI (``CI=true``), where
a missing server is a failure: a green CI run must have tested against real PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import settings
from tinyproxy import PROXY_USER, TinyProxy, tinyproxy
from userdb import UserDb

from cdc_sync.emulator import Emulator, EmulatorServer
from cdc_sync.testing.postgres import PostgresServer, scratch_dir

SERVER_FIXTURES = {"postgres", "pg_database", "standby_pair"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that reaches a server, directly or through another fixture."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("state_url") == "postgres"
        if fixtures & SERVER_FIXTURES or on_postgres:
            item.add_marker(pytest.mark.postgres)


def _unavailable(error: Exception | str, what: str = "PostgreSQL test server") -> NoReturn:
    """Skip a test that needs a server or a tool that is missing; under CI, fail it instead."""
    reason = f"{what} unavailable: {error}"
    if os.environ.get("CI", "").lower() in {"true", "1"}:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running primary shared by the session; give each test its own database on it."""
    with ExitStack() as cleanup:
        base = scratch_dir()
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        server = PostgresServer(base)
        cleanup.callback(server.stop)
        try:
            server.init()
            server.start()
        except (OSError, subprocess.SubprocessError, RuntimeError) as error:
            _unavailable(error)
        yield server


@pytest.fixture
def pg_database(postgres: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    postgres.create_database(name)
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for the tracking database: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"s_{uuid.uuid4().hex[:16]}"
    server.create_database(name)
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture(scope="session")
def standby_pair() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A running primary (not the ``postgres`` one) and a hot standby streaming from it."""
    with ExitStack() as cleanup:
        base = scratch_dir()
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        primary = PostgresServer(base, name="primary")
        cleanup.callback(primary.stop)
        try:
            primary.init()
            primary.start()
            standby = primary.make_standby()
            cleanup.callback(standby.stop)  # ExitStack runs callbacks last in, first out
            standby.start()
        except (OSError, subprocess.SubprocessError, RuntimeError) as error:
            _unavailable(error)
        yield primary, standby


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """The path of ``systemd-analyze`` (Debian's ``systemd`` package; ``.ci/run`` installs it)."""
    found = shutil.which("systemd-analyze")
    if found is None:
        _unavailable("not on PATH; install Debian's systemd package", "systemd-analyze")
    return found


@pytest.fixture
def api() -> Iterator[EmulatorServer]:
    """An EngageLab stand-in accepting key ``key`` and secret ``secret``, served over HTTP."""
    with EmulatorServer(Emulator("key", "secret")) as server:
        yield server


def _program(name: str) -> str:
    """The path of a program the Debian ``prometheus`` package installs (``.ci/run`` does)."""
    found = shutil.which(name)
    if found is None:
        _unavailable(f"{name} is not on PATH (apt-get install prometheus)", name)
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' checker: ``promtool check rules`` and ``promtool check metrics``."""
    return _program("promtool")


@pytest.fixture(scope="session")
def prometheus() -> str:
    """The Prometheus server, for a test that has it scrape a daemon and evaluate rules."""
    return _program("prometheus")


@pytest.fixture
def users(pg_database: str) -> Iterator[UserDb]:
    """An empty ``users`` table, with the (updated_at, id) index, in a fresh source database."""
    users = UserDb(pg_database)
    yield users
    users.dispose()


def _proxy(directory: Path, auth: tuple[str, str] | None) -> Iterator[TinyProxy]:
    with ExitStack() as cleanup:
        try:
            proxy = cleanup.enter_context(tinyproxy(directory, auth))
        except OSError as error:
            _unavailable(error, "tinyproxy")
        yield proxy


@pytest.fixture
def http_proxy(tmp_path: Path) -> Iterator[TinyProxy]:
    """Debian's tinyproxy on a loopback port, open to all."""
    yield from _proxy(tmp_path / "proxy", None)


@pytest.fixture
def authenticating_proxy(tmp_path: Path) -> Iterator[TinyProxy]:
    """Debian's tinyproxy on a loopback port, asking for PROXY_USER (Basic)."""
    yield from _proxy(tmp_path / "authenticating-proxy", PROXY_USER)


# Speed is measured by benchmarks/, never asserted by tests: Hypothesis' per-example deadline is
# a timed assertion that fails on a cold first call, so it is off.
settings.register_profile("cdc-sync", deadline=None)
settings.load_profile("cdc-sync")
