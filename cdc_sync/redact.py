"""Text from outside made safe to store, print and log (pure).

Two jobs, for every message that did not come from cdc-sync itself (an API answer, an error):

* :func:`clean` bounds it and removes what a tracking database refuses or a terminal misreads:
  NUL characters (PostgreSQL text cannot hold them), unpaired surrogates (not UTF-8: SQLite and
  PostgreSQL refuse them) and other control characters;
* :func:`redact` takes out personal data: the user's own contact values, replaced by the name of
  their key (``<email>``), and anything else shaped like an e-mail address (``<email>``) or a
  phone number (``<number>``: seven digits or more).

Both are cheap on the common case (short printable text, no ``@``, no long digit run), so they
run on every answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MESSAGE_LIMIT = 200  # characters of a message kept in cdc_sync_status.last_message
REPLY_LIMIT = 1000  # characters of an answer's message read before it is redacted and cut

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SPACES = frozenset("\t\n\r\x0b\x0c")
_EMAIL = re.compile(r"[^\s@<>()\[\]\"',;:]+@[^\s@<>()\[\]\"',;:]+")
_DIGITS = re.compile(r"\+?\d[\d\s().\-/]{5,}\d")
PHONE_DIGITS = 7  # a run of this many digits or more is masked as a possible phone number
SHORTEST_VALUE = 3  # contact values shorter than this are not searched for (they match anything)


def clean(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, with control characters, NULs and unpaired
    surrogates replaced: whitespace ones by a space, the rest by U+FFFD."""
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    if text.isprintable():
        return text
    return _UNSAFE.sub(_replacement, text)


def redact(text: str, contacts: Mapping[str, str], limit: int = MESSAGE_LIMIT) -> str:
    """``text`` without the user's contact values or anything shaped like one, then cleaned.

    Redaction runs before the text is cut, so a value straddling the cut cannot survive in part.
    """
    if not text:
        return text
    folded = text.casefold()
    for key, value in contacts.items():
        if len(value) >= SHORTEST_VALUE and value.casefold() in folded:
            text = re.sub(re.escape(value), f"<{key}>", text, flags=re.IGNORECASE)
    if text.isalpha():  # letters only ("success"): nothing shaped like an address or a number
        return clean(text, limit)
    if "@" in text:
        text = _EMAIL.sub("<email>", text)
    text = _DIGITS.sub(_mask_digits, text)
    return clean(text, limit)


def storable(text: str) -> bool:
    """Whether both tracking backends take ``text`` as it is: valid UTF-8 (no unpaired
    surrogate) and no NUL."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def digits(value: int) -> str:
    """An integer as text, or a bounded description when it is too long to show (Python will
    not even format one of more than 4300 digits)."""
    if -(10**30) < value < 10**30:
        return str(value)
    return "of more than 30 digits"


def _replacement(match: re.Match[str]) -> str:
    return " " if match.group() in _SPACES else "\ufffd"


def _mask_digits(match: re.Match[str]) -> str:
    found = match.group()
    return "<number>" if sum(c.isdigit() for c in found) >= PHONE_DIGITS else found
