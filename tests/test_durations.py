"""Tests for cdc_sync.durations: reading and writing durations as a config file does."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_sync.durations import format_duration, parse_duration

# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("2d", timedelta(days=2)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("1.5h", timedelta(minutes=90)),
        ("0s", timedelta(0)),
        ("  30s ", timedelta(seconds=30)),
    ],
)
def test_parse_duration_reads_units(text: str, expected: timedelta) -> None:
    """parse_duration reads ms, s, m, h and d, alone or combined largest first."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("5 minutes", "not a duration; write e.g. 30s, 5m, 1h"),
        ("", "not a duration"),
        ("m", "not a duration"),
        ("-5s", "not a duration"),
        ("5M", "not a duration"),
        ("1h 30m", "not a duration"),
        ("30m1h", "largest first"),
        ("5m5m", "largest first"),
        ("60", "a number without a unit; write e.g. 90s or 5m"),
        ("99999999999999d", "too long"),
        ("1" + "0" * 5000 + "s", "too long"),
    ],
)
def test_parse_duration_refuses_bad_text(text: str, fragment: str) -> None:
    """parse_duration refuses anything but unit-suffixed numbers, saying how to write one."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1), "1h"),
        (timedelta(days=1, milliseconds=250), "1d250ms"),
        (timedelta(microseconds=1500), "1.5ms"),
    ],
)
def test_format_duration_writes_config_syntax(value: timedelta, expected: str) -> None:
    """format_duration writes a timedelta the way a config file would."""
    assert format_duration(value) == expected


@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10_000)))
def test_format_duration_round_trips(value: timedelta) -> None:
    """Every non-negative timedelta survives format_duration then parse_duration unchanged."""
    assert parse_duration(format_duration(value)) == value
