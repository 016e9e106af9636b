"""Row → payload mapping and the payload hash."""

import json
import uuid
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from values import column_value

from cdc_sync.mapping import (
    EUID_MAX,
    KEY_LIMIT,
    SOFT_DELETED,
    Leave,
    Payload,
    Policy,
    Skip,
    SourceRow,
    addressed,
    clean_contacts,
    map_row,
    parse_euid,
    parse_identity,
)
from cdc_sync.redact import MESSAGE_LIMIT, storable


def row(euid: object = 42, **contacts: object) -> SourceRow:
    return SourceRow(key=1, cursor=1, euid=euid, contacts=contacts)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (42, 42),
        (" 42 ", 42),
        ("+7", 7),
        (Decimal("12"), 12),
        (12.0, 12),
        (2**63 - 1, 2**63 - 1),
        (None, "euid is empty"),
        ("", "euid is empty"),
        ("   ", "euid is empty"),
        ("abc", "euid 'abc' is not an integer"),
        ("12.5", "euid '12.5' is not an integer"),
        (Decimal("1.5"), "euid Decimal('1.5') is not an integer"),
        (float("nan"), "euid nan is not an integer"),
        (True, "euid True is not an integer"),
        (0, "euid 0 is not positive"),
        (-3, "euid -3 is not positive"),
        ("-3", "euid -3 is not positive"),
        (2**63, f"euid {2**63} does not fit in 64 bits"),
        (b"12", "euid of type bytes is not an integer"),
        ("\uff11\uff12", "euid '\uff11\uff12' is not an integer"),  # full-width digits
        ("+-5", "euid '+-5' is not an integer"),  # once int()'s ValueError
        ("-+5", "euid '-+5' is not an integer"),
        ("9" * 5000, f"euid '{'9' * 36}... does not fit in 64 bits"),  # int() refuses 4300+
        (Decimal("1e30"), "euid Decimal('1E+30') does not fit in 64 bits"),  # once InvalidOperation
        (Decimal("Infinity"), "euid Decimal('Infinity') is not an integer"),
        (Decimal("-Infinity"), "euid Decimal('-Infinity') is not an integer"),
        (Decimal("sNaN"), "euid Decimal('sNaN') is not an integer"),
        (Decimal("1E+100000"), "euid Decimal('1E+100000') does not fit in 64 bits"),
        (Decimal("42.000"), 42),
        (float("inf"), "euid inf is not an integer"),
        (1e30, "euid of more than 30 digits does not fit in 64 bits"),
        ("alice@example.com", "euid '<email>' is not an integer"),  # a contact in the wrong column
    ],
)
def test_parse_euid(raw: object, expected: object) -> None:
    """An euid is a positive 64-bit integer; anything else gives a reason naming the value."""
    assert parse_euid(raw) == expected


def test_contacts_are_trimmed_and_empty_values_dropped() -> None:
    """NULL, empty and blank values are left out; the rest are trimmed and stringified."""
    cleaned = clean_contacts(
        {
            "email": "  a@b.c ",
            "mobile_phone": None,
            "landline_phone": "  ",
            "whatsapp_phone": 819012345678,
        }
    )

    assert cleaned == ({"email": "a@b.c", "whatsapp_phone": "819012345678"}, None)


def test_row_with_contacts_maps_to_payload() -> None:
    """A valid euid and at least one contact make a payload with the euid as an integer."""
    mapped = map_row(row("42", email="a@b.c", mobile_phone=None), Policy("s"))

    assert mapped.result == Payload(42, {"email": "a@b.c"})
    assert mapped.result.body() == {"euid": 42, "contacts": {"email": "a@b.c"}}


def test_row_without_contacts_is_skipped() -> None:
    """A row with no contact values is skipped with a reason, keeping its euid."""
    mapped = map_row(row(42, email=None, mobile_phone=""), Policy("s"))

    assert mapped.result == Skip("no contact values", 42)


def test_row_with_bad_euid_is_skipped() -> None:
    """A row whose euid is invalid is skipped with the reason, and no euid."""
    mapped = map_row(row("x1", email="a@b.c"), Policy("s"))

    assert mapped.result == Skip("euid 'x1' is not an integer")
    assert mapped.euid is None


def test_hash_ignores_whitespace_and_null_columns() -> None:
    """Re-reading a row whose contacts only differ by padding or NULLs gives the same hash."""
    a = map_row(row(1, email="a@b.c", mobile_phone=None), Policy("s"))
    b = map_row(row("1", email=" a@b.c", landline_phone=""), Policy("s"))

    assert a.hash == b.hash


def test_hash_depends_on_salt_euid_and_every_value() -> None:
    """A different sync, euid or contact value gives a different hash."""
    base = map_row(row(1, email="a@b.c"), Policy("s")).hash

    assert map_row(row(1, email="a@b.c"), Policy("t")).hash != base
    assert map_row(row(2, email="a@b.c"), Policy("s")).hash != base
    assert map_row(row(1, email="a@b.d"), Policy("s")).hash != base
    assert map_row(row(1, email="a@b.c", mobile_phone="1"), Policy("s")).hash != base


def test_invalid_euid_hash_differs_from_valid_one() -> None:
    """A bad euid that later becomes valid changes the hash, so the row is sent."""
    assert (
        map_row(row("1x", email="a@b.c"), Policy("s")).hash
        != map_row(row(1, email="a@b.c"), Policy("s")).hash
    )


contact_values = st.one_of(st.none(), st.text(max_size=20))


@given(
    st.dictionaries(
        st.sampled_from(["email", "mobile_phone", "landline_phone", "whatsapp_phone"]),
        contact_values,
    )
)
def test_payload_never_carries_empty_values(contacts: dict[str, object]) -> None:
    """Whatever the row holds, a payload has at least one contact and no blank value."""
    mapped = map_row(row(5, **contacts), Policy("s"))

    if isinstance(mapped.result, Payload):
        assert mapped.result.contacts
        assert all(v and v == v.strip() for v in mapped.result.contacts.values())
    else:
        reason = mapped.result.reason
        assert reason == "no contact values" or reason.startswith("contact "), reason


def test_clearing_sends_empty_strings_for_emptied_columns() -> None:
    """With clear on, every mapped contact is in the payload, emptied ones as ""."""
    mapped = map_row(
        row(5, email="a@b.c", mobile_phone=None, landline_phone=" "), Policy("s", True)
    )

    assert mapped.result == Payload(5, {"email": "a@b.c", "landline_phone": "", "mobile_phone": ""})


def test_clearing_a_user_with_no_values_left_offers_a_clearing_payload() -> None:
    """With clear on, a user with every contact empty is skipped, carrying the payload that
    would empty them in EngageLab."""
    mapped = map_row(row(5, email=None, mobile_phone=""), Policy("s", True))

    clears = Payload(5, {"email": "", "mobile_phone": ""})
    assert mapped.result == Skip("no contact values", 5, clears)


def test_clearing_changes_the_hash() -> None:
    """Turning clearing on changes a row's hash, so every user is pushed once in the new form."""
    assert (
        map_row(row(5, email="a", mobile_phone=None), Policy("s")).hash
        != map_row(row(5, email="a", mobile_phone=None), Policy("s", True)).hash
    )


@pytest.mark.parametrize(
    ("value", "sent", "reason"),
    [
        (8613900000001.0, "8613900000001", None),  # double precision: once "8613900000001.0"
        (Decimal("8613900000001.00"), "8613900000001", None),  # numeric
        (8613900000001, "8613900000001", None),
        (b" +8190 ", "+8190", None),  # bytes: a SQL_ASCII database's text
        (8613900000001.5, None, "contact mobile_phone is a fractional number"),
        (float("nan"), None, "contact mobile_phone is not a finite number"),
        (float("-inf"), None, "contact mobile_phone is not a finite number"),
        (2.0**60, None, "contact mobile_phone is a floating-point number too large to be exact"),
        (Decimal("1.5"), None, "contact mobile_phone is a fractional number"),
        (Decimal("NaN"), None, "contact mobile_phone is not a finite number"),
        (Decimal("1E+40"), None, "contact mobile_phone is a number of more than 30 digits"),
        (10**40, None, "contact mobile_phone is a number of more than 30 digits"),
        (True, None, "contact mobile_phone is a boolean, not text or a number"),
        (b"a\xffb", None, "contact mobile_phone is not valid UTF-8 text"),
        ("a\udcffb", None, "contact mobile_phone is not valid UTF-8 text"),  # SQLite, see source
        ("a\x00b", None, "contact mobile_phone holds a NUL character"),
        (date(2026, 1, 1), None, "contact mobile_phone is of type date, not text or a number"),
        (uuid.UUID(int=7), None, "contact mobile_phone is of type UUID, not text or a number"),
        ({"n": 1}, None, "contact mobile_phone is of type dict, not text or a number"),
        ([1, 2], None, "contact mobile_phone is of type list, not text or a number"),
    ],
)
def test_contact_values_of_every_column_type(value: object, sent: str | None, reason: str) -> None:
    """Whole numbers are sent as integers; a value that makes no sense as a contact skips the row
    with a reason naming the contact, never the value."""
    mapped = map_row(row(5, email="a@b.c", mobile_phone=value), Policy("s"))

    if sent is not None:
        assert mapped.result == Payload(5, {"email": "a@b.c", "mobile_phone": sent})
    else:
        assert mapped.result == Skip(reason, 5)


def test_a_key_too_long_for_the_status_table_is_refused_under_its_digest() -> None:
    """A 300-character key is recorded under its SHA-256 with the reason, and never pushed."""
    mapped = map_row(SourceRow("k" * 300, 1, 5, {"email": "a@b.c"}), Policy("s"))

    assert isinstance(mapped.result, Skip) and mapped.result.key_refused
    assert mapped.result.reason.startswith("the source key is 300 characters long, more than 256")
    assert mapped.key.startswith("sha256:") and len(mapped.key) == 71


def test_a_key_of_the_longest_storable_length_is_kept() -> None:
    """A key of exactly 256 characters is stored as it is."""
    mapped = map_row(SourceRow("k" * KEY_LIMIT, 1, 5, {"email": "a@b.c"}), Policy("s"))

    assert (mapped.key, mapped.result) == ("k" * KEY_LIMIT, Payload(5, {"email": "a@b.c"}))


@settings(max_examples=400)
@given(
    key=column_value,
    euid=column_value,
    contacts=st.dictionaries(
        st.sampled_from(["email", "mobile_phone", "landline_phone", "whatsapp_phone"]),
        column_value,
    ),
    clear=st.booleans(),
)
def test_any_row_maps_to_a_sendable_payload_or_a_clear_reason(
    key: Any, euid: Any, contacts: dict[str, Any], clear: bool
) -> None:
    """Whatever Python value psycopg or sqlite3 returns in any column, mapping never raises: a
    payload the client can encode, or a skip whose reason and key both tracking backends store."""
    mapped = map_row(SourceRow(key, 1, euid, contacts), Policy("s", clear))

    assert len(mapped.key) <= KEY_LIMIT and storable(mapped.key)
    assert len(mapped.hash) == 64
    result = mapped.result
    if isinstance(result, Payload):
        assert 0 < result.euid <= EUID_MAX
        assert any(result.contacts.values())
        json.dumps(result.body(), ensure_ascii=False).encode()  # what the client sends
        assert all("\x00" not in v for v in result.contacts.values())
    else:
        assert result.reason.isprintable() and len(result.reason) <= MESSAGE_LIMIT
        assert result.euid is None or 0 < result.euid <= EUID_MAX


# --- identity rows (source.identity) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("u-42", ("u-42", None)),
        (" u1", (" u1", None)),  # an identifier is taken as it is, never trimmed
        (42, ("42", None)),
        (Decimal("42"), ("42", None)),
        (uuid.UUID(int=5), ("00000000-0000-0000-0000-000000000005", None)),
        ("x" * 256, ("x" * 256, None)),
        (None, (None, "identity is empty")),
        ("  ", (None, "identity is empty")),
        ("x" * 257, (None, "identity is 257 characters long, more than 256")),
        ("a\x00b", (None, "identity holds a NUL character or text that is not UTF-8")),
        (10**300, (None, "identity is a number of more than 256 digits")),
        (1.5, (None, "identity of type float is not text or a whole number")),
        (True, (None, "identity of type bool is not text or a whole number")),
    ],
)
def test_parse_identity(raw: object, expected: tuple[str | None, str | None]) -> None:
    """An identity value is text of 1-256 characters as register takes it, or a reason."""
    assert parse_identity(raw) == expected


def test_an_identity_row_hashes_the_same_before_and_after_its_euid_is_known() -> None:
    """Resolving an identity row's EUID addresses its payload and leaves its hash as it was."""
    mapped = map_row(row("u1", email="a@b.c"), Policy("s"), identity=True)

    resolved = addressed(mapped, 77)

    assert (mapped.identity, mapped.euid) == ("u1", None)
    assert resolved.result == Payload(77, {"email": "a@b.c"})
    assert (resolved.hash, resolved.euid) == (mapped.hash, 77)


def test_an_identity_rows_hash_covers_its_identity() -> None:
    """Another identity value with the same contacts is another hash; a bad one is skipped."""
    one = map_row(row("u1", email="a@b.c"), Policy("s"), identity=True)
    other = map_row(row("u2", email="a@b.c"), Policy("s"), identity=True)
    empty = map_row(row(None, email="a@b.c"), Policy("s"), identity=True)

    assert one.hash != other.hash
    assert empty.result == Skip("identity is empty")


def test_an_identity_row_clears_once_addressed() -> None:
    """With clearing on, an identity row whose contacts all emptied clears at its EUID."""
    mapped = map_row(row("u1", email=None), Policy("s", True), identity=True)

    resolved = addressed(mapped, 9)

    assert isinstance(resolved.result, Skip)
    assert resolved.result.clears == Payload(9, {"email": ""})
    assert resolved.euid == 9


def test_an_identity_row_that_leaves_is_left_and_clears_only_at_its_euid() -> None:
    """A soft-deleted identity row maps to Leave, hashed by identity, cleared once addressed."""
    gone = SourceRow(key=1, cursor=1, euid="u1", contacts={"email": "a@b.c"}, deleted=1)
    policy = Policy("s", on_leave="clear", contact_keys=("email",))
    mapped = map_row(gone, policy, identity=True)
    other = map_row(SourceRow(1, 1, "u2", {"email": "a@b.c"}, deleted=1), policy, identity=True)

    resolved = addressed(mapped, 9)

    assert isinstance(mapped.result, Leave)
    assert (mapped.result.reason, mapped.identity, mapped.euid) == (SOFT_DELETED, "u1", None)
    assert mapped.hash != other.hash
    assert resolved.result == Leave(SOFT_DELETED, 9, Payload(9, {"email": ""}))
    assert resolved.hash == mapped.hash
