"""Contact values in the one form EngageLab is sent (pure): phones as E.164, e-mail addresses
with a lower-case ASCII domain, and the limits every value must meet.

The libraries of the field do the work: ``phonenumbers`` (Google's libphonenumber metadata)
parses a phone against a default region, ``email-validator`` checks an address's syntax and
turns an IDN domain into its ASCII form, never looking anything up on the network.

Each function returns the normalised text, or a :class:`Refused` reason. A reason names what is
wrong, never the value, so it can be stored and logged. Normalising is a function of the value
alone, so results are cached: the poller maps every row it reads, and most rows it reads (the
lookback window, re-read every cycle) hold values it has normalised before.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

import phonenumbers
from email_validator import EmailNotValidError, validate_email

PhoneFormat = Literal["e164", "digits"]
"""``e164``: ``+819012345678``; ``digits``: the same without the ``+`` (``819012345678``)."""

VALUE_LIMIT = 256  # characters of one contact value, as of an identifier (EngageLab's limit)
CACHED = 8192  # distinct values remembered per kind (a few MB at most)


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a value cannot be sent, without the value."""

    reason: str


@dataclass(frozen=True, slots=True)
class Normalisation:
    """Which contacts are normalised and how (``normalize`` in the config)."""

    emails: bool = False
    phones: bool = False
    phone_region: str | None = None  # ISO 3166 alpha-2; national numbers are read as this one's
    phone_format: PhoneFormat = "e164"
    phone_formats: dict[str, PhoneFormat] = field(default_factory=dict)  # per phone key

    def value(self, key: str, text: str, *, number: bool = False) -> str | Refused:
        """``text`` (trimmed, not empty, within the limits) as contact ``key`` is sent.

        ``number``: the value came from a numeric column, which holds neither a ``+`` nor a
        national number's leading 0, so its digits are read as starting with a country code.
        """
        if key == "email":
            return email(text) if self.emails else text
        if not self.phones:
            return text
        form = self.phone_formats.get(key, self.phone_format)
        return phone("+" + text if number else text, self.phone_region, form)


def limits(text: str, limit: int = VALUE_LIMIT) -> str | None:
    """What is wrong with a trimmed value whatever its contact: too long, or holding a control
    character (a NUL, a tab or newline inside, an escape). ``None`` when it is fine."""
    if len(text) > limit:
        return f"is longer than {limit} characters"
    if text.isprintable():  # the common case, at C speed
        return None
    if "\x00" in text:
        return "holds a NUL character"
    if any(unicodedata.category(c) == "Cc" for c in text):
        return "holds a control character"
    return None  # printable in every sense that matters here (an ideographic space, say)


@functools.lru_cache(maxsize=CACHED)
def phone(text: str, region: str | None, form: PhoneFormat = "e164") -> str | Refused:
    """A phone number as E.164 (``+819012345678``), or without its ``+`` (``digits``).

    ``090-1234-5678`` with region ``JP`` is ``+819012345678``; a number written with its
    country code (``+65 8123 4567``) needs no region. An extension is dropped (E.164 has
    none). A value that is not a *possible* number for its country (too short or too long;
    a check of lengths, stable across metadata updates, unlike "valid") is refused.
    """
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
            if region is None and not text.lstrip().startswith("+"):
                return Refused("has no country code, and normalize.phone_region is not set")
            return Refused("has a country code that does not exist")
        if exc.error_type == phonenumbers.NumberParseException.TOO_SHORT_NSN:
            return Refused("is too short to be a phone number")
        if exc.error_type == phonenumbers.NumberParseException.TOO_LONG:
            return Refused("is too long to be a phone number")
        return Refused("is not a phone number")
    if not phonenumbers.is_possible_number(number):
        return Refused("is not a possible phone number (wrong length for its country)")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if not _reads_back(e164):
        return Refused("is not a phone number E.164 can write (it would read back as another)")
    return e164 if form == "e164" else e164[1:]


def _reads_back(e164: str) -> bool:
    """Whether ``e164`` parses back to itself, a possible number: so normalising is idempotent
    even for numbers such as all zeros, whose national leading zeros E.164 cannot carry."""
    try:
        again = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return False
    same = phonenumbers.format_number(again, phonenumbers.PhoneNumberFormat.E164) == e164
    return same and phonenumbers.is_possible_number(again)


@functools.lru_cache(maxsize=CACHED)
def email(text: str) -> str | Refused:
    """An e-mail address with its domain lower-cased and in ASCII (IDN as ``xn--``), the local
    part kept as written (only its mail server may fold its case); or why it is impossible.

    ``A@Example.COM`` is ``A@example.com``; ``x@Bücher.de`` is ``x@xn--bcher-kva.de``.
    Syntax only: ``check_deliverability=False``, so no DNS query is ever made.
    """
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        # The library's message can quote the address: the reason stays ours.
        return Refused("is not a possible e-mail address")
    return f"{checked.local_part}@{checked.ascii_domain}"
