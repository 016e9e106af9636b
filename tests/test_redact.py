"""Outside text made safe to store, print and log: cleaning, redaction, bounded numbers."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from values import any_text

from cdc_sync.redact import clean, digits, redact, storable


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("plain", "plain"),
        ("a\x00b", "a\ufffdb"),
        ("a\ud800b", "a\ufffdb"),
        ("a\nb\tc\r", "a b c "),
        ("\x1b[2J", "\ufffd[2J"),
        ("\u00a0non-breaking\u200djoined", "\u00a0non-breaking\u200djoined"),  # kept
        ("x" * 300, "x" * 199 + "\u2026"),
    ],
)
def test_clean(text: str, cleaned: str) -> None:
    """Control characters, NULs and unpaired surrogates are replaced; long text is cut."""
    assert clean(text) == cleaned


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("success", "success"),
        ("bad ALICE@example.COM here", "bad <email> here"),
        ("unknown bob@elsewhere.org", "unknown <email>"),
        ("phone +86 139 0000 0001 refused", "phone <number> refused"),
        ("code 55004, euid 123456", "code 55004, euid 123456"),  # short numbers stay
        ("value 'ab' is short", "value 'ab' is short"),  # values under 3 characters are not sought
        ("see N/A-contact", "see <landline_phone>"),
    ],
)
def test_redact(text: str, redacted: str) -> None:
    """The user's values become their key's name; other addresses and phone numbers are masked."""
    sent = {"email": "alice@example.com", "mobile_phone": "ab", "landline_phone": "N/A-contact"}

    assert redact(text, sent) == redacted


@pytest.mark.parametrize(
    ("value", "text"),
    [(42, "42"), (-(10**29), "-" + "1" + "0" * 29), (10**30, "of more than 30 digits")],
)
def test_digits(value: int, text: str) -> None:
    """An integer is shown as itself unless it is too long to show (or for Python to format)."""
    assert digits(value) == text


@given(any_text | st.text(min_size=190, max_size=260), st.integers(1, 300))
def test_clean_text_is_always_storable_and_bounded(text: str, limit: int) -> None:
    """Whatever comes in, what clean returns both tracking backends store, within the limit, and
    cleaning it again changes nothing."""
    cleaned = clean(text, limit)

    assert storable(cleaned) and len(cleaned) <= limit
    assert clean(cleaned, limit) == cleaned
