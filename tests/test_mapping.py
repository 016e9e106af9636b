"""Row → payload mapping and the payload hash."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_sync.mapping import Payload, Skip, SourceRow, clean_contacts, map_row, parse_euid


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

    assert cleaned == {"email": "a@b.c", "whatsapp_phone": "819012345678"}


def test_row_with_contacts_maps_to_payload() -> None:
    """A valid euid and at least one contact make a payload with the euid as an integer."""
    mapped = map_row(row("42", email="a@b.c", mobile_phone=None), salt="s")

    assert mapped.result == Payload(42, {"email": "a@b.c"})
    assert mapped.result.body() == {"euid": 42, "contacts": {"email": "a@b.c"}}


def test_row_without_contacts_is_skipped() -> None:
    """A row with no contact values is skipped with a reason, keeping its euid."""
    mapped = map_row(row(42, email=None, mobile_phone=""), salt="s")

    assert mapped.result == Skip("no contact values", 42)


def test_row_with_bad_euid_is_skipped() -> None:
    """A row whose euid is invalid is skipped with the reason, and no euid."""
    mapped = map_row(row("x1", email="a@b.c"), salt="s")

    assert mapped.result == Skip("euid 'x1' is not an integer")
    assert mapped.euid is None


def test_hash_ignores_whitespace_and_null_columns() -> None:
    """Re-reading a row whose contacts only differ by padding or NULLs gives the same hash."""
    a = map_row(row(1, email="a@b.c", mobile_phone=None), salt="s")
    b = map_row(row("1", email=" a@b.c", landline_phone=""), salt="s")

    assert a.hash == b.hash


def test_hash_depends_on_salt_euid_and_every_value() -> None:
    """A different sync, euid or contact value gives a different hash."""
    base = map_row(row(1, email="a@b.c"), salt="s").hash

    assert map_row(row(1, email="a@b.c"), salt="t").hash != base
    assert map_row(row(2, email="a@b.c"), salt="s").hash != base
    assert map_row(row(1, email="a@b.d"), salt="s").hash != base
    assert map_row(row(1, email="a@b.c", mobile_phone="1"), salt="s").hash != base


def test_invalid_euid_hash_differs_from_valid_one() -> None:
    """A bad euid that later becomes valid changes the hash, so the row is sent."""
    assert (
        map_row(row("1x", email="a@b.c"), salt="s").hash
        != map_row(row(1, email="a@b.c"), salt="s").hash
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
    mapped = map_row(row(5, **contacts), salt="s")

    if isinstance(mapped.result, Payload):
        assert mapped.result.contacts
        assert all(v and v == v.strip() for v in mapped.result.contacts.values())
    else:
        assert mapped.result.reason == "no contact values"


def test_clearing_sends_empty_strings_for_emptied_columns() -> None:
    """With clear on, every mapped contact is in the payload, emptied ones as ""."""
    mapped = map_row(row(5, email="a@b.c", mobile_phone=None, landline_phone=" "), salt="s",
                     clear=True)

    assert mapped.result == Payload(5, {"email": "a@b.c", "landline_phone": "", "mobile_phone": ""})


def test_clearing_a_user_with_no_values_left_offers_a_clearing_payload() -> None:
    """With clear on, a user with every contact empty is skipped, carrying the payload that
    would empty them in EngageLab."""
    mapped = map_row(row(5, email=None, mobile_phone=""), salt="s", clear=True)

    clears = Payload(5, {"email": "", "mobile_phone": ""})
    assert mapped.result == Skip("no contact values", 5, clears)


def test_clearing_changes_the_hash() -> None:
    """Turning clearing on changes a row's hash, so every user is pushed once in the new form."""
    assert map_row(row(5, email="a", mobile_phone=None), salt="s").hash != map_row(
        row(5, email="a", mobile_phone=None), salt="s", clear=True).hash
