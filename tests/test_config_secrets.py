"""Secrets in cdc_sync.config: no message, repr or printout ever depends on a secret's value."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from configs import ENV, SECRET, changed, failure, load, minimal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_sync.config import EngageLabSettings, load_settings
from cdc_sync.dburls import mask_password
from cdc_sync.errors import ConfigError
from cdc_sync.report import secret_warning

# Secrets a property test tries: one character (which text search masked everywhere), words that
# occur in our own messages, quoting and escaping characters, and unicode.
COMMON_SECRETS = [
    "s", "e", "1", ":", "'", '"', "\\", "*", "***", "$", "%", "@", "/", "secret", "password",
    "key", "unknown", "allowed", "line", "engagelab", "api_secret", "é", "密钥", "🔑", "a b",
]  # fmt: skip
ENGAGELAB_KEYS = {field.alias or name for name, field in EngageLabSettings.model_fields.items()}


def usable(secret: str) -> bool:
    """A secret cdc-sync accepts, that is also not one of engagelab's keys nor YAML's merge key."""
    return (
        secret == secret.strip()
        and secret != ""
        and "\x00" not in secret
        and not any("\ud800" <= char <= "\udfff" for char in secret)
        and secret not in ENGAGELAB_KEYS | {"<<"}
    )


secrets = st.one_of(st.sampled_from(COMMON_SECRETS), st.text(min_size=1, max_size=24)).filter(
    usable
)


def dump(directory: Path, tree: object) -> Path:
    """Write ``tree`` with every value on one line, so that line numbers do not depend on it."""
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False, width=math.inf), encoding="utf-8")
    return path


def secret_everywhere(secret: str) -> dict[str, Any]:
    """A config with ``secret`` in every place a secret can land, each invalid whatever it is."""
    encoded = quote(secret, safe="")
    tree = changed(minimal(), "engagelab.api_secret", secret.replace("$", "$$"))  # in the file
    tree["engagelab"][secret] = "pasted as a key"
    tree = changed(tree, "engagelab.timeout", "${SECRET} minutes")
    tree = changed(tree, "engagelab.base_url", f"https://u:{encoded}@ma-api.engagelab.com")
    tree = changed(tree, "engagelab.proxy", f"https://u:{encoded}@proxy.corp:3128")
    tree = changed(tree, "source.batch_size", "x${SECRET}")
    tree = changed(tree, "source.url", f"postgresql+nodriver://u:{encoded}@replica/app")
    tree = changed(tree, "state.url", f"sqlite://?password={encoded}")
    tree = changed(tree, "name", "${SECRET} x")
    return changed(tree, "logging.level", "${SECRET}!")


@functools.cache
def message(directory: Path, secret: str) -> str:
    """The whole error text of loading :func:`secret_everywhere` for ``secret``."""
    path = dump(directory, secret_everywhere(secret))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {**ENV, "SECRET": secret})
    return str(caught.value)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=secrets)
def test_no_error_message_depends_on_the_secret(tmp_path: Path, secret: str) -> None:
    """Whatever the secret and wherever it lands, the error text is the one another secret gives."""
    reference = message(tmp_path, "Reference-Secret-0")

    shown = message(tmp_path, secret)

    assert shown == reference
    assert "Reference-Secret-0" not in reference


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=secrets)
def test_no_printout_depends_on_the_secret(tmp_path: Path, secret: str) -> None:
    """repr, str and redacted() of valid settings do not change with the secret or passwords."""

    @functools.cache
    def printouts(secret: str) -> list[str]:
        encoded = quote(secret, safe="")
        tree = changed(minimal(), "source.url", f"postgresql://reader:{encoded}@replica/app")
        tree = changed(tree, "state.url", f"postgresql://writer@state-db/cdc?password={encoded}")
        tree = changed(tree, "engagelab.proxy", f"http://egress:{encoded}@proxy.corp:3128")
        loaded = load_settings(dump(tmp_path, tree), {**ENV, "ENGAGELAB_API_SECRET": secret})
        return [repr(loaded), str(loaded), repr(loaded.engagelab), str(loaded.redacted())]

    assert printouts(secret) == printouts("Reference-Secret-0")


def test_secret_never_appears_in_errors(tmp_path: Path) -> None:
    """A value taken from a variable is shown as the reference the file wrote, never expanded."""
    tree = changed(minimal(), "engagelab.timeout", "${ENGAGELAB_API_SECRET}")
    tree = changed(tree, "engagelab.api_key", None)
    tree = changed(tree, "source.batch_size", "${ENGAGELAB_API_SECRET}")

    error = failure(tmp_path, tree)

    text = str(error)
    assert SECRET not in text
    assert "engagelab.timeout: not a duration" in text
    assert "(got what '${ENGAGELAB_API_SECRET}' expands to)" in text
    assert "source.batch_size: input should be a valid integer" in text
    assert error.__cause__ is None
    assert error.__context__ is None


def test_a_key_beside_the_secret_is_named_by_its_line(tmp_path: Path) -> None:
    """An unknown key under engagelab, perhaps the secret pasted as a key, is given by line only."""
    path = tmp_path / "config.yaml"
    text = yaml.safe_dump(minimal(), sort_keys=False) + "schedule:\n  intervl: 1m\n"
    path.write_text(text.replace("  api_key:", f"  {SECRET}:\n  api_key:"), encoding="utf-8")
    line = text.splitlines().index("engagelab:") + 2

    with pytest.raises(ConfigError) as caught:
        load_settings(path, ENV)

    assert SECRET not in str(caught.value)
    assert f"engagelab: the key on line {line} (not shown: it may be a misplaced secret): " in str(
        caught.value
    )
    assert "allowed keys here: base_url, allow_insecure_http, api_key, api_secret" in str(
        caught.value
    )
    assert "schedule.intervl: unknown key; did you mean 'interval'?" in str(caught.value)


def test_secret_is_not_quoted_when_it_is_itself_invalid(tmp_path: Path) -> None:
    """An invalid api_secret is reported without echoing what was given."""
    tree = changed(minimal(), "engagelab.api_secret", f" {SECRET}")

    error = failure(tmp_path, tree)

    assert error.key == "engagelab.api_secret"
    assert SECRET not in str(error)


def test_secret_never_appears_in_repr_or_redacted(tmp_path: Path) -> None:
    """repr, str and redacted() of loaded settings hide the secret and URL passwords."""
    tree = changed(minimal(), "source.url", "postgresql://reader:db-pass-77@replica/app")
    tree = changed(tree, "state.url", "postgresql://writer@state-db/cdc?password=db-pass-88")
    settings = load(tmp_path, tree)

    shown = [repr(settings), str(settings), repr(settings.engagelab), str(settings.redacted())]

    for text in shown:
        assert SECRET not in text
        assert "db-pass-77" not in text
        assert "db-pass-88" not in text
    assert settings.redacted()["engagelab"]["api_secret"] == "***"
    assert settings.redacted()["source"]["url"] == "postgresql+psycopg://reader:***@replica/app"
    assert (
        settings.redacted()["state"]["url"]
        == "postgresql+psycopg://writer@state-db/cdc?password=***"
    )


def test_redacted_is_plain_data_in_config_syntax(tmp_path: Path) -> None:
    """redacted() returns YAML-shaped plain data with durations written as in the file."""
    settings = load(tmp_path, changed(minimal(), "source.schema", "app"))

    data = settings.redacted()

    assert data["source"]["schema"] == "app"
    assert data["source"]["lookback"] == "5m"
    assert data["retry"] == {"base": "30s", "max": "1h", "max_attempts": 20}
    assert yaml.safe_load(yaml.safe_dump(data)) == data


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("engagelab.base_url", "https://user:hunter22@host?x"),
        ("source.batch_size", "postgresql://u:hunter22@h/db"),
        ("source.url", "host=replica password=hunter22 dbname=app"),  # a libpq DSN: refused
    ],
)
def test_url_passwords_are_not_echoed_in_errors(tmp_path: Path, key: str, value: str) -> None:
    """A refused URL is not quoted when it is a URL setting or carries a password."""
    error = failure(tmp_path, changed(minimal(), key, value))

    assert error.key == key
    assert "hunter22" not in str(error)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u@h/db?password=p&sslmode=require", "postgresql://u@h/db?sslmode=require&password=***"),
        ("postgresql://h/db?sslpassword=p", "postgresql://h/db?sslpassword=***"),
        ("postgresql://u:p%40ss@h/db?PASSWORD=q", "postgresql://u:***@h/db?PASSWORD=***"),
        ("host=h password=p", "***"),
    ],
)  # fmt: skip
def test_mask_password(url: str, expected: str) -> None:
    """mask_password hides a URL's password in userinfo and in its query, and nothing else."""
    assert mask_password(url) == expected


@pytest.mark.parametrize(
    ("mode", "key", "value", "exposed"),
    [
        (0o644, "engagelab.api_secret", "literal-secret", ("engagelab.api_secret",)),
        (0o640, "engagelab.api_secret", "literal-secret", ("engagelab.api_secret",)),
        (0o600, "engagelab.api_secret", "literal-secret", ()),
        (0o644, "engagelab.api_secret", "${ENGAGELAB_API_SECRET}", ()),
        (0o644, "engagelab.api_secret", "${UNSET:-default-secret}", ("engagelab.api_secret",)),
        (0o644, "source.url", "postgresql://u:pw@replica/app", ("source.url",)),
        (0o644, "source.url", "postgresql://u:${PW}@replica/app", ()),
        (0o644, "state.url", "postgresql://u@state/cdc?password=pw", ("state.url",)),
        (0o644, "engagelab.proxy", "http://egress:pw@proxy.corp:3128", ("engagelab.proxy",)),
        (0o644, "engagelab.proxy", "http://egress:${PW}@proxy.corp:3128", ()),
    ],
)
def test_a_literal_secret_in_a_file_others_may_read_is_exposed(
    tmp_path: Path, mode: int, key: str, value: str, exposed: tuple[str, ...]
) -> None:
    """A secret written out (not ${VAR}) in a file group or others can read is reported."""
    path = dump(tmp_path, changed(minimal(), key, value))
    path.chmod(mode)

    settings = load_settings(path, {**ENV, "PW": "pw"})

    assert settings.exposed_secrets == exposed
    assert (secret_warning(settings) is not None) == bool(exposed)


def test_secret_warning_says_what_to_do(tmp_path: Path) -> None:
    """The check warning names the file, the keys and its mode, and says how to fix it."""
    path = dump(tmp_path, changed(minimal(), "engagelab.api_secret", "literal-secret"))
    path.chmod(0o644)

    warning = secret_warning(load_settings(path, ENV))

    assert warning is not None
    assert f"{path} holds engagelab.api_secret as written text" in warning
    assert "(mode 0644); run chmod 600 on it, or write ${VARIABLE} references" in warning
    assert "literal-secret" not in warning
