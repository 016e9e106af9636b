"""Source row → EngageLab payload, and the payload hash used for change detection (all pure).

A row maps to either a :class:`Payload` (something to push) or a :class:`Skip` (a reason not to).
Both carry a hash of what was mapped, so a row that is re-read unchanged is recognised without
an API call, whether it was pushed or skipped last time.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal, get_args

from cdc_sync.normalise import VALUE_LIMIT, Normalisation, Refused, limits
from cdc_sync.redact import digits, redact, storable

PhoneKey = Literal["mobile_phone", "landline_phone", "whatsapp_phone"]
ContactKey = Literal["email", PhoneKey]
"""EngageLab's contact keys, the only place they are spelt (config, emulator derive theirs)."""
CONTACT_KEYS: tuple[ContactKey, ...] = get_args(ContactKey)
PHONE_KEYS: tuple[PhoneKey, ...] = get_args(PhoneKey)
EUID_MAX = 2**63 - 1  # EngageLab's euid is a Java Long
KEY_LIMIT = 256  # characters of cdc_sync_status.source_key
NUMBER_LIMIT = 10**30  # a number sent as a contact has fewer digits than this (E.164: 15)
EXACT_FLOAT = 2**53  # above this a double no longer holds every integer exactly
IDENTITY_LIMIT = 256  # characters of an identity value EngageLab's register takes (documented)
_IDENTITY_NUMBER = 10**IDENTITY_LIMIT  # an identity number has fewer digits than this
UNRESOLVED = 0  # the euid of an identity row's payload until its EUID is known (never sent)


@dataclass(frozen=True, slots=True)
class Policy:
    """How rows are mapped, built once from the config and passed to :func:`map_row`.

    ``salt`` (the sync name) keeps hashes from matching across syncs. With ``clear`` a contact
    whose column is NULL or empty is sent as ``""``, which empties it in EngageLab
    (``engagelab.clear_empty``); without it, it is left out and EngageLab keeps what it had.
    ``normalise`` (``normalize``) puts phones and e-mail addresses in one form before they are
    hashed, so a cosmetic edit in the source makes no call. A user who leaves the sync (see
    :class:`Leave`) is sent ``""`` for every configured contact with ``on_leave="clear"``.
    """

    salt: str
    clear: bool = False
    normalise: Normalisation | None = None  # None: values are sent as they are (trimmed)
    value_limit: int = VALUE_LIMIT  # a longer contact value is refused
    on_leave: Literal["keep", "clear"] = "keep"  # what a user who leaves the sync is sent
    contact_keys: tuple[str, ...] = ()  # the configured contacts: what "clear" empties


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One user as read from the source: key, cursor, raw euid, raw contact values by key, and
    the raw values of the consent and soft-delete columns (when configured)."""

    key: Any
    cursor: Any
    euid: Any
    contacts: Mapping[str, Any]
    consent: Any = True
    deleted: Any = None


@dataclass(frozen=True, slots=True)
class Payload:
    """A request body for ``POST /v1/user/contact``; ``contacts`` is never empty (but its
    values are ``""`` where clearing is on and the column became empty)."""

    euid: int
    contacts: Mapping[str, str]

    def body(self) -> dict[str, Any]:
        return {"euid": self.euid, "contacts": dict(self.contacts)}


@dataclass(frozen=True, slots=True)
class Skip:
    """Why a row is not pushed. ``reason`` never holds contact values: safe to store and log.

    ``clears`` is the payload that empties every contact, when clearing is on and the euid is
    valid: sent only if EngageLab holds something for the user (see :func:`rules.decide`).
    ``key_refused``: the source key cannot be held by the status table as it is, so the row is
    recorded under the key's digest (see :func:`status_key`) and can never be read back by key.
    """

    reason: str
    euid: int | None = None
    clears: Payload | None = None
    key_refused: bool = False


@dataclass(frozen=True, slots=True)
class Leave:
    """The user has left the sync: consent withdrawn, soft-deleted, or gone from the source.

    ``clears`` empties every configured contact (``engagelab.on_leave: clear``, and the euid
    is known): sent only if EngageLab holds something cdc-sync pushed (see
    :func:`rules.decide`). ``reason`` never holds contact values.
    """

    reason: str
    euid: int | None = None
    clears: Payload | None = None


CONSENTED = frozenset({"true", "t", "yes", "y", "1", "on"})  # consent written as text
NO_CONSENT = "consent withdrawn or never given (source.consent is not true)"
SOFT_DELETED = "soft-deleted (source.deleted is set)"
VANISHED = "deleted: the row is no longer in the source"


@dataclass(frozen=True, slots=True)
class Mapped:
    """The result of mapping one row: a payload, a skip or a departure (:class:`Leave`), the
    hash of what was mapped, and the key as the status table holds it."""

    row: SourceRow
    result: Payload | Skip | Leave
    hash: str
    key: str
    identity: str | None = None  # the identity value whose EUID the payload waits for

    @property
    def euid(self) -> int | None:
        return self.result.euid or None  # UNRESOLVED (0) is no euid yet


def parse_euid(raw: Any) -> int | str:
    """The euid as a positive 64-bit integer, or a reason why the raw value is not one."""
    if raw is None:
        return "euid is empty"
    if isinstance(raw, bool):
        return f"euid {_short(raw)} is not an integer"
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, float):
        if not raw.is_integer():  # NaN, infinite or fractional
            return f"euid {_short(raw)} is not an integer"
        value = int(raw)
    elif isinstance(raw, Decimal):
        # In this order: comparing a signalling NaN raises, and so does int() of an infinity.
        if not raw.is_finite() or raw != raw.to_integral_value():
            return f"euid {_short(raw)} is not an integer"
        if raw.adjusted() >= 19:
            return f"euid {_short(raw)} does not fit in 64 bits"
        value = int(raw)
    elif isinstance(raw, str):
        text = raw.strip()
        if not text:
            return "euid is empty"
        unsigned = text[1:] if text[0] in "+-" else text
        if not (unsigned.isascii() and unsigned.isdigit()):
            return f"euid {_short(raw)} is not an integer"
        if len(unsigned.lstrip("0")) > 19:
            return f"euid {_short(raw)} does not fit in 64 bits"
        value = int(text)
    else:
        return f"euid of type {type(raw).__name__} is not an integer"
    if value <= 0:
        return f"euid {digits(value)} is not positive"
    if value > EUID_MAX:
        return f"euid {digits(value)} does not fit in 64 bits"
    return value


def parse_identity(raw: Any) -> tuple[str | None, str | None]:
    """An identity value (the application's own user id) as the text ``register`` is sent, or
    why it cannot be one. Text is taken as it is (an identifier is not trimmed: ``" u1"`` and
    ``"u1"`` may be different users); whole numbers and UUIDs as their text."""
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, int) and not isinstance(raw, bool):
        if not -_IDENTITY_NUMBER < raw < _IDENTITY_NUMBER:
            return None, f"identity is a number of more than {IDENTITY_LIMIT} digits"
        text = str(raw)
    elif isinstance(raw, Decimal) and raw.is_finite() and raw == raw.to_integral_value():
        if raw.adjusted() >= IDENTITY_LIMIT:
            return None, f"identity is a number of more than {IDENTITY_LIMIT} digits"
        text = str(int(raw))
    elif isinstance(raw, uuid.UUID):
        text = str(raw)
    elif raw is None:
        return None, "identity is empty"
    else:
        return None, f"identity of type {type(raw).__name__} is not text or a whole number"
    if not text.strip():
        return None, "identity is empty"
    if len(text) > IDENTITY_LIMIT:
        return None, f"identity is {len(text)} characters long, more than {IDENTITY_LIMIT}"
    if not text.isprintable() and not storable(text):
        return None, "identity holds a NUL character or text that is not UTF-8"
    return text, None


def addressed(mapped: Mapped, euid: int) -> Mapped:
    """An identity row's mapping once its EUID is known: the same hash (it covers the identity
    value, which names one EUID for good), its payloads addressed to ``euid``."""
    result = mapped.result
    if isinstance(result, Payload):
        return replace(mapped, result=Payload(euid, result.contacts))
    clears = None if result.clears is None else Payload(euid, result.clears.contacts)
    return replace(mapped, result=replace(result, euid=euid, clears=clears))


def clean_contacts(
    raw: Mapping[str, Any], policy: Policy | None = None
) -> tuple[dict[str, str], str | None]:
    """Contact values as the text EngageLab is sent: trimmed, within the limits, normalised as
    ``policy`` says, with NULL and empty values left out (keys in a stable order); and why the
    row cannot be sent, if a value makes no sense as a contact. Reasons name the contact, never
    its value."""
    limit = policy.value_limit if policy is not None else VALUE_LIMIT
    normal = policy.normalise if policy is not None else None
    cleaned: dict[str, str] = {}
    for key in sorted(raw):
        value = raw[key]
        if value is None:
            continue
        if isinstance(value, str):  # the common case: kept to a strip and C-speed checks
            text = value.strip()
            problem = None
            if len(text) > limit or not text.isprintable():
                problem = _text_problem(key, text, limit)
        else:
            text, problem = _contact_text(key, value)
            if problem is None:
                problem = _text_problem(key, text, limit)
        if problem is None and text and normal is not None:
            result = normal.value(key, text, number=isinstance(value, int | float | Decimal))
            if isinstance(result, Refused):
                problem = f"contact {key} {result.reason}"
            else:
                text = result
        if problem is not None:
            return cleaned, problem
        if text:
            cleaned[key] = text
    return cleaned, None


def _contact_text(key: str, value: Any) -> tuple[str, str | None]:
    """A contact value that is not a ``str``, as text; or why it is refused.

    Whole numbers are sent as integers (a phone in a ``double precision`` or ``numeric``
    column is ``8613900000001``, not ``8613900000001.0``). Anything else PostgreSQL can return
    for a column (booleans, dates, UUIDs, JSON, arrays, ...) is no contact value.
    """
    if isinstance(value, bool):
        return "", f"contact {key} is a boolean, not text or a number"
    if isinstance(value, int):
        if not -NUMBER_LIMIT < value < NUMBER_LIMIT:
            return "", f"contact {key} is a number of more than 30 digits"
        return str(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return "", f"contact {key} is not a finite number"
        if not value.is_integer():
            return "", f"contact {key} is a fractional number"
        if abs(value) > EXACT_FLOAT:
            return "", f"contact {key} is a floating-point number too large to be exact"
        return str(int(value)), None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return "", f"contact {key} is not a finite number"
        if value.adjusted() >= 30:
            return "", f"contact {key} is a number of more than 30 digits"
        if value != value.to_integral_value():
            return "", f"contact {key} is a fractional number"
        return str(int(value)), None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            text = bytes(value).decode()
        except UnicodeDecodeError:
            return "", f"contact {key} is not valid UTF-8 text"
        return text.strip(), None
    return "", f"contact {key} is of type {type(value).__name__}, not text or a number"


def _text_problem(key: str, text: str, limit: int) -> str | None:
    """Why a trimmed text value cannot be sent, whatever its contact."""
    if "\x00" not in text and not storable(text):  # a SQLite source's bytes, not UTF-8
        return f"contact {key} is not valid UTF-8 text"
    problem = limits(text, limit)
    return None if problem is None else f"contact {key} {problem}"


def status_key(key: Any) -> tuple[str, str | None]:
    """The source key as text for the status table, and why it cannot be stored as it is.

    A key longer than the column, or holding a NUL or text that is not UTF-8, is replaced by
    ``sha256:<hex digest>`` of its text, and its row is refused with the reason: the status row
    still records the outcome, so the watermark may pass it.
    """
    try:
        text = key if isinstance(key, str) else str(key)
    except ValueError:  # an integer too long for Python to format
        text = f"<{type(key).__name__}>"
    if len(text) <= KEY_LIMIT and (text.isprintable() or storable(text)):
        return text, None
    digest = "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if len(text) > KEY_LIMIT:
        problem = f"the source key is {len(text)} characters long, more than {KEY_LIMIT}"
    else:
        problem = "the source key holds a NUL character or text that is not UTF-8"
    return digest, f"{problem}: recorded under its SHA-256 digest, not pushed"


def is_digest(key: str) -> bool:
    """Whether a status-table key is the digest :func:`status_key` records a refused key under."""
    return key.startswith("sha256:") and len(key) == 71


def map_row(row: SourceRow, policy: Policy, *, identity: bool = False) -> Mapped:
    """Map one source row as ``policy`` says (see :class:`Policy`).

    With ``identity`` the row's ``euid`` is an identity value (``source.identity``): the payload
    waits for its EUID (:func:`addressed`), and the hash covers the identity value instead, so
    a row's hash is known before, and stays the same after, its EUID is resolved.
    Never raises: a value that cannot be sent is the row's skip reason.
    """
    key, key_problem = status_key(row.key)
    named: str | None = None
    if identity:
        named, euid_problem = parse_identity(row.euid)
        euid: int | str = UNRESOLVED if euid_problem is None else euid_problem
    else:
        euid = parse_euid(row.euid)
    if key_problem is None:
        leaving = _leaving(row)
        if leaving is not None:
            known = None if isinstance(euid, str) else euid
            return leave(row, key, known, leaving, policy, named)
    contacts, problem = clean_contacts(row.contacts, policy)
    if policy.clear:
        contacts = {name: contacts.get(name, "") for name in sorted(row.contacts)}
    result: Payload | Skip
    if key_problem is not None:
        result = Skip(key_problem, None if isinstance(euid, str) else euid, key_refused=True)
        hashed_euid: int | str = "invalid key"
    elif isinstance(euid, str):
        result = Skip(euid)
        hashed_euid = f"invalid:{_repr(row.euid)}"
    elif problem is not None:
        result = Skip(problem, euid)
        hashed_euid = f"invalid:{euid}:{problem}"
    elif not any(contacts.values()):
        clears = Payload(euid, contacts) if contacts else None
        result = Skip("no contact values", euid, clears)
        hashed_euid = euid
    else:
        result = Payload(euid, contacts)
        hashed_euid = euid
    if named is not None and hashed_euid == UNRESOLVED:
        hashed_euid = f"identity:{named}"
    return Mapped(row, result, payload_hash(policy.salt, hashed_euid, contacts), key, named)


def leave(
    row: SourceRow,
    key: str,
    euid: int | None,
    reason: str,
    policy: Policy,
    identity: str | None = None,
) -> Mapped:
    """A user who left the sync for ``reason``: what they are sent, hashed apart from any
    payload, so they are recorded once and not pushed again until their row changes back.

    An identity row's ``euid`` is :data:`UNRESOLVED`: its clearing payload waits for the EUID
    (:func:`addressed`), sent only if one is known, and its hash covers the identity value."""
    clears = None
    keys = policy.contact_keys or tuple(sorted(row.contacts))
    if policy.on_leave == "clear" and euid is not None and keys:
        clears = Payload(euid, dict.fromkeys(keys, ""))
    named = euid if identity is None else f"identity:{identity}"
    hashed = payload_hash(policy.salt, f"left:{named}:{reason}", clears.contacts if clears else {})
    return Mapped(row, Leave(reason, euid, clears), hashed, key, identity)


def _leaving(row: SourceRow) -> str | None:
    """Why a row's user is out of the sync, or None (the common case: two comparisons)."""
    if row.deleted is not None:
        return SOFT_DELETED
    consent = row.consent
    if consent is True:
        return None
    if isinstance(consent, int | Decimal) and not isinstance(consent, bool) and consent == 1:
        return None
    if isinstance(consent, str) and consent.strip().lower() in CONSENTED:
        return None
    return NO_CONSENT


def payload_hash(salt: str, euid: int | str, contacts: Mapping[str, str]) -> str:
    """SHA-256 of the canonical payload; the tracking tables keep this, not the values.

    The canonical form is the ``repr`` of a tuple of strings and integers with the contacts
    sorted: unambiguous (quotes and escapes are repr's), and built in C, at a third of the cost
    of a sorted JSON dump on a hot path that runs for every row read. (repr escapes unpaired
    surrogates, so the text always encodes.)
    """
    canonical = repr((salt, euid, tuple(sorted(contacts.items()))))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _repr(value: Any) -> str:
    """``repr`` that cannot fail (an integer of more than 4300 digits, an odd object)."""
    try:
        return repr(value)
    except Exception:  # whatever a value's repr does, the row is only skipped
        return f"<{type(value).__name__}>"


def _short(value: Any) -> str:
    """A value for a reason: its repr (every unprintable character escaped), at most 40
    characters, masked (see :func:`redact.redact`) if it looks like an e-mail address."""
    text = _repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return redact(text, {}) if "@" in text else text
