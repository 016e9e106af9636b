"""``cdc-sync demo``: the whole job on embedded defaults, with nothing to set up.

A SQLite user table with sample users, the EngageLab emulator on a loopback port, ``migrate``,
one cycle, a few edits, a second cycle that pushes only what changed, then ``status``. Each step is
the real CLI command, run in this process against real files and a real HTTP server.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    update,
)

from cdc_sync import cli
from cdc_sync.emulator import Emulator, EmulatorServer

API_KEY, API_SECRET = "demo-key", "demo-secret"

MARKER = ".cdc-sync-demo"
"""The file that says a directory is the demo's own, and so the demo's to delete."""

CONFIG = """\
name: demo
source:
  url: sqlite:///{dir}/app.db
  table: users
  key: id
  cursor: updated_at
  euid: engagelab_euid
  batch_size: 5
  lookback: 5m
contacts:
  email: email
  mobile_phone: mobile
  whatsapp_phone: whatsapp
state:
  url: sqlite:///{dir}/state.db
engagelab:
  base_url: {url}
  api_key: {key}
  api_secret: ${{DEMO_API_SECRET:-{secret}}}
  rate_limit: 100
schedule:
  interval: 10s
logging:
  level: WARNING
  format: console
"""


def users_table(metadata: MetaData) -> Table:
    return Table(
        "users",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(100), nullable=False),
        Column("email", String(200)),
        Column("mobile", String(40)),
        Column("whatsapp", String(40)),
        Column("engagelab_euid", String(40)),  # text on purpose: the demo has a bad one
        Column("updated_at", DateTime, nullable=False, index=True),
    )


def seed(url: str, now: datetime) -> Table:
    engine = create_engine(url)
    metadata = MetaData()
    users = users_table(metadata)
    metadata.create_all(engine)
    rows = [
        {
            "id": i,
            "name": f"User {i}",
            "email": f"user{i}@example.com",
            "mobile": f"+8190{i:08d}" if i % 2 else None,
            "whatsapp": f"+8180{i:08d}" if i % 3 == 0 else None,
            "engagelab_euid": str(10_000_000 + i),
            "updated_at": now - timedelta(minutes=30 - i),
        }
        for i in range(1, 13)
    ]
    rows[10]["engagelab_euid"] = "not-a-number"  # user 11: recorded as skipped, never sent
    rows[11].update(email=None, mobile=None, whatsapp=None)  # user 12: no contacts at all
    with engine.begin() as connection:
        connection.execute(users.insert(), rows)
    engine.dispose()
    return users


def edit(url: str, users: Table, now: datetime) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            update(users)
            .where(users.c.id == 3)
            .values(email="new.address@example.com", updated_at=now)
        )
        connection.execute(
            update(users)
            .where(users.c.id == 5)  # unrelated column: no API call
            .values(name="Renamed User", updated_at=now)
        )
        connection.execute(
            update(users)
            .where(users.c.id == 11)  # euid fixed: now it is sent
            .values(engagelab_euid="10000011", updated_at=now)
        )
    engine.dispose()


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def prepare(workdir: Path) -> str | None:
    """Make ``workdir`` an empty demo directory; or say why not, touching nothing.

    Only a directory the demo made (it holds :data:`MARKER`) is deleted and made again; a
    missing or empty one is used. Anything else may be somebody's data (a ``state.db`` is the
    production state file's name too), so it is left alone.
    """
    if workdir.is_dir() and (workdir / MARKER).is_file():
        shutil.rmtree(workdir)
    elif workdir.is_dir() and any(workdir.iterdir()):
        return (
            f"{workdir} is not empty and was not made by the demo (it has no {MARKER}); "
            "the demo deletes only its own directory: give another --dir, or empty this one"
        )
    elif workdir.exists() and not workdir.is_dir():
        return f"{workdir} is not a directory: give another --dir"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `cdc-sync demo`, which deletes this directory\n")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cdc-sync demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        default=".demo",
        help="working directory (default .demo): made afresh if the demo made it, "
        "used if empty or missing, refused otherwise",
    )
    args = parser.parse_args(argv)
    workdir = Path(args.dir).resolve()
    refused = prepare(workdir)
    if refused is not None:
        print(f"cdc-sync demo: {refused}", file=sys.stderr)
        return 2
    source_url = f"sqlite:///{workdir}/app.db"

    emulator = Emulator(API_KEY, API_SECRET)
    with EmulatorServer(emulator) as server:
        config = workdir / "config.yaml"
        config.write_text(
            CONFIG.format(dir=workdir, url=server.url, key=API_KEY, secret=API_SECRET)
        )
        users = seed(source_url, datetime.now(UTC).replace(tzinfo=None))
        print(f"demo in {workdir}: 12 users in a SQLite table, EngageLab emulator at {server.url}")

        def run(*command: str) -> int:
            print(f"$ cdc-sync -c {config.name} {' '.join(command)}", flush=True)
            return cli.main(["-c", str(config), *command])

        step("1. create the tracking tables")
        status = run("migrate")
        step("2. first cycle: every user with contacts and a valid euid is pushed")
        status = status or run("once")
        first = emulator.stats()["accepted"]
        print(f"EngageLab accepted {first} requests")

        step("3. edits: user 3 changes email, user 5 only their name, user 11 gets a valid euid")
        edit(source_url, users, datetime.now(UTC).replace(tzinfo=None))
        step("4. second cycle: only users 3 and 11 are pushed")
        status = status or run("once")
        second = emulator.stats()["accepted"] - first
        print(f"EngageLab accepted {second} more requests")

        step("5. a third cycle with no changes pushes nothing")
        status = status or run("once")

        step("6. status")
        status = status or run("status")
        print(f"\nEngageLab now holds contacts for {len(emulator.contacts)} users.")
    return status
