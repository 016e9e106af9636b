"""Tests for cdc_sync.config: validation, defaults, redaction and database URLs."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
from configs import DELETE, ENV, REPO, SECRET, changed, failure, load, minimal, write
from pydantic import BaseModel, ValidationError

from cdc_sync.config import Settings, load_settings
from cdc_sync.configfile import interpolate
from cdc_sync.errors import ConfigError
from cdc_sync.mapping import ContactKey

# --- the shipped and documented configs -------------------------------------------------------


def test_shipped_config_loads() -> None:
    """The example config.yaml at the repository root loads once the two variables are set."""
    settings = load_settings(REPO / "config.yaml", ENV)

    assert settings.source.url == "postgresql+psycopg://cdc_reader@replica.internal:5432/app"
    assert settings.contacts == {
        "email": "email",
        "mobile_phone": "mobile",
        "landline_phone": "landline",
        "whatsapp_phone": "whatsapp",
    }
    assert settings.state.url == f"sqlite:///{REPO / 'cdc-sync-state.db'}"
    assert settings.engagelab.api_secret.get_secret_value() == SECRET


def configuration_reference() -> str:
    """The README's "Configuration" section, up to the next second-level heading."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]


def test_documented_example_loads(tmp_path: Path) -> None:
    """The minimal YAML example in the README's configuration reference loads as written."""
    text = configuration_reference()
    example = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)[-1]
    path = tmp_path / "config.yaml"
    path.write_text(example, encoding="utf-8")

    settings = load_settings(path, ENV)

    assert settings.name == "users"


def test_reference_documents_every_key() -> None:
    """The README's configuration reference has a row for every key the models accept, no others."""
    text = configuration_reference()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))
    models = [Settings, *(field.annotation for field in Settings.model_fields.values())]
    accepted = {
        field.alias or name
        for model in models
        if isinstance(model, type) and issubclass(model, BaseModel)
        for name, field in model.model_fields.items()
    } | set(get_args(ContactKey))

    assert documented == accepted


# --- defaults and accepted forms ---------------------------------------------------------------


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    """Every optional key takes the default the README lists."""
    settings = load(tmp_path, minimal())

    assert settings.source.schema_ is None
    assert settings.source.batch_size == 500
    assert settings.source.lookback == timedelta(minutes=5)
    assert settings.source.statement_timeout == timedelta(seconds=30)
    assert settings.state.url == f"sqlite:///{tmp_path / 'cdc-sync-state.db'}"
    assert settings.engagelab.base_url == "https://ma-api.engagelab.com"
    assert settings.engagelab.timeout == timedelta(seconds=10)
    assert settings.engagelab.concurrency == 8
    assert settings.engagelab.max_retry_after == timedelta(minutes=5)
    assert settings.engagelab.rate_limit == 50.0
    assert settings.engagelab.unknown_code == "permanent"
    assert settings.engagelab.codes == {}
    assert settings.engagelab.rate_limit_codes == ()
    assert settings.schedule.interval == timedelta(seconds=60)
    assert (settings.retry.base, settings.retry.max) == (timedelta(seconds=30), timedelta(hours=1))
    assert settings.retry.max_attempts == 20
    assert (settings.logging.level, settings.logging.format) == ("INFO", "json")
    assert settings.config_path == tmp_path / "config.yaml"


@pytest.mark.parametrize(
    ("key", "value", "read", "expected"),
    [
        ("source.lookback", 1000, lambda s: s.source.lookback, 1000),
        ("source.lookback", 0, lambda s: s.source.lookback, 0),
        ("source.lookback", "90s", lambda s: s.source.lookback, timedelta(seconds=90)),
        ("source.schema", "app", lambda s: s.source.schema_, "app"),
        ("source.batch_size", "250", lambda s: s.source.batch_size, 250),
        ("schedule.interval", 90, lambda s: s.schedule.interval, timedelta(seconds=90)),
        ("engagelab.timeout", 2.5, lambda s: s.engagelab.timeout, timedelta(seconds=2.5)),
        ("engagelab.rate_limit", 0, lambda s: s.engagelab.rate_limit, None),
        ("engagelab.rate_limit", "0", lambda s: s.engagelab.rate_limit, None),
        ("engagelab.rate_limit", None, lambda s: s.engagelab.rate_limit, None),
        ("engagelab.rate_limit", 12.5, lambda s: s.engagelab.rate_limit, 12.5),
        (
            "engagelab.base_url",
            "https://ma-api-usva.engagelab.com/",
            lambda s: s.engagelab.base_url,
            "https://ma-api-usva.engagelab.com",
        ),
        (
            "engagelab.base_url",
            "http://127.0.0.1:8080/prefix/",
            lambda s: s.engagelab.base_url,
            "http://127.0.0.1:8080/prefix",
        ),
        (
            "engagelab.codes",
            {40050: "fatal", "55014": "Transient", -1: "permanent"},
            lambda s: s.engagelab.codes,
            {40050: "fatal", 55014: "transient", -1: "permanent"},
        ),
        ("engagelab.rate_limit_codes", [42900], lambda s: s.engagelab.rate_limit_codes, (42900,)),
        ("engagelab.unknown_code", "transient", lambda s: s.engagelab.unknown_code, "transient"),
        ("logging.level", "debug", lambda s: s.logging.level, "DEBUG"),
        ("logging.format", "Console", lambda s: s.logging.format, "console"),
        ("metrics.listen", None, lambda s: s.metrics.address, None),
        ("metrics.listen", "127.0.0.1:9464", lambda s: s.metrics.address, ("127.0.0.1", 9464)),
        ("metrics.listen", "[::1]:9464", lambda s: s.metrics.address, ("::1", 9464)),
    ],
)
def test_accepted_forms_are_normalised(
    tmp_path: Path, key: str, value: object, read: Any, expected: object
) -> None:
    """Values the reference allows are accepted and stored in their normal form."""
    settings = load(tmp_path, changed(minimal(), key, value))

    assert read(settings) == expected


@pytest.mark.parametrize(
    "url",
    ["http://localhost:8080", "http://127.0.0.2:9", "http://[::1]:8080/v", "https://10.1.2.3"],
)
def test_plain_http_is_accepted_to_this_machine(tmp_path: Path, url: str) -> None:
    """Plain http:// is accepted to a loopback host (the emulator, a proxy), https anywhere."""
    settings = load(tmp_path, changed(minimal(), "engagelab.base_url", url))

    assert settings.engagelab.base_url == url


def test_plain_http_elsewhere_needs_allow_insecure_http(tmp_path: Path) -> None:
    """allow_insecure_http: true accepts plain http:// to another host, as the operator asked."""
    tree = changed(minimal(), "engagelab.base_url", "http://10.1.2.3:8080")

    settings = load(tmp_path, changed(tree, "engagelab.allow_insecure_http", True))

    assert settings.engagelab.base_url == "http://10.1.2.3:8080"


def test_lookback_integer_stays_cursor_units(tmp_path: Path) -> None:
    """A bare integer lookback stays an int (cursor units), not a number of seconds."""
    settings = load(tmp_path, changed(minimal(), "source.lookback", 300))

    assert type(settings.source.lookback) is int


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Settings cannot be changed after loading."""
    settings = load(tmp_path, minimal())

    with pytest.raises(ValidationError):
        settings.source.batch_size = 1


# --- validation rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "where", "fragment"),
    [
        ("name", DELETE, "name", "required key is missing"),
        ("name", "", "name", "not a sync name"),
        ("name", "has space", "name", "or '-' (got 'has space')"),
        ("name", "x" * 65, "name", "not a sync name"),
        ("sync_name", "x", "sync_name", "allowed keys here: name, source, contacts, state"),
        ("source", DELETE, "source", "required key is missing"),
        ("source.url", DELETE, "source.url", "required key is missing"),
        ("source.url", "not a url", "source.url", "not a database URL"),
        ("source.url", "postgres+nodriver://h/db", "source.url", "unknown database dialect"),
        ("source.table", "", "source.table", "must not be empty"),
        ("source.key", DELETE, "source.key", "required key is missing"),
        ("source.cursor", " ", "source.cursor", "must not be empty"),
        ("source.euid", DELETE, "source.euid", "required key is missing"),
        ("source.schema", "", "source.schema", "must not be empty"),
        ("source.schem", "app", "source.schem", "did you mean 'schema'?"),
        ("source.batch_size", 0, "source.batch_size", "at least 1 and at most 10000 (got 0)"),
        ("source.batch_size", 10_001, "source.batch_size", "at most 10000 (got 10001)"),
        ("source.batch_size", True, "source.batch_size", "expected a number, not true"),
        ("source.batch_size", "many", "source.batch_size", "valid integer"),
        ("source.lookback", -1, "source.lookback", "at least 0 and at most"),
        ("source.lookback", 1.5, "source.lookback", "must be a whole number"),
        ("source.lookback", "5 minutes", "source.lookback", "e.g. 30s, 5m, 1h (got '5 minutes')"),
        (
            "source.statement_timeout",
            "0s",
            "source.statement_timeout",
            "least 100ms and at most 1h",
        ),
        ("source.statement_timeout", 30, "source.statement_timeout", None),
        ("contacts", DELETE, "contacts", "required key is missing"),
        ("contacts", {}, "contacts", "map at least one of email"),
        ("contacts.fax", "fax", "contacts.fax", "'email', 'mobile_phone'"),
        ("contacts.email", "", "contacts.email", "must not be empty"),
        ("state.url", "sqlite://", "state.url", "in-memory database"),
        ("state.url", "sqlite:///:memory:", "state.url", "in-memory database"),
        ("state.path", "x.db", "state.path", "allowed keys here: url"),
        ("engagelab.base_url", "ftp://x", "engagelab.base_url", "not an http(s) base URL"),
        ("engagelab.base_url", "https://", "engagelab.base_url", "not an http(s) base URL"),
        ("engagelab.base_url", "https://h?x=1", "engagelab.base_url", "not an http(s) base URL"),
        ("engagelab.base_url", "http://ma-api.engagelab.com", "engagelab.base_url", "plain http"),
        ("engagelab.base_url", "http://10.1.2.3:8080", "engagelab.base_url", "allow_insecure_http"),
        ("engagelab.base_url", "http://127.0.0.1.nip.io", "engagelab.base_url", "unencrypted"),
        ("engagelab.api_key", DELETE, "engagelab.api_key", "required key is missing"),
        ("engagelab.api_key", "", "engagelab.api_key", "must not be empty"),
        ("engagelab.api_key", "k\n", "engagelab.api_key", "whitespace"),
        ("engagelab.api_secret", DELETE, "engagelab.api_secret", "required key is missing"),
        ("engagelab.api_secret", "", "engagelab.api_secret", "must not be empty"),
        ("engagelab.timeout", "0ms", "engagelab.timeout", "at least 100ms and at most 10m"),
        ("engagelab.timeout", -1, "engagelab.timeout", "not a duration"),
        ("engagelab.timeout", False, "engagelab.timeout", "expected a duration"),
        ("engagelab.max_retry_after", "61m", "engagelab.max_retry_after", "at most 1h"),
        ("engagelab.max_retry_after", -1, "engagelab.max_retry_after", "not a duration"),
        ("engagelab.max_retry_after", "0s", "engagelab.max_retry_after", None),
        ("engagelab.concurrency", 0, "engagelab.concurrency", "at least 1 and at most 256"),
        ("engagelab.concurrency", 257, "engagelab.concurrency", "at most 256 (got 257)"),
        ("engagelab.rate_limit", -5, "engagelab.rate_limit", "at least 0.1 and at most 100000"),
        ("engagelab.rate_limit", float("inf"), "engagelab.rate_limit", "at most 100000"),
        ("engagelab.unknown_code", "fatal", "engagelab.unknown_code", "'permanent' or"),
        ("engagelab.codes", {40050: "ignore"}, "engagelab.codes.40050", "'transient', 'perm"),
        ("engagelab.codes", {"abc": "fatal"}, "engagelab.codes.abc", "valid integer"),
        ("engagelab.codes", {0: "fatal"}, "engagelab.codes.0", "code 0 is success"),
        ("engagelab.rate_limit_codes", [1, "x"], "engagelab.rate_limit_codes.1", "integer"),
        ("engagelab.rate_limit_codes", [0], "engagelab.rate_limit_codes.0", "code 0 is success"),
        ("schedule.interval", "999ms", "schedule.interval", "must be at least 1s"),
        ("schedule.every", "1m", "schedule.every", "allowed keys here: interval"),
        ("retry.base", "0s", "retry.base", "at least 100ms and at most 1h"),
        ("retry.max", "10s", "retry.max", "10s is shorter than base (30s)"),
        ("retry.max_attempts", 0, "retry.max_attempts", "at least 1 and at most 10000"),
        ("logging.level", "TRACE", "logging.level", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ("logging.format", "xml", "logging.format", "'json' or 'console' (got 'xml')"),
        ("normalize.phone_region", "jp", "normalize.phone_region", None),
        ("normalize.phone_region", "XX", "normalize.phone_region", "not a region phonenumbers"),
        ("normalize.phone_format", "E164", "normalize.phone_format", None),
        ("normalize.phone_format", "plus", "normalize.phone_format", "'e164' or 'digits'"),
        (
            "normalize.phone_formats",
            {"email": "digits"},
            "normalize.phone_formats.email",
            "'mobile_phone', 'landline_phone' or 'whatsapp_phone'",
        ),
        ("normalize.phone_formats", {"whatsapp_phone": "digits"}, "normalize.phone_formats", None),
        ("normalize.email", True, "normalize.email", "did you mean 'emails'?"),
        ("source.consent", "", "source.consent", "must not be empty"),
        ("source.deleted", "deleted_at", "source.deleted", None),
        ("engagelab.on_leave", "CLEAR", "engagelab.on_leave", None),
        ("engagelab.on_leave", "delete", "engagelab.on_leave", "'keep' or 'clear'"),
        ("metrics.listen", "9464", "metrics.listen", "not HOST:PORT with a port from 1 to 65535"),
        ("metrics.listen", "localhost:http", "metrics.listen", "(got 'localhost:http')"),
        ("metrics.listen", "localhost:70000", "metrics.listen", "not HOST:PORT"),
        ("metrics.listen", "localhost:0", "metrics.listen", "not HOST:PORT"),
        ("metrics.listen", "[::1]:9464", "metrics.listen", None),
        ("metrics.listen", "127.0.0.1:9464/metrics", "metrics.listen", "not HOST:PORT"),
    ],
)
def test_invalid_values_name_their_key_path(
    tmp_path: Path, key: str, value: object, where: str, fragment: str | None
) -> None:
    """Each validation rule reports the dotted key path of the value that broke it."""
    tree = changed(minimal(), key, value)
    if fragment is None:  # a valid value: the row pins that it is accepted
        load(tmp_path, tree)
        return

    error = failure(tmp_path, tree)

    assert error.key == where
    assert str(error).startswith(f"{tmp_path / 'config.yaml'}: {where}: ")
    assert fragment in error.problem


def test_rate_limit_code_cannot_also_be_permanent(tmp_path: Path) -> None:
    """A code listed as throttling may not be classified as anything but transient."""
    tree = changed(minimal(), "engagelab.codes", {42900: "permanent"})
    tree = changed(tree, "engagelab.rate_limit_codes", [42900])

    error = failure(tmp_path, tree)

    assert error.key == "engagelab.rate_limit_codes.0"
    assert "code 42900 means throttling" in error.problem


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    """Several invalid values give one ConfigError with one 'path: key: problem' line each."""
    tree = changed(minimal(), "source.batch_size", 0)
    tree = changed(tree, "contacts.fax", "fax")
    tree = changed(tree, "logging.level", "loud")

    error = failure(tmp_path, tree)

    lines = str(error).splitlines()
    path = tmp_path / "config.yaml"
    assert error.key == "source.batch_size"
    assert [line.split(": ")[:2] for line in lines] == [
        [str(path), "source.batch_size"],
        [str(path), "contacts.fax"],
        [str(path), "logging.level"],
    ]


# --- database URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://r@h:5432/app", "postgresql+psycopg://r@h:5432/app"),
        ("postgresql://r@h:5432/app", "postgresql+psycopg://r@h:5432/app"),
        ("postgresql+psycopg://r@h/app", "postgresql+psycopg://r@h/app"),
    ],
)
def test_postgres_urls_name_psycopg(tmp_path: Path, given: str, expected: str) -> None:
    """postgres:// and driverless postgresql:// URLs are rewritten to postgresql+psycopg://."""
    tree = changed(minimal(), "source.url", given)
    tree = changed(tree, "state.url", given.replace("/app", "/cdc"))

    settings = load(tmp_path, tree)

    assert settings.source.url == expected
    assert settings.state.url == expected.replace("/app", "/cdc")


def test_a_driver_that_is_not_installed_is_refused(tmp_path: Path) -> None:
    """A URL naming a driver cdc-sync does not ship is a config error naming the module."""
    tree = changed(minimal(), "source.url", "postgresql+psycopg2://r@h/app")

    with pytest.raises(
        ConfigError,
        match=r"source\.url: the driver for 'postgresql\+psycopg2' "
        r"is not installed \(psycopg2\)",
    ):
        load(tmp_path, tree)


@pytest.mark.parametrize(
    ("given", "relative"),
    [
        ("sqlite:///state.db", "state.db"),
        ("sqlite:///sub/state.db", "sub/state.db"),
        ("sqlite+pysqlite:///state.db", "state.db"),
        ("sqlite:///../state.db", "../state.db"),
    ],
)
def test_relative_sqlite_path_is_anchored_at_config_dir(
    tmp_path: Path, given: str, relative: str
) -> None:
    """A relative SQLite path is resolved against the config file's directory, not the cwd."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()

    settings = load(config_dir, changed(minimal(), "state.url", given))

    scheme = given.split(":///")[0]
    expected = os.path.normpath(config_dir / relative)
    assert settings.state.url == f"{scheme}:///{expected}"


def test_absolute_sqlite_path_is_kept(tmp_path: Path) -> None:
    """An absolute SQLite path is used as written."""
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'state.db'}"

    settings = load(tmp_path, changed(minimal(), "state.url", url))

    assert settings.state.url == url


def test_relative_sqlite_source_is_anchored_too(tmp_path: Path) -> None:
    """A relative SQLite source (demo, tests) is anchored at the config directory as well."""
    settings = load(tmp_path, changed(minimal(), "source.url", "sqlite:///app.db"))

    assert settings.source.url == f"sqlite:///{tmp_path / 'app.db'}"


@pytest.mark.parametrize(
    ("source", "state"),
    [
        ("postgresql+psycopg://r@replica/app", "postgresql+psycopg://r@replica/app"),
        ("postgresql+psycopg://r:a@replica/app", "postgresql+psycopg://r:b@replica/app"),
        ("postgresql+psycopg://reader@replica/app", "postgres://writer@REPLICA:5432/app"),
        ("sqlite:///same.db", "sqlite:///same.db"),
    ],
)
def test_state_must_not_be_the_source(tmp_path: Path, source: str, state: str) -> None:
    """The tracking database is refused when it is the source database under any user or driver."""
    tree = changed(changed(minimal(), "source.url", source), "state.url", state)

    error = failure(tmp_path, tree)

    assert error.key == "state.url"
    assert "the tracking database must not be the source database" in error.problem


@pytest.mark.parametrize(
    "state",
    [
        "postgresql+psycopg://r@replica/cdc",
        "postgresql+psycopg://r@primary/app",
        "postgresql+psycopg://r@replica:5433/app",
    ],
)
def test_state_on_another_database_is_accepted(tmp_path: Path, state: str) -> None:
    """Another database name, host or port is a different database and is accepted."""
    tree = changed(minimal(), "source.url", "postgresql+psycopg://r@replica/app")

    settings = load(tmp_path, changed(tree, "state.url", state))

    assert settings.state.url == state


def test_settings_built_in_code_anchor_at_cwd(tmp_path: Path, monkeypatch: Any) -> None:
    """Settings validated without a config file resolve relative SQLite paths at the cwd."""
    monkeypatch.chdir(tmp_path)
    tree = interpolate(minimal(), ENV, "-")

    settings = Settings.model_validate(tree)

    assert settings.state.url == f"sqlite:///{tmp_path / 'cdc-sync-state.db'}"
    assert settings.config_path == Path("config.yaml")


def test_the_proxy_password_never_appears_in_repr_or_redacted(tmp_path: Path) -> None:
    """engagelab.proxy is kept as a secret; redacted() shows only its host and port."""
    tree = changed(minimal(), "engagelab.proxy", "http://egress:proxy-pass-99@proxy.corp:3128")
    settings = load(tmp_path, tree)

    shown = [repr(settings), str(settings), repr(settings.engagelab), str(settings.redacted())]

    assert all("proxy-pass-99" not in text for text in shown)
    assert settings.redacted()["engagelab"]["proxy"] == "http://proxy.corp:3128"


def test_an_unusable_proxy_is_refused_without_quoting_it(tmp_path: Path) -> None:
    """A proxy URL cdc-sync cannot use is an error at engagelab.proxy that never quotes it."""
    tree = changed(minimal(), "engagelab.proxy", "https://egress:proxy-pass-99@proxy.corp:3128")

    error = failure(tmp_path, tree)

    assert error.key == "engagelab.proxy"
    assert "a proxy is reached over plain http, not https" in str(error)
    assert "proxy-pass-99" not in str(error)


# --- source.identity ---------------------------------------------------------------------------


def test_identity_may_stand_in_for_euid(tmp_path: Path) -> None:
    """source.identity instead of source.euid names the column read and the identity resolved."""
    tree = changed(minimal(), "source.euid", DELETE)
    tree = changed(tree, "source.identity", {"name": "User_ID", "column": "app_user_id"})

    settings = load(tmp_path, tree)

    assert settings.source.euid is None
    assert settings.source.identity is not None
    assert (settings.source.identity.name, settings.source.euid_column) == (
        "user_id",
        "app_user_id",
    )


@pytest.mark.parametrize(
    ("identity", "euid", "where", "fragment"),
    [
        (None, DELETE, "source.euid", "or give source.identity instead"),
        ({"name": "user_id", "column": "uid"}, "engagelab_euid", "source.identity", "not both"),
        ({"name": "email", "column": "uid"}, DELETE, "source.identity.name", "'user_id'"),
        ({"name": "user_id"}, DELETE, "source.identity.column", "required key is missing"),
        ({"name": "user_id", "column": " "}, DELETE, "source.identity.column", "not be empty"),
        (
            {"name": "user_id", "colum": "uid"},
            DELETE,
            "source.identity.colum",
            "did you mean 'column'? allowed keys here: name, column",
        ),
    ],
)
def test_identity_and_euid_are_checked(
    tmp_path: Path, identity: object, euid: object, where: str, fragment: str
) -> None:
    """Exactly one of source.euid and source.identity, whose name and column are checked."""
    tree = changed(minimal(), "source.euid", euid)
    if identity is not None:
        tree = changed(tree, "source.identity", identity)

    error = failure(tmp_path, tree)

    assert where in str(error)
    assert fragment in str(error)


def test_without_credentials_the_api_key_and_secret_are_not_read(tmp_path: Path) -> None:
    """For commands that never call the API an unset secret variable is no error."""
    tree = changed(minimal(), "engagelab.api_secret", "${NOT_SET_ANYWHERE}")
    tree = changed(tree, "engagelab.api_key", DELETE)

    settings = load_settings(write(tmp_path, tree), {}, credentials=False)

    assert settings.name == minimal()["name"]
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
        load_settings(write(tmp_path, tree), {})
