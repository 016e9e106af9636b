"""Hostile config files: each one a ConfigError naming the problem, never a crash or a hang."""

from __future__ import annotations

import math
import re
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from configs import ENV, REPO, minimal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from cdc_sync.config import Between, Settings, load_settings
from cdc_sync.configfile import MAX_DEPTH, MAX_FILE_BYTES
from cdc_sync.durations import format_duration
from cdc_sync.errors import ConfigError
from cdc_sync.rules import Retry, backoff

BASE = yaml.safe_dump(minimal(), sort_keys=False)


def under(section: str, line: str) -> str:
    """The minimal config with ``line`` added under ``section`` (created when it is missing)."""
    if f"\n{section}:\n" in f"\n{BASE}":
        return BASE.replace(f"{section}:\n", f"{section}:\n  {line}\n", 1)
    return f"{BASE}{section}:\n  {line}\n"


def laughs(levels: int) -> str:
    """A billion-laughs alias bomb: each level lists the one before nine times."""
    lines = ["  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return BASE + "extra:\n" + "\n".join(lines) + "\n"


# The inputs of issue 9: each once crashed loading or a later run with a traceback, or hung.
HOSTILE = [
    (
        "interval 1e14 s",
        under("schedule", "interval: 100000000000000"),
        "schedule.interval",
        "at most 7d",
    ),
    ("timeout 1e20 s", under("engagelab", "timeout: 1.0e+20"), "engagelab.timeout", "at most 10m"),
    (
        "interval 99999999d",
        under("schedule", "interval: 99999999d"),
        "schedule.interval",
        "at most 7d",
    ),
    (
        "keep_runs 99999999d",
        under("state", "keep_runs: 99999999d"),
        "state.keep_runs",
        "at most 3650d",
    ),
    (
        "lookback 99999999d",
        under("source", "lookback: 99999999d"),
        "source.lookback",
        "at most 30d",
    ),
    (
        "lookback 1e30 units",
        under("source", "lookback: " + "9" * 30),
        "source.lookback",
        "at most 1000000000000000",
    ),
    ("retry.base 99999999d", under("retry", "base: 99999999d"), "retry.base", "at most 1h"),
    ("retry.max 99999999d", under("retry", "max: 99999999d"), "retry.max", "at most 30d"),
    (
        "max_attempts 1e9",
        under("retry", "max_attempts: 1000000000"),
        "retry.max_attempts",
        "at most 10000",
    ),
    (
        "rate_limit 1e-300",
        under("engagelab", "rate_limit: 1e-300"),
        "engagelab.rate_limit",
        "at least 0.1",
    ),
    (
        "rate_limit nan",
        under("engagelab", "rate_limit: .nan"),
        "engagelab.rate_limit",
        "at least 0.1",
    ),
    (
        "statement_timeout 99999999d",
        under("source", "statement_timeout: 99999999d"),
        "source.statement_timeout",
        "at most 1h",
    ),
    (
        "a 100-digit code",
        under("engagelab", "codes: {" + "1" * 30 + ": fatal}"),
        "engagelab.codes." + "1" * 30,
        "at most 2147483647",
    ),
    (
        "nesting 500 deep",
        BASE + "extra: " + "[" * 500 + "]" * 500 + "\n",
        "",
        f"nested more than {MAX_DEPTH} levels",
    ),
    (
        "nesting 500 deep, mappings",
        BASE + "extra:\n  a: " + "{a: " * 500 + "1" + "}" * 500 + "\n",
        "",
        "nested more than",
    ),
    ("recursive alias", BASE + "extra: &r [*r]\n", "", "aliases (*name) are not accepted"),
    ("billion laughs 9x9", laughs(9), "", "aliases (*name) are not accepted"),
    (
        "merge of an alias",
        BASE + "x: &x {a: 1}\ny:\n  <<: *x\n",
        "",
        "aliases (*name) are not accepted",
    ),
    (
        "5000-digit integer",
        under("source", "batch_size: " + "9" * 5000),
        "",
        "a number of 5000 characters",
    ),
    (
        "5000-digit hex",
        under("source", "batch_size: 0x" + "f" * 5000),
        "",
        "a number of 5002 characters",
    ),
    (
        "surrogate in table",
        BASE.replace("table: users", 'table: "\\ud800"'),
        "source.table",
        "unpaired surrogate",
    ),
    (
        "surrogate in api_key",
        BASE.replace("api_key: ${ENGAGELAB_API_KEY}", 'api_key: "k\\udfff"'),
        "engagelab.api_key",
        "unpaired surrogate",
    ),
    (
        "NUL in a column",
        BASE.replace("email: email", 'email: "e\\0mail"'),
        "contacts.email",
        "NUL character",
    ),
    ("bad !!int", under("source", "batch_size: !!int many"), "", "not a valid int"),
    ("no such date", BASE + "name2: 2026-13-45\n", "", "not a valid timestamp"),
    ("bad !!timestamp", BASE + "name2: !!timestamp soon\n", "", "not a valid timestamp"),
    ("bad !!bool", BASE + "name2: !!bool perhaps\n", "", "not a valid bool"),
    ("control character", BASE + "name2: \x07\n", "", "control character #x7"),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_hostile_input_is_a_config_error_naming_its_key(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    """Each hostile file of issue 9 is one ConfigError naming the key (or the file) and why."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, ENV)

    assert caught.value.key == key
    assert fragment in caught.value.problem


def test_a_file_past_the_size_bound_is_refused(tmp_path: Path) -> None:
    """A file larger than MAX_FILE_BYTES is refused before it is parsed."""
    path = tmp_path / "config.yaml"
    path.write_text(BASE + "# " + "x" * MAX_FILE_BYTES + "\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=f"larger than {MAX_FILE_BYTES // 1024} KiB"):
        load_settings(path, ENV)


def test_an_environment_value_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A variable whose bytes are not UTF-8 (a surrogate to Python) is refused at its key."""
    path = tmp_path / "config.yaml"
    path.write_text(BASE, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, {**ENV, "ENGAGELAB_API_SECRET": "sekret\udcff"})

    assert caught.value.key == "engagelab.api_secret"
    assert "unpaired surrogate" in caught.value.problem


# --- every number and duration has a documented range ------------------------------------------


def ranged_fields() -> list[tuple[str, str, Any, list[Between]]]:
    """Every (section, key, annotation, ranges) of the settings models."""
    models: list[tuple[str, type[BaseModel]]] = [("", Settings)]
    models += [
        (name, field.annotation)
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    ]
    return [
        (section, field.alias or name, field.annotation, bounds(field.annotation, field.metadata))
        for section, model in models
        for name, field in model.model_fields.items()
    ]


def bounds(annotation: Any, metadata: list[Any]) -> list[Between]:
    """The Between marks of a field, wherever in its (nested, optional) annotation they sit."""
    found = [mark for mark in metadata if isinstance(mark, Between)]
    for part in (*typing.get_args(annotation), *getattr(annotation, "__metadata__", ())):
        if isinstance(part, Between):
            found.append(part)
        elif part is not None:
            found += bounds(part, [])
    return found


def numeric(annotation: Any) -> bool:
    """Whether a field's annotation admits an int, a float or a timedelta anywhere in it."""
    if annotation in (int, float, timedelta):
        return True
    return any(numeric(part) for part in typing.get_args(annotation) if part is not bool)


@pytest.mark.parametrize(
    ("section", "key", "annotation", "ranges"),
    ranged_fields(),
    ids=[f"{s}.{k}".lstrip(".") for s, k, _, _ in ranged_fields()],
)
def test_every_number_and_duration_has_a_range(
    section: str, key: str, annotation: Any, ranges: list[Between]
) -> None:
    """A setting that takes a number or a duration (or holds them) states its range."""
    if numeric(annotation):
        assert ranges, f"{section}.{key}: give it a Between(low, high)"


def show(value: int | float | timedelta) -> str:
    """A bound as the README writes it."""
    if isinstance(value, timedelta):
        return format_duration(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize(
    ("section", "key", "ranges"),
    [(s, k, r) for s, k, _, r in ranged_fields() if r],
    ids=[f"{s}.{k}".lstrip(".") for s, k, _, r in ranged_fields() if r],
)
def test_readme_states_every_range(section: str, key: str, ranges: list[Between]) -> None:
    """The README's row for each ranged key gives that range as low, an en dash, high."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split(f"\n#### `{section}`\n" if section else "\n#### Top level\n", 1)[1]
    row = re.search(rf"^\| `{key}` \|(.*)$", table.split("\n#### ", 1)[0], re.M)

    assert row is not None
    for bound in ranges:
        assert f"{show(bound.low)}\u2013{show(bound.high)}" in row.group(1)


def test_the_largest_values_keep_the_daemons_arithmetic_in_range(tmp_path: Path) -> None:
    """With every duration and count at the top of its range, no date or backoff overflows."""
    tree = minimal()
    for section, key, _, ranges in ranged_fields():
        if ranges and section in ("source", "state", "schedule", "retry", "audit"):
            top = max((b.high for b in ranges), key=lambda high: isinstance(high, timedelta))
            tree.setdefault(section, {})[key] = (
                format_duration(top) if isinstance(top, timedelta) else top
            )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    loaded = load_settings(path, ENV)
    policy = Retry(loaded.retry.base, loaded.retry.max, loaded.retry.max_attempts)
    now = datetime.now(UTC)

    delay = backoff(loaded.retry.max_attempts, policy, jitter=0.999)

    assert loaded.retry.base == timedelta(hours=1)  # the top of its range, as every value here
    assert now + delay <= now + loaded.retry.max
    assert now - loaded.state.keep_runs < now + loaded.schedule.interval
    assert isinstance(loaded.source.lookback, timedelta)
    assert now - loaded.source.lookback < now
    assert loaded.source.statement_timeout.total_seconds() * 1000 < 2**31  # PostgreSQL's int


# --- fuzzing ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "99999999d",
            "1e-300",
            "1.0e+20",
            "0s",
            "-1s",
            "${NOPE}",
            "$",
            "\ud800",
            "\x00",
            "*r",
            "&r",
        ]
    ),
    st.text(max_size=12),
)
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
RELAXED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
KEYS = [
    "name",
    "source",
    "source.batch_size",
    "source.lookback",
    "source.statement_timeout",
    "source.url",
    "source.table",
    "contacts",
    "contacts.email",
    "state",
    "state.url",
    "state.keep_runs",
    "engagelab",
    "engagelab.base_url",
    "engagelab.api_secret",
    "engagelab.timeout",
    "engagelab.rate_limit",
    "engagelab.codes",
    "engagelab.concurrency",
    "schedule.interval",
    "retry.base",
    "retry.max",
    "retry.max_attempts",
    "audit.rows_per_cycle",
    "logging.level",
    "extra",
]


def graft(tree: dict[str, Any], key: str, value: object) -> dict[str, Any]:
    """``tree`` with ``key`` set to ``value``, making the sections on the way mappings."""
    node = tree
    *parents, last = key.split(".")
    for part in parents:
        node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {})
        if not isinstance(node, dict):
            return tree
    node[last] = value
    return tree


def must_load_or_refuse(path: Path) -> None:
    """Loading ``path`` gives Settings or a ConfigError whose text can be printed; nothing else."""
    try:
        load_settings(path, ENV)
    except ConfigError as error:
        str(error).encode("utf-8")  # an operator's terminal can show it


@settings(max_examples=150, suppress_health_check=RELAXED)
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), trees), min_size=1, max_size=4))
def test_fuzzed_trees_load_or_are_refused(tmp_path: Path, edits: list[tuple[str, Any]]) -> None:
    """A valid config with random values grafted in loads or is a ConfigError, never a crash."""
    tree = minimal()
    for key, value in edits:
        tree = graft(tree, key, value)
    path = tmp_path / "config.yaml"
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=False, width=math.inf)
    path.write_text(text, encoding="utf-8")

    must_load_or_refuse(path)


@settings(max_examples=150, suppress_health_check=RELAXED)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.text(alphabet=st.sampled_from("{}[]:,-&*!|>'\"#%@`? \n\t\\ab01.$"), max_size=300),
    ),
    at=st.integers(min_value=0, max_value=len(BASE)),
)
def test_fuzzed_text_loads_or_is_refused(tmp_path: Path, data: bytes | str, at: int) -> None:
    """Random text or bytes spliced into a valid file load or give a ConfigError, never a crash."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    path = tmp_path / "config.yaml"
    path.write_bytes(BASE.encode()[:at] + raw + BASE.encode()[at:])

    must_load_or_refuse(path)
