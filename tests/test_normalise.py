"""Contact values in one form: phones, e-mail addresses, limits; and what mapping makes of them."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from values import emails

from cdc_sync.emulator import contact_value_ok
from cdc_sync.mapping import PHONE_KEYS, Payload, Policy, Skip, SourceRow, map_row
from cdc_sync.normalise import VALUE_LIMIT, Normalisation, Refused, email, limits, phone

ON = Normalisation(emails=True, phones=True, phone_region="JP")


@pytest.mark.parametrize(
    ("written", "region", "e164"),
    [
        ("090-1234-5678", "JP", "+819012345678"),
        ("09012345678", "JP", "+819012345678"),
        (
            "\uff10\uff19\uff10\uff0d\uff11\uff12\uff13\uff14\uff0d\uff15\uff16\uff17\uff18",
            "JP",
            "+819012345678",
        ),  # full-width
        ("(03) 1234-5678", "JP", "+81312345678"),
        ("+81 90 1234 5678", None, "+819012345678"),
        ("139 0000 0001", "CN", "+8613900000001"),
        ("+86 139-0000-0001", "JP", "+8613900000001"),  # a country code beats the region
        ("(212) 555-0100", "US", "+12125550100"),
        ("1-212-555-0100", "US", "+12125550100"),
        ("212.555.0100 ext. 12", "US", "+12125550100"),  # E.164 has no extension
        ("8123 4567", "SG", "+6581234567"),
        ("+65 6123-4567", "CN", "+6561234567"),
    ],
)
def test_national_and_international_phones_become_e164(
    written: str, region: str | None, e164: str
) -> None:
    """Phones as people write them (JP, CN, US, SG) become E.164, or its digits without ``+``."""
    assert phone(written, region) == e164
    assert phone(written, region, "digits") == e164[1:]


@pytest.mark.parametrize(
    ("written", "region", "reason"),
    [
        ("12", "JP", "is not a possible phone number (wrong length for its country)"),
        ("+1 2", "US", "is not a phone number"),
        ("abc", "JP", "is not a phone number"),
        ("090-1234-5678", None, "has no country code, and normalize.phone_region is not set"),
        ("+999 1234 5678", None, "has a country code that does not exist"),
        ("090-1234-5678-9999-1234", "JP", "is too long to be a phone number"),
        (
            "0000000000",
            "JP",
            "is not a phone number E.164 can write (it would read back as another)",
        ),
    ],
)
def test_impossible_phones_are_refused_with_a_reason(
    written: str, region: str | None, reason: str
) -> None:
    """A value that is not a possible number is refused; the reason does not quote it."""
    assert phone(written, region) == Refused(reason)


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("A@Example.COM", "A@example.com"),
        ("a.b+tag@MAIL.Example.co.JP", "a.b+tag@mail.example.co.jp"),
        ("x@Bücher.de", "x@xn--bcher-kva.de"),
        ("yamada@例え.jp", "yamada@xn--r8jz45g.jp"),
        ("用户@例子.广告", "用户@xn--fsqu00a.xn--4rr70v"),  # an international local part stays
    ],
)
def test_emails_get_a_lower_case_ascii_domain(written: str, normal: str) -> None:
    """The domain is lower-cased and IDN-encoded; the local part is kept as written."""
    assert email(written) == normal


@pytest.mark.parametrize(
    "written", ["a@", "@example.com", "a b@example.com", "a@localhost", "a@@example.com", "a"]
)
def test_impossible_emails_are_refused_without_the_value(written: str) -> None:
    """An impossible address is refused with a reason of our own, never the library's text."""
    assert email(written) == Refused("is not a possible e-mail address")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a" * VALUE_LIMIT, None),
        ("a" * (VALUE_LIMIT + 1), f"is longer than {VALUE_LIMIT} characters"),
        ("a\tb", "holds a control character"),
        ("a\x1bb", "holds a control character"),
        ("a\x00b", "holds a NUL character"),
        ("山田\u3000太郎", None),  # an ideographic space is not a control character
    ],
)
def test_limits(text: str, problem: str | None) -> None:
    """Every contact value is at most 256 characters without control characters."""
    assert limits(text) == problem


def test_limits_apply_with_normalisation_off() -> None:
    """A value over the limit or holding a control character skips its row, naming the key."""
    policy = Policy("s")

    long = map_row(SourceRow(1, 1, 7, {"email": "a" * 300 + "@b.c"}), policy).result
    tab = map_row(SourceRow(1, 1, 7, {"mobile_phone": "090\n1234"}), policy).result

    assert long == Skip(f"contact email is longer than {VALUE_LIMIT} characters", 7)
    assert tab == Skip("contact mobile_phone holds a control character", 7)


def test_cosmetic_edits_map_to_the_same_payload_and_hash() -> None:
    """With normalisation on, a cosmetic edit in the source changes neither payload nor hash."""
    policy = Policy("s", normalise=ON)
    before = {"email": "A@Example.COM", "mobile_phone": "090-1234-5678"}
    after = {"email": "A@example.com", "mobile_phone": "09012345678"}

    a = map_row(SourceRow(1, 1, 7, before), policy)
    b = map_row(SourceRow(1, 2, 7, after), policy)

    assert a.result == Payload(7, {"email": "A@example.com", "mobile_phone": "+819012345678"})
    assert a.hash == b.hash


def test_phone_formats_are_chosen_per_key() -> None:
    """``phone_formats`` gives one contact key its own form; the others keep ``phone_format``."""
    normal = Normalisation(
        phones=True, phone_region="SG", phone_formats={"whatsapp_phone": "digits"}
    )
    contacts = {"mobile_phone": "8123 4567", "whatsapp_phone": "8123 4567"}

    result = map_row(SourceRow(1, 1, 7, contacts), Policy("s", normalise=normal)).result

    assert result == Payload(7, {"mobile_phone": "+6581234567", "whatsapp_phone": "6581234567"})


def test_a_phone_in_a_numeric_column_is_read_with_its_country_code() -> None:
    """A number from a numeric column (no ``+`` possible) is read as country code and number."""
    result = map_row(SourceRow(1, 1, 7, {"mobile_phone": 8613900000001}), Policy("s", normalise=ON))

    assert result.result == Payload(7, {"mobile_phone": "+8613900000001"})


def test_an_impossible_value_skips_its_row_naming_the_key_only() -> None:
    """Normalisation's refusal is the row's skip reason; the value appears nowhere in it."""
    mapped = map_row(
        SourceRow(1, 1, 7, {"email": "Nobody@", "mobile_phone": "12"}), Policy("s", normalise=ON)
    )

    assert mapped.result == Skip("contact email is not a possible e-mail address", 7)


def test_normalisation_off_sends_values_as_written() -> None:
    """Without ``normalize``, values are only trimmed (the behaviour before normalisation)."""
    contacts = {"email": " A@Example.COM ", "mobile_phone": "090-1234-5678"}

    result = map_row(SourceRow(1, 1, 7, contacts), Policy("s")).result

    assert result == Payload(7, {"email": "A@Example.COM", "mobile_phone": "090-1234-5678"})


# Phones as they sit in application tables: national or international, with separators.
_regions = st.sampled_from(["JP", "CN", "US", "SG", "GB", "DE", "IN", "BR"])
_separator = st.sampled_from(["", " ", "-", ".", " - "])
_written_phones = st.builds(
    lambda prefix, groups, sep: prefix + sep.join(groups),
    st.sampled_from(["", "0", "+81 ", "+86", "+1 ", "+65-", "00", "("]),
    st.lists(st.from_regex(r"[0-9]{1,4}", fullmatch=True), min_size=1, max_size=5),
    _separator,
)
_written_emails = st.builds(
    lambda address, upper, pad: pad + (address.upper() if upper else address) + pad,
    emails,
    st.booleans(),
    st.sampled_from(["", " ", "  "]),
)


@given(_written_phones, _regions, st.sampled_from(["e164", "digits"]))
def test_phone_normalisation_is_idempotent_and_sendable(text: str, region: str, form: str) -> None:
    """A normalised phone normalises to itself, and the emulator accepts it for every phone key."""
    normal = phone(text, region, form)

    if isinstance(normal, Refused):
        assert text not in normal.reason or not text.strip()
        return
    again = normal if form == "e164" else "+" + normal
    assert phone(again, region, form) == normal
    assert phone(again, None, form) == normal
    assert all(contact_value_ok(key, normal) for key in PHONE_KEYS)


@given(_written_emails)
def test_email_normalisation_is_idempotent_and_sendable(text: str) -> None:
    """A normalised address normalises to itself, and the emulator accepts it."""
    normal = email(text.strip())

    if isinstance(normal, Refused):
        return
    assert email(normal) == normal
    assert normal == normal.strip() and normal.split("@")[1] == normal.split("@")[1].lower()
    assert contact_value_ok("email", normal)


@given(
    st.dictionaries(
        st.sampled_from(["email", *PHONE_KEYS]),
        st.one_of(st.none(), _written_phones, _written_emails, st.text(max_size=300)),
        min_size=1,
    ),
    _regions,
)
def test_mapping_with_normalisation_sends_only_what_the_emulator_accepts(
    contacts: dict[str, object], region: str
) -> None:
    """Whatever the columns hold, a normalised payload's every value passes the emulator's
    validation, and mapping the payload's own values again gives the same payload."""
    policy = Policy("s", normalise=Normalisation(emails=True, phones=True, phone_region=region))

    result = map_row(SourceRow(1, 1, 7, contacts), policy).result

    if isinstance(result, Payload):
        assert all(contact_value_ok(k, v) for k, v in result.contacts.items())
        assert map_row(SourceRow(1, 1, 7, dict(result.contacts)), policy).result == result
