"""The ``cdc-sync`` command as an operator meets it: real processes, exit statuses and messages."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from sqlalchemy import event
from test_daemon import add_users_in_order
from tinyproxy import PROXY_USER, TinyProxy
from tlsserver import https_server
from userdb import UserDb, write_config

from cdc_sync import __version__
from cdc_sync.cli import source_engine, state_engine
from cdc_sync.emulator import Emulator, EmulatorServer, Faults

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/x"  # nothing listens on port 1
SECRET = "Zq9/sekret+value=42"  # "/", "+" and "=" make it an invalid sync name, too
WRONG_SECRET = "Wr0ng/sekret+value=17"
DELETE = object()


def cdc_sync(
    config: Path | None, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command line in a child process, as an operator would, and capture its output."""
    options = ["-c", str(config)] if config is not None else []
    return subprocess.run(
        [sys.executable, "-m", "cdc_sync.cli", *options, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ if env is None else env),
        cwd=config.parent if config is not None else None,
    )


def environ(**values: str | None) -> dict[str, str]:
    """This process's environment with ``values`` set, or removed where a value is None."""
    env = dict(os.environ)
    for name, value in values.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env


def offline_config(directory: Path, **overrides: Any) -> Path:
    """A valid config whose databases and API are never reached by a config error."""
    return write_config(
        directory / "config.yaml",
        source_url=UNREACHABLE,
        state_url=f"sqlite:///{directory}/state.db",
        api_url="http://127.0.0.1:9",
        secret=SECRET,
        **overrides,
    )


def edit(path: Path, key: str, value: object) -> Path:
    """Set the dotted ``key`` of the YAML file at ``path`` to ``value`` (or remove it: DELETE)."""
    tree = yaml.safe_load(path.read_text())
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def reachable(api: EmulatorServer) -> dict[str, str]:
    """The engagelab settings of an offline config pointed at the emulator, which accepts them."""
    return {"base_url": api.url, "api_secret": "secret"}


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    """The operator is told what is wrong, never shown Python's stack."""
    assert "Traceback" not in result.stderr, result.stderr


@dataclass
class Sync:
    """A config pointing at the users table, a state database and the emulator."""

    config: Path
    users: UserDb
    api: EmulatorServer

    @property
    def emulator(self) -> Emulator:
        return self.api.emulator

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cdc_sync(self.config, *args)

    def write(self, **overrides: Any) -> None:
        """Rewrite the config, changing only ``overrides``."""
        state_url = yaml.safe_load(self.config.read_text())["state"]["url"]
        write_config(
            self.config,
            source_url=self.users.url,
            state_url=state_url,
            api_url=self.api.url,
            **overrides,
        )

    def requests(self) -> int:
        return int(self.emulator.stats()["requests"])


@pytest.fixture
def sync(users: UserDb, state_url: str, api: EmulatorServer, tmp_path: Path) -> Sync:
    """A migrated sync over an empty users table, on each state backend."""
    config = write_config(
        tmp_path / "config.yaml", source_url=users.url, state_url=state_url, api_url=api.url
    )
    migrated = cdc_sync(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    return Sync(config, users, api)


# -- configuration errors: exit 78, naming the file and the key --------------------------------


def test_missing_config_file_exits_78_naming_the_file(tmp_path: Path) -> None:
    """A config path with no file behind it is a config error that names the path."""
    missing = tmp_path / "nowhere.yaml"

    result = cdc_sync(missing, "once")

    assert result.returncode == 78
    assert f"{missing}: no such file" in result.stderr
    assert_no_traceback(result)


def test_yaml_syntax_error_exits_78_with_the_position(tmp_path: Path) -> None:
    """A file that is not YAML is a config error that names the file and where parsing failed."""
    config = tmp_path / "config.yaml"
    config.write_text("name: users\nsource: [unclosed\n")

    result = cdc_sync(config, "once")

    assert result.returncode == 78
    assert re.search(
        rf"{re.escape(str(config))}: not valid YAML at line \d+, column \d+", result.stderr
    ), result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("source.tabel", "users", "unknown key; did you mean 'table'?"),
        ("source.batch_size", "lots", "valid integer"),
        ("engagelab.api_key", DELETE, "required key is missing"),
    ],
    ids=["unknown key", "wrong type", "missing required"],
)
def test_invalid_config_exits_78_naming_file_and_key(
    tmp_path: Path, key: str, value: object, problem: str
) -> None:
    """An invalid key is reported as ``file: dotted.key: problem`` with exit status 78."""
    config = edit(offline_config(tmp_path), key, value)

    result = cdc_sync(config, "once")

    assert result.returncode == 78
    assert f"cdc-sync: {config}: {key}: " in result.stderr, result.stderr
    assert problem in result.stderr
    assert_no_traceback(result)


def test_unset_environment_variable_exits_78_naming_it(tmp_path: Path) -> None:
    """A ``${VAR}`` reference to an unset variable names the variable and the key using it."""
    config = offline_config(tmp_path, engagelab={"api_secret": "${ENGAGELAB_API_SECRET}"})

    result = cdc_sync(config, "once", env=environ(ENGAGELAB_API_SECRET=None))

    assert result.returncode == 78
    assert (
        f"{config}: engagelab.api_secret: environment variable ENGAGELAB_API_SECRET is not set"
    ) in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("key", ["source.url", "state.url"])
def test_database_url_with_an_uninstalled_driver_exits_78(tmp_path: Path, key: str) -> None:
    """A URL naming a driver cdc-sync does not ship (psycopg2) is a config error on its key."""
    url = f"postgresql+psycopg2://postgres@127.0.0.1:1/{key.split('.')[0]}"
    config = edit(offline_config(tmp_path), key, url)

    result = cdc_sync(config, "migrate")

    assert_no_traceback(result)
    assert result.returncode == 78
    assert f"cdc-sync: {config}: {key}: " in result.stderr
    assert "is not installed (psycopg2)" in result.stderr


@pytest.mark.parametrize(
    ("key", "value", "secret"),
    [
        ("source.batch_size", "lots", SECRET),
        ("source.batch_size", "${ENGAGELAB_API_SECRET}", SECRET),
        ("name", "${ENGAGELAB_API_SECRET}", SECRET),
        ("engagelab.timeout", "${ENGAGELAB_API_SECRET}", SECRET),
        ("engagelab.api_secrte", "${ENGAGELAB_API_SECRET}", SECRET),
        ("engagelab.api_key", "", SECRET + "\n"),
    ],
    ids=[
        "elsewhere",
        "quoted as a number",
        "quoted as a name",
        "quoted as a duration",
        "under a misspelt key",
        "secret with a newline",
    ],
)
def test_secret_never_appears_in_config_errors(
    tmp_path: Path, key: str, value: str, secret: str
) -> None:
    """However the config is invalid, the API secret taken from the environment is not shown."""
    config = offline_config(tmp_path, engagelab={"api_secret": "${ENGAGELAB_API_SECRET}"})
    edit(config, key, value)

    result = cdc_sync(config, "check", env=environ(ENGAGELAB_API_SECRET=secret))

    assert result.returncode == 78, result.stderr
    assert f"{config}: " in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert_no_traceback(result)


WORST_CONFIGS = {
    "alias bomb": "extra:\n  l0: &l0 [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)),
    "recursive alias": "extra: &r [*r]\n",
    "nesting 500 deep": "extra: " + "[" * 500 + "]" * 500 + "\n",
    "5000-digit integer": "retry:\n  max_attempts: " + "9" * 5000 + "\n",
    "interval 1e14 s": "schedule:\n  interval: 100000000000000\n",
    "keep_runs 99999999d": "state:\n  keep_runs: 99999999d\n",
}


@pytest.mark.parametrize("command", ["check", "once"])
@pytest.mark.parametrize("text", list(WORST_CONFIGS.values()), ids=list(WORST_CONFIGS))
def test_hostile_config_exits_78_with_one_message(tmp_path: Path, text: str, command: str) -> None:
    """The worst files of issue 9 end in exit 78 and one line naming the file, no traceback."""
    config = offline_config(tmp_path)
    tree = yaml.safe_load(config.read_text())
    for section in ("schedule", "state", "retry"):
        if text.startswith(f"{section}:"):
            del tree[section]
    config.write_text(yaml.safe_dump(tree, sort_keys=False) + text)

    result = cdc_sync(config, command)  # its timeout guards against a hang

    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(f"cdc-sync: {config}: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert_no_traceback(result)


def test_every_unset_variable_is_reported(tmp_path: Path) -> None:
    """Each unset variable is named, not only the first one met."""
    config = offline_config(tmp_path, engagelab={"api_key": "${KEY_A}", "api_secret": "${KEY_B}"})

    result = cdc_sync(config, "check", env=environ(KEY_A=None, KEY_B=None))

    assert result.returncode == 78
    assert f"{config}: engagelab.api_key: environment variable KEY_A is not set" in result.stderr
    assert f"{config}: engagelab.api_secret: environment variable KEY_B is not set" in result.stderr


# -- setup errors: exit 69, naming the thing and the fix ---------------------------------------


@pytest.mark.parametrize("command", ["once", "run", "check"])
def test_unreachable_source_exits_69_with_a_fix(tmp_path: Path, command: str) -> None:
    """A source nobody listens for is a setup error naming the URL and what to check."""
    config = offline_config(tmp_path)
    assert cdc_sync(config, "migrate").returncode == 0

    result = cdc_sync(config, command)

    assert result.returncode == 69
    assert "reading the source postgresql+psycopg://postgres@127.0.0.1:1/x failed" in result.stderr
    assert "fix: check source.url" in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("command", ["once", "run", "check"])
def test_missing_source_table_exits_69_with_a_fix(
    pg_database: str, tmp_path: Path, command: str
) -> None:
    """A source database without the configured table is a setup error naming the table."""
    config = offline_config(tmp_path, source={"url": pg_database})
    assert cdc_sync(config, "migrate").returncode == 0

    result = cdc_sync(config, command)

    assert result.returncode == 69
    assert "the source table users does not exist" in result.stderr
    assert "fix: check source.table" in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("command", ["once", "run", "check"])
def test_missing_source_column_exits_69_listing_it(
    users: UserDb, tmp_path: Path, command: str
) -> None:
    """A contact mapped to a column the table lacks names that column and lists the real ones."""
    config = offline_config(
        tmp_path, source={"url": users.url}, contacts={"whatsapp_phone": "whatsapp_number"}
    )
    assert cdc_sync(config, "migrate").returncode == 0

    result = cdc_sync(config, command)

    assert result.returncode == 69
    assert "the source table users has no column whatsapp_number" in result.stderr
    assert "fix: its columns are: id, name, email, mobile, landline, whatsapp," in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("command", ["once", "run", "status"])
def test_unmigrated_state_exits_69_saying_run_migrate(
    users: UserDb, tmp_path: Path, command: str
) -> None:
    """Before ``migrate`` the commands that use the tracking tables say to run it."""
    config = offline_config(tmp_path, source={"url": users.url})

    result = cdc_sync(config, command)

    assert result.returncode == 69
    assert "has no tracking tables" in result.stderr
    assert "fix: run `cdc-sync migrate`" in result.stderr
    assert_no_traceback(result)


# -- migrate and check ---------------------------------------------------------------------------


def test_migrate_twice_is_idempotent(state_url: str, tmp_path: Path) -> None:
    """A second ``migrate`` succeeds and finds the tables already at the latest revision."""
    config = offline_config(tmp_path, state={"url": state_url})

    first = cdc_sync(config, "migrate")
    second = cdc_sync(config, "migrate")

    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    head = re.fullmatch(r"tracking tables at revision (\S+) \(were at nothing\)\n", first.stdout)
    assert head is not None, first.stdout
    assert second.stdout == f"tracking tables already at revision {head[1]}\n"


def test_check_without_index_prints_the_statement_and_lookback(
    pg_database: str, api: EmulatorServer, tmp_path: Path
) -> None:
    """Without an (updated_at, id) index ``check`` prints the statement to run and the lookback."""
    UserDb(pg_database, index=False).dispose()
    config = offline_config(
        tmp_path, source={"url": pg_database, "lookback": "5m"}, engagelab=reachable(api)
    )
    assert cdc_sync(config, "migrate").returncode == 0

    result = cdc_sync(config, "check")

    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "CREATE INDEX CONCURRENTLY users_updated_at_id_idx ON users (updated_at, id);"
        in result.stdout
    )
    assert re.search(r"^lookback\s+(5m|0:05:00) ", result.stdout, re.M), result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_check_with_index_says_it_is_present(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """With the (updated_at, id) index in place ``check`` names it and asks for nothing."""
    config = offline_config(tmp_path, source={"url": users.url}, engagelab=reachable(api))
    assert cdc_sync(config, "migrate").returncode == 0

    result = cdc_sync(config, "check")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "index      users_updated_at_id_idx on (updated_at, id): present" in result.stdout
    assert "CREATE INDEX" not in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_check_hides_a_query_password_and_warns_who_may_read_it(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """check shows a ?password= as ***, and warns while others may read a file holding secrets."""
    source = {"url": f"{users.url}?password=hunter22"}
    config = offline_config(tmp_path, source=source, engagelab=reachable(api))
    config.chmod(0o644)
    assert cdc_sync(config, "migrate").returncode == 0

    readable = cdc_sync(config, "check")
    config.chmod(0o600)
    private = cdc_sync(config, "check")

    assert readable.returncode == 0, readable.stdout + readable.stderr
    assert "hunter22" not in readable.stdout + readable.stderr
    assert re.search(r"^source +\S+\?password=\*\*\*: reachable$", readable.stdout, re.M)
    assert re.search(
        r"^WARNING +\S+ holds source.url and engagelab.api_secret as written text "
        r"and is readable by others \(mode 0644\); run chmod 600",
        readable.stdout,
        re.M,
    ), readable.stdout
    assert private.returncode == 0
    assert "WARNING" not in private.stdout
    assert SECRET not in readable.stdout + private.stdout


def test_check_before_migrate_fails_saying_run_migrate(users: UserDb, tmp_path: Path) -> None:
    """``check`` on tracking tables that do not exist exits non-zero and says to migrate."""
    config = offline_config(tmp_path, source={"url": users.url})

    result = cdc_sync(config, "check")

    assert result.returncode != 0
    assert re.search(
        r"^state .*tracking tables at nothing, need \S+; run `cdc-sync migrate`$",
        result.stdout,
        re.M,
    ), result.stdout
    assert SECRET not in result.stdout + result.stderr


# -- once and status, end to end -----------------------------------------------------------------


def test_once_pushes_every_user_with_contacts(sync: Sync) -> None:
    """One ``once`` leaves EngageLab holding every user's contacts and reports what it pushed."""
    sync.users.add_users(range(1, 31))

    result = sync("once")

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"cycle \d+ ok: 30 rows read; users: synced 30, unchanged 0, retrying 0, deferred 0, "
        r"failed 0, skipped 0, left 0\n",
        result.stdout,
    ), result.stdout
    assert sync.emulator.contacts == sync.users.expected_contacts()


def test_second_once_makes_no_api_call(sync: Sync) -> None:
    """A cycle over rows that have not changed since the last push calls nothing."""
    sync.users.add_users(range(1, 31))
    assert sync("once").returncode == 0
    before = sync.requests()

    result = sync("once")

    assert result.returncode == 0, result.stderr
    assert sync.requests() == before
    assert ": synced 0, unchanged 30," in result.stdout


def test_changed_email_makes_one_request_for_that_user(sync: Sync) -> None:
    """After one user's email changes, the next cycle sends exactly that user, once."""
    sync.users.add_users(range(1, 31))
    assert sync("once").returncode == 0
    before = sync.requests()
    sync.users.change(7, email="changed7@example.com")

    result = sync("once")

    assert result.returncode == 0, result.stderr
    assert sync.requests() == before + 1
    assert sync.emulator.received(1007)[-1] == {"email": "changed7@example.com"}
    assert {euid for euid, got in sync.emulator.all_received().items() if len(got) > 1} == {1007}
    assert sync.emulator.contacts == sync.users.expected_contacts()


def test_invalid_euids_are_recorded_as_skipped_with_the_reason(sync: Sync) -> None:
    """Users whose euid is NULL or not positive are not sent, and ``status`` says why."""
    sync.users.add_users(range(1, 6))
    sync.users.add_users([6], engagelab_euid=None)
    sync.users.add_users([7], engagelab_euid=-5)
    assert sync("once").returncode == 0

    result = sync("status")

    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+6\s+-\s+skipped\s.*euid is empty", result.stdout, re.M), result.stdout
    assert re.search(r"^\s+7\s+-\s+skipped\s.*euid -5 is not positive", result.stdout, re.M)
    assert set(sync.emulator.all_received()) == {1001, 1002, 1003, 1004, 1005}


def test_status_shows_counts_runs_and_skipped_users(sync: Sync) -> None:
    """``status`` shows the counts by status, every run newest first, and the skipped users."""
    sync.users.add_users(range(1, 6))
    sync.users.add_users([6], engagelab_euid=None)
    assert sync("once").returncode == 0
    assert sync("once").returncode == 0

    result = sync("status")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "users: synced 5, retrying 0, failed 0, skipped 1, left 0 (total 6)" in out
    runs = re.findall(r"^\s+(\d+)\s+\S+ \S+\s+(\w+)\s+((?:\d+\s+){6}\d+)", out, re.M)
    assert [(outcome, counts.split()) for _, outcome, counts in runs] == [
        ("ok", ["6", "0", "6", "0", "0", "0", "0"]),
        ("ok", ["6", "5", "0", "0", "0", "0", "1"]),
    ], out
    assert int(runs[0][0]) > int(runs[1][0])
    assert "users not synced" in out
    assert re.search(r"^\s+6\s+-\s+skipped\s", out, re.M), out


def test_wrong_secret_exits_3_and_loses_nothing(sync: Sync) -> None:
    """EngageLab refusing the credentials stops the cycle at once (exit 3) and loses no user."""
    add_users_in_order(sync.users, range(1, 31))
    concurrency = 3
    sync.write(
        secret=WRONG_SECRET, source={"lookback": "0s"}, engagelab={"concurrency": concurrency}
    )

    refused = sync("once")

    assert refused.returncode == 3, refused.stderr
    assert "EngageLab refused the sync" in refused.stderr
    assert "code 40050" in refused.stderr
    assert WRONG_SECRET not in refused.stderr + refused.stdout
    assert_no_traceback(refused)
    assert 1 <= sync.requests() <= concurrency
    assert sync.emulator.contacts == {}

    sync.write(source={"lookback": "0s"})
    fixed = sync("once")

    assert fixed.returncode == 0, fixed.stderr
    assert sync.emulator.contacts == sync.users.expected_contacts()
    assert all(len(got) == 1 for got in sync.emulator.all_received().values())


# -- arguments ----------------------------------------------------------------------------------


def test_version_prints_the_version() -> None:
    """``--version`` prints the program and its version and exits 0."""
    result = cdc_sync(None, "--version")

    assert result.returncode == 0
    assert result.stdout == f"cdc-sync {__version__}\n"


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    """Without a command the program prints its usage and exits 2."""
    result = cdc_sync(offline_config(tmp_path))

    assert result.returncode == 2
    assert result.stderr.startswith("usage: cdc-sync")
    assert "the following arguments are required: COMMAND" in result.stderr


def test_help_describes_the_program_and_lists_every_exit_status(tmp_path: Path) -> None:
    """``--help`` says what cdc-sync does (not how it is wired) and lists the exit statuses."""
    result = cdc_sync(None, "--help")

    assert result.returncode == 0
    assert "in step with an application's user table" in result.stdout
    assert "collaborators" not in result.stdout
    statuses = re.findall(r"^  (\d+) ", result.stdout.split("exit statuses:")[1], re.MULTILINE)
    assert statuses == ["0", "1", "2", "3", "4", "5", "69", "75", "78", "141"]


# -- output -------------------------------------------------------------------------------------


def test_output_into_a_closed_pipe_exits_141_without_a_traceback(tmp_path: Path) -> None:
    """``cdc-sync status | head`` whose reader has gone ends quietly, with SIGPIPE's status."""
    config = offline_config(tmp_path)
    assert cdc_sync(config, "migrate").returncode == 0
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before cdc-sync writes a byte

    try:
        result = subprocess.run(
            [sys.executable, "-m", "cdc_sync.cli", "-c", str(config), "status"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(writer)

    assert result.returncode == 141
    assert result.stderr == ""


# -- the systemd unit ---------------------------------------------------------------------------


def test_the_units_documentation_is_a_file_the_documented_install_creates() -> None:
    """Every ``file://`` of the unit's ``Documentation=`` is the target of the README's install."""
    root = Path(__file__).resolve().parent.parent
    unit = (root / "systemd" / "cdc-sync.service").read_text()
    readme = (root / "README.md").read_text()
    install = readme.split("## Installing the systemd unit", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].split() for line in install.splitlines()]
    targets = {words[-1] for words in commands if words[:1] == ["install"]}

    documented = re.findall(r"^Documentation=(.+)$", unit, re.MULTILINE)[0].split()

    files = [uri.removeprefix("file://") for uri in documented if uri.startswith("file://")]
    assert files
    assert set(files) <= targets, (files, targets)


def test_sslmode_in_a_database_url_reaches_libpq(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """The README's database TLS advice holds: ``?sslmode=`` in the URL is libpq's to enforce."""
    config = offline_config(tmp_path, source={"url": users.url}, engagelab=reachable(api))
    assert cdc_sync(config, "migrate").returncode == 0

    plain = cdc_sync(config, "check")
    edit(config, "source.url", users.url + "?sslmode=require")  # the test server has no TLS
    demanding = cdc_sync(config, "check")

    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert demanding.returncode == 69
    assert "server does not support SSL" in demanding.stderr
    assert_no_traceback(demanding)


def test_an_untrusted_certificate_exits_3_saying_what_failed(users: UserDb, tmp_path: Path) -> None:
    """A certificate the client refuses ends ``once`` with exit 3 and a configuration message."""
    add_users_in_order(users, range(1, 4))
    with https_server(trustme.CA()) as url:
        config = write_config(
            tmp_path / "config.yaml",
            source_url=users.url,
            state_url=f"sqlite:///{tmp_path}/state.db",
            api_url=url,
        )
        assert cdc_sync(config, "migrate").returncode == 0

        result = cdc_sync(config, "once", env=environ(SSL_CERT_FILE=None, SSL_CERT_DIR=None))

    assert result.returncode == 3
    said = "cannot reach EngageLab as configured: the TLS certificate of 127.0.0.1:"
    assert said in result.stderr
    assert "certifi's bundle" in result.stderr
    assert "check engagelab.base_url" in result.stderr
    assert_no_traceback(result)


# -- egress through a proxy ---------------------------------------------------------------------


def test_once_through_an_authenticating_proxy_never_shows_its_password(
    users: UserDb, api: EmulatorServer, authenticating_proxy: TinyProxy, tmp_path: Path
) -> None:
    """engagelab.proxy with credentials carries the pushes; no output, log or check shows them."""
    user, password = PROXY_USER
    add_users_in_order(users, range(1, 4))
    proxy = authenticating_proxy.url.replace("://", f"://{user}:{password}@")
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
        engagelab={"proxy": "${PROXY}"},
        logging={"level": "DEBUG", "format": "json"},
    )
    env = environ(PROXY=proxy)
    assert cdc_sync(config, "migrate", env=env).returncode == 0

    once = cdc_sync(config, "once", env=env)
    check = cdc_sync(config, "check", env=env)

    assert once.returncode == 0, once.stderr
    assert api.emulator.stats()["accepted"] == 3
    assert len(authenticating_proxy.requests()) == 4  # the pushes, and check's probe
    assert check.returncode == 0, check.stdout + check.stderr
    assert "credentials accepted" in check.stdout
    route = f"{authenticating_proxy.url} (engagelab.proxy), absolute-form requests, with Proxy-"
    assert f"proxy      {route}Authorization" in check.stdout, check.stdout
    shown = once.stdout + once.stderr + check.stdout + check.stderr
    assert password not in shown
    assert base64.b64encode(f"{user}:{password}".encode()).decode() not in shown


def test_an_unusable_proxy_is_a_config_error_that_does_not_quote_it(tmp_path: Path) -> None:
    """A proxy URL cdc-sync cannot use exits 78 naming the key, and its password stays hidden."""
    config = offline_config(tmp_path, engagelab={"proxy": "socks5://u:pr0xy-pa55word@p:1080"})

    result = cdc_sync(config, "check")

    assert result.returncode == 78
    assert "engagelab.proxy: a proxy is reached over plain http, not socks5" in result.stderr
    assert "pr0xy-pa55word" not in result.stderr
    assert_no_traceback(result)


def test_an_unusable_proxy_variable_exits_69_naming_it(sync: Sync) -> None:
    """HTTPS_PROXY that cdc-sync cannot use stops ``once`` with a message naming the variable."""
    env = environ(HTTPS_PROXY="socks5://u:pr0xy-pa55word@p:1080", https_proxy=None)

    result = cdc_sync(sync.config, "once", env=env)

    assert result.returncode == 69
    assert "the proxy in the environment is unusable: HTTPS_PROXY:" in result.stderr
    assert "pr0xy-pa55word" not in result.stderr
    assert_no_traceback(result)


# -- personal data and secrets: in no output, log line or tracking table ------------------------

SOURCE_PASSWORD = "Src-Pa55w0rd-91"
STATE_PASSWORD = "State-Pa55w0rd-92"


def with_password(url: str, password: str) -> str:
    """A test server's URL with a password (the servers trust loopback, so any is accepted)."""
    return url.replace(
        "postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{password}@"
    )


def tracking_rows(state_url: str) -> str:
    """Every row of every tracking table, as text."""
    from sqlalchemy import create_engine, select

    from cdc_sync.models import sync_runs, sync_state, sync_status

    engine = create_engine(state_url)
    with engine.connect() as connection:
        rows = [
            repr(tuple(row))
            for table in (sync_state, sync_status, sync_runs)
            for row in connection.execute(select(table))
        ]
    engine.dispose()
    return "\n".join(rows)


def test_no_secret_password_or_contact_value_reaches_any_output_or_table(
    users: UserDb, state_url: str, tmp_path: Path
) -> None:
    """After runs whose failures echo the values sent (permanent, transient, a code beyond 32
    bits, an HTML page, a fatal answer), no command output, log line or tracking-table row holds
    the API secret, the Basic auth header, a database password or any user's contact value."""
    people = {i: (f"Person.{i}@Example.org", f"+86139000{i:05}") for i in range(1, 11)}
    users.insert(
        {"id": i, "email": email, "mobile": phone, "engagelab_euid": 1000 + i}
        for i, (email, phone) in people.items()
    )
    lowered, bare = people[5][0].lower(), people[5][1][1:]
    answers = {
        1001: (400, '{"code": 55004, "message": "invalid value: {email} / {mobile_phone}"}'),
        1002: (500, '{"code": -1, "message": "upstream failed for {email}"}'),
        1003: (400, '{"code": 3000000000, "message": "bad {mobile_phone}"}'),
        1004: (503, "<html>{email} {mobile_phone}</html>"),
        1005: (400, f'{{"code": 55123, "message": "unknown user {lowered} ({bare})"}}'),
    }
    on_sqlite = state_url.startswith("sqlite")
    state = state_url if on_sqlite else with_password(state_url, STATE_PASSWORD)
    emulator = Emulator("key", SECRET, faults=Faults(answers=answers))
    outputs = []
    with EmulatorServer(emulator) as api:
        config = write_config(
            tmp_path / "config.yaml",
            source_url=with_password(users.url, SOURCE_PASSWORD),
            state_url=state,
            api_url=api.url,
            secret=SECRET,
            logging={"level": "DEBUG", "format": "json"},
        )
        outputs.append(cdc_sync(config, "migrate"))
        outputs.append(cdc_sync(config, "once"))
        new_email = "Changed.6@Example.org"
        users.change(6, email=new_email)
        fatal = '{"code": 40050, "message": "authentication failed for {email}"}'
        emulator.set_faults(Faults(answers={1006: (401, fatal)}))
        outputs.append(refused := cdc_sync(config, "once"))
        emulator.set_faults(Faults(answers=answers))
        outputs.extend(cdc_sync(config, command) for command in ("once", "status", "check"))

    # once: users failed for good (4), refused (3), then the failed unchanged, others retrying (5)
    assert [r.returncode for r in outputs] == [0, 4, 3, 5, 0, 0], [r.stderr for r in outputs]
    assert "authentication failed for <email>" in refused.stderr  # the message is kept, redacted
    token = base64.b64encode(f"key:{SECRET}".encode()).decode()
    needles = [SECRET, token, SOURCE_PASSWORD, STATE_PASSWORD, new_email]
    needles += [value for contact in people.values() for value in contact]
    needles += [phone[1:] for _, phone in people.values()]
    haystack = "\n".join(r.stdout + r.stderr for r in outputs) + tracking_rows(state_url)
    assert "invalid value: <email> / <mobile_phone>" in haystack  # the scan sees the messages
    found = [needle for needle in needles if needle.casefold() in haystack.casefold()]
    assert found == []


def test_a_sqlite_contact_that_is_not_utf8_skips_its_user_and_quotes_nothing(
    tmp_path: Path, api: EmulatorServer
) -> None:
    """A SQLite contact holding bytes that are not UTF-8 skips that user with a reason and the
    rest sync (once: exit 69 on every run, with the value quoted in the message)."""
    import sqlite3

    source = tmp_path / "source.db"
    users = UserDb(f"sqlite:///{source}")
    users.add_users(range(1, 6))
    users.dispose()
    with sqlite3.connect(source) as connection:
        connection.execute("UPDATE users SET email = CAST(X'61FF62' AS TEXT) WHERE id = 3")
    config = write_config(
        tmp_path / "config.yaml",
        source_url=f"sqlite:///{source}",
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
        logging={"level": "DEBUG", "format": "json"},
    )
    assert cdc_sync(config, "migrate").returncode == 0

    outputs = [cdc_sync(config, "once"), cdc_sync(config, "once"), cdc_sync(config, "status")]

    assert [r.returncode for r in outputs] == [0, 0, 0], outputs[0].stderr
    assert set(api.emulator.all_received()) == {1001, 1002, 1004, 1005}
    assert re.search(
        r"^\s+3\s+1003\s+skipped\s.*contact email is not valid UTF-8 text", outputs[2].stdout, re.M
    ), outputs[2].stdout
    text = "\n".join(r.stdout + r.stderr for r in outputs) + tracking_rows(
        f"sqlite:///{tmp_path}/state.db"
    )
    assert "a\ufffdb" not in text and "a\\xffb" not in text and "a\\udcffb" not in text


@pytest.mark.parametrize(("query", "expected"), [("", 10), ("?connect_timeout=3", "3")])
def test_postgres_connections_give_up_on_a_server_that_does_not_answer(
    pg_database: str, query: str, expected: object
) -> None:
    """Source and tracking connections to PostgreSQL have a connect timeout, 10 s unless the
    URL sets one: an unreachable host cannot hold a stop for minutes."""
    seen: list[object] = []
    for build in (source_engine, state_engine):
        engine = build(pg_database + query)
        event.listen(engine, "do_connect", lambda *args: seen.append(args[3]["connect_timeout"]))
        with engine.connect():
            pass
        engine.dispose()

    assert seen == [expected, expected]


# -- honest exits, status without the secret, status --json, check's credentials -----------------


def test_once_exits_5_when_engagelab_is_unreachable(sync: Sync) -> None:
    """With nothing answering, every user is left retrying and ``once`` exits 5, not 0."""
    sync.users.add_users(range(1, 11))
    sync.write(engagelab={"base_url": "http://127.0.0.1:9"})

    result = sync("once")

    assert result.returncode == 5, result.stdout + result.stderr
    assert "users: synced 0, unchanged 0, retrying 10," in result.stdout
    assert_no_traceback(result)


def test_a_dry_run_exits_0_with_every_user_left_retrying(sync: Sync) -> None:
    """``once --dry-run`` sends nobody, so it exits 0 even when every user is retrying and due;
    it counts each once, as the cycle would send each once (by the scan that re-reads them)."""
    sync.users.add_users(range(1, 6))
    sync.write(engagelab={"base_url": "http://127.0.0.1:9"})
    assert sync("once").returncode == 5
    assert sync("retry").returncode == 0

    preview = sync("once", "--dry-run")

    assert preview.returncode == 0, preview.stdout + preview.stderr
    assert "  read:    5 rows, 0 users due for a retry\n  push:    5\n" in preview.stdout
    assert "  e.g.:    1, 2, 3, 4, 5\n" in preview.stdout


def test_once_exits_4_when_a_user_fails_for_good(sync: Sync) -> None:
    """A user EngageLab refuses for good makes ``once`` exit 4; the next, clean cycle exits 0."""
    sync.users.add_users(range(1, 6))
    sync.emulator.set_faults(Faults(fail_codes={1003: 55108}))

    failed = sync("once")
    again = sync("once")

    assert failed.returncode == 4, failed.stdout + failed.stderr
    assert ", failed 1," in failed.stdout
    assert again.returncode == 0, again.stdout + again.stderr  # user 3 is unchanged since


def test_status_and_migrate_need_no_engagelab_secret(sync: Sync) -> None:
    """Commands that never call the API run without the secret; ``once`` still asks for it."""
    sync.users.add_users(range(1, 4))
    assert sync("once").returncode == 0
    sync.write(engagelab={"api_secret": "${ENGAGELAB_API_SECRET}"})
    env = environ(ENGAGELAB_API_SECRET=None)

    status = cdc_sync(sync.config, "status", env=env)
    migrate = cdc_sync(sync.config, "migrate", env=env)
    once = cdc_sync(sync.config, "once", env=env)

    assert status.returncode == 0, status.stderr
    assert "users: synced 3," in status.stdout
    assert migrate.returncode == 0, migrate.stderr
    assert once.returncode == 78
    assert "engagelab.api_secret: environment variable ENGAGELAB_API_SECRET is not set" in (
        once.stderr
    )


def test_status_json_is_for_scripts(sync: Sync) -> None:
    """``status --json`` prints the users by status, the runs and the problem users as JSON."""
    sync.users.add_users(range(1, 4))
    sync.users.add_users([4], engagelab_euid=None)
    assert sync("once").returncode == 0

    result = sync("status", "--json")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["users"] == {"synced": 3, "retrying": 0, "failed": 0, "skipped": 1, "left": 0}
    [run] = data["runs"]
    assert (run["outcome"], run["rows_read"], run["synced"], run["skipped"]) == ("ok", 4, 3, 1)
    assert datetime.fromisoformat(run["started_at"]).tzinfo is not None
    assert [(p["source_key"], p["status"]) for p in data["problems"]] == [("4", "skipped")]
    assert data["progress"] is None


@pytest.mark.parametrize(
    ("secret", "faults", "status", "says"),
    [
        ("secret", Faults(), 0, "credentials accepted"),
        (WRONG_SECRET, Faults(), 3, "credentials REFUSED (HTTP 401, code 40050"),
        ("secret", Faults(server_error_rate=1.0), 0, "credentials not proven"),
    ],
    ids=["accepted", "refused", "neither"],
)
def test_check_proves_the_credentials_without_changing_a_user(
    sync: Sync, secret: str, faults: Faults, status: int, says: str
) -> None:
    """``check`` sends one request that can change no user and says what its answer proves."""
    sync.write(secret=secret)
    sync.emulator.set_faults(faults)

    result = sync("check")

    assert result.returncode == status, result.stdout + result.stderr
    assert says in result.stdout
    assert sync.requests() == 1 and sync.emulator.contacts == {}
    # (as a word: the warning of a readable config names the key engagelab.api_secret)
    assert not re.search(rf"\b{re.escape(secret)}\b", result.stdout + result.stderr)
    if says == "credentials not proven":
        assert "relies on EngageLab checking credentials before the body" in result.stdout


def test_check_says_engagelab_is_unreachable_and_exits_69(sync: Sync) -> None:
    """Nothing answering at engagelab.base_url is a setup problem ``check`` names."""
    sync.write(engagelab={"base_url": "http://127.0.0.1:9"})

    result = sync("check")

    assert result.returncode == 69, result.stdout + result.stderr
    assert "UNREACHABLE (connection failed" in result.stdout
