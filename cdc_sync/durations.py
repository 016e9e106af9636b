"""Durations as a config file writes them: ``250ms``, ``90s``, ``5m``, ``1h30m``, ``1d`` (pure)."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_UNITS: dict[str, timedelta] = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
}
_UNIT_RANK = {unit: rank for rank, unit in enumerate(_UNITS)}
DURATION_HINT = "write e.g. 30s, 5m, 1h"


class DurationTooLong(ValueError):
    """A duration longer than a timedelta can hold (about 2.7 million years)."""


_MAX_DIGITS = 20  # past this a number is far beyond any timedelta, and int() would be slow


def parse_duration(text: str) -> timedelta:
    """Turn ``"90s"``, ``"5m"``, ``"1h30m"`` or ``"250ms"`` into a timedelta.

    Units are d, h, m, s and ms, largest first and each at most once; a number may have a decimal
    part (``"1.5h"``). A unitless string is refused: ``"60"`` could mean seconds or minutes, and
    the file should say which. The ValueError says what is wrong without quoting ``text``, which
    the caller has (and which may have come from a secret by mistake); :class:`DurationTooLong`
    when the duration is well formed but longer than any timedelta.
    """
    stripped = text.strip()
    if _BARE_NUMBER.fullmatch(stripped):
        raise ValueError("a number without a unit; write e.g. 90s or 5m")
    total, position, last_rank = timedelta(0), 0, -1
    while position < len(stripped):
        part = _DURATION_PART.match(stripped, position)
        if part is None:
            break
        number, unit = part.groups()
        if _UNIT_RANK[unit] <= last_rank:
            raise ValueError("not a duration; give units largest first, each once, e.g. 1h30m")
        if len(number.partition(".")[0]) > _MAX_DIGITS:
            raise DurationTooLong("too long a duration")
        try:
            total += _UNITS[unit] * (float(number) if "." in number else int(number))
        except OverflowError:
            raise DurationTooLong("too long a duration") from None
        position, last_rank = part.end(), _UNIT_RANK[unit]
    if not stripped or position < len(stripped):
        raise ValueError(f"not a duration; {DURATION_HINT}")
    return total


def from_seconds(seconds: float) -> timedelta:
    """A non-negative finite number of seconds as a timedelta; DurationTooLong past its range."""
    if seconds >= _LONGEST_SECONDS:
        raise DurationTooLong("too long a duration")
    return timedelta(seconds=seconds)


_LONGEST_SECONDS = timedelta.max.total_seconds()


def format_duration(value: timedelta) -> str:
    """Write a non-negative timedelta the way a config file would (``"1h30m"``, ``"250ms"``).

    The inverse of :func:`parse_duration`; used to print settings back to the operator.
    """
    if value < timedelta(0):
        raise ValueError("a duration is never negative")
    micros = value // timedelta(microseconds=1)
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, micros = divmod(micros, _UNITS[unit] // timedelta(microseconds=1))
        if count:
            parts.append(f"{count}{unit}")
    if micros:
        millis, rest = divmod(micros, 1000)
        parts.append(f"{millis}.{rest:03d}".rstrip("0").rstrip(".") + "ms")
    return "".join(parts) or "0s"
