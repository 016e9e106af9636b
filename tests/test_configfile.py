"""Tests for cdc_sync.configfile: finding the file, reading its YAML, interpolating variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from configs import ENV, SECRET

from cdc_sync.config import load_settings
from cdc_sync.configfile import interpolate, resolve_config_path
from cdc_sync.errors import ConfigError

# --- interpolation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "environ", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
        ("${A}", {"A": ""}, ""),
        ("${A:-fallback}", {}, "fallback"),
        ("${A:-fallback}", {"A": ""}, "fallback"),
        ("${A:-fallback}", {"A": "set"}, "set"),
        ("${A:-}", {}, ""),
        ("a$$b", {}, "a$b"),
        ("$${A}", {"A": "x"}, "${A}"),
        ("${A}", {"A": "${B}"}, "${B}"),
        ({"k": ["${A}", {"n": "${A}"}]}, {"A": "x"}, {"k": ["x", {"n": "x"}]}),
        ({"${A}": "v"}, {"A": "x"}, {"${A}": "v"}),
        ({"n": 5, "b": True, "z": None, "f": 1.5}, {}, {"n": 5, "b": True, "z": None, "f": 1.5}),
    ],
)
def test_interpolate_expands_string_values(
    tree: Any, environ: dict[str, str], expected: Any
) -> None:
    """interpolate expands ${VAR}, ${VAR:-default} and $$ in string values only, once."""
    assert interpolate(tree, environ, "c.yaml") == expected


@pytest.mark.parametrize(
    ("tree", "key", "fragment"),
    [
        ({"engagelab": {"api_secret": "${NOPE}"}}, "engagelab.api_secret", "NOPE is not set"),
        ({"a": [{"b": "x"}, {"b": "${NOPE}"}]}, "a.1.b", "environment variable NOPE is not set"),
        ({"a": "cost $5"}, "a", "write $$ for a literal $"),
        ({"a": "$NOPE"}, "a", "${NAME}"),
        ({"a": "${NOPE"}, "a", "${NAME}"),
        ({"a": "${1X}"}, "a", "${NAME}"),
        ({"a": "${X:fallback}"}, "a", "${NAME:-default}"),
    ],
)
def test_interpolate_errors_name_the_key_path(tree: Any, key: str, fragment: str) -> None:
    """A bad or unset reference is a ConfigError naming the file and the key path."""
    with pytest.raises(ConfigError) as caught:
        interpolate(tree, {}, "c.yaml")

    assert (caught.value.path, caught.value.key) == ("c.yaml", key)
    assert fragment in caught.value.problem


def test_interpolate_reports_every_bad_reference() -> None:
    """All unset variables and bad references are in the one ConfigError, each at its key."""
    tree = {"a": "${ONE}", "b": ["x", "${TWO}"], "c": {"d": "$bad", "e": "${SET}"}}

    with pytest.raises(ConfigError) as caught:
        interpolate(tree, {"SET": "x"}, "c.yaml")

    lines = str(caught.value).splitlines()
    assert lines == [
        "c.yaml: a: environment variable ONE is not set",
        "c.yaml: b.1: environment variable TWO is not set",
        "c.yaml: c.d: a '$' must start ${NAME} or ${NAME:-default}; write $$ for a literal $",
    ]


def test_interpolate_error_does_not_quote_the_value() -> None:
    """A malformed reference is reported without quoting the value, which may be a secret."""
    with pytest.raises(ConfigError) as caught:
        interpolate({"engagelab": {"api_secret": f"{SECRET}$"}}, {}, "c.yaml")

    assert SECRET not in str(caught.value)


# --- finding and reading the file --------------------------------------------------------------


@pytest.mark.parametrize(
    ("cli_value", "environ", "expected"),
    [
        ("/etc/a.yaml", {"CDC_SYNC_CONFIG": "/etc/b.yaml"}, Path("/etc/a.yaml")),
        (None, {"CDC_SYNC_CONFIG": "/etc/b.yaml"}, Path("/etc/b.yaml")),
        (None, {"CDC_SYNC_CONFIG": ""}, Path("config.yaml")),
        (None, {}, Path("config.yaml")),
    ],
)
def test_resolve_config_path_prefers_cli_then_env(
    cli_value: str | None, environ: dict[str, str], expected: Path
) -> None:
    """The config file is -c/--config, else CDC_SYNC_CONFIG, else ./config.yaml."""
    assert resolve_config_path(cli_value, environ) == expected


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    """A missing file is a ConfigError listing the three ways to name one."""
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "absent.yaml", ENV)

    assert caught.value.key == ""
    assert "no such file; pass -c/--config, set CDC_SYNC_CONFIG" in str(caught.value)


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    """A YAML syntax error is reported with its line and column but not the line's text."""
    path = tmp_path / "config.yaml"
    path.write_text(f"name: users\nengagelab:\n  api_secret: {SECRET}: [\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, ENV)

    assert "not valid YAML at line 3, column" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.__context__ is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "the file is empty"), ("- a\n- b\n", "found a list"), ("just text\n", "found a str")],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, fragment: str) -> None:
    """A file whose top level is not a mapping is refused as a whole."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, ENV)

    assert "the top level must be a mapping" in caught.value.problem
    assert fragment in caught.value.problem


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    """A key written twice in one mapping is an error, not a silent override."""
    path = tmp_path / "config.yaml"
    path.write_text("name: a\nname: b\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, ENV)

    assert "duplicate key 'name'" in caught.value.problem
    assert "line 2" in caught.value.problem


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"name: \xff\n")

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(path, ENV)
