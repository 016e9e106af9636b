"""Contacts as EngageLab gets them, end to end: a PostgreSQL source, ``cdc-sync`` processes and
the emulator over HTTP. Normalisation of messy values, and users who leave the sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_cli import Sync, cdc_sync
from userdb import UserDb, write_config

from cdc_sync.emulator import EmulatorServer

NORMALIZE = {"emails": True, "phones": True}

# Per region: (mobile as written, landline as written, a cosmetic rewrite of the mobile, E.164s).
MESSY = {
    "JP": ("090-1234-5678", "(03) 1234-5678", "+81-90-1234-5678", "+819012345678", "+81312345678"),
    "CN": ("139 0000 0001", "010-1234 5678", "13900000001", "+8613900000001", "+861012345678"),
    "US": ("(212) 555-0100", "1-415-555-0199", "212.555.0100", "+12125550100", "+14155550199"),
    "SG": ("8123 4567", "6123-4567", "+65 81234567", "+6581234567", "+6561234567"),
}
EMAILS = [  # as written, normalised, a cosmetic rewrite
    (" Taro.Yamada@Example.CO.JP ", "Taro.Yamada@example.co.jp", "Taro.Yamada@EXAMPLE.co.jp"),
    ("wang@Bücher.DE", "wang@xn--bcher-kva.de", "wang@xn--bcher-kva.DE"),
    ("ops@例え.jp", "ops@xn--r8jz45g.jp", "ops@例え.JP"),
]


@pytest.fixture
def sync(users: UserDb, api: EmulatorServer, tmp_path: Path) -> Sync:
    """A migrated sync over an empty users table, tracked in SQLite."""
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
    )
    migrated = cdc_sync(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    return Sync(config, users, api)


def once(sync: Sync) -> str:
    result = sync("once")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("region", sorted(MESSY))
def test_messy_phones_and_emails_arrive_normalised_and_cosmetic_edits_make_no_call(
    sync: Sync, region: str
) -> None:
    """National phone formats (JP, CN, US, SG) and mixed-case or IDN domains reach EngageLab as
    E.164 and lower-case ASCII; rewriting them in another equivalent form makes no request."""
    mobile, landline, rewritten, mobile_e164, landline_e164 = MESSY[region]
    sync.write(normalize={**NORMALIZE, "phone_region": region.lower()})
    for i, (address, _, _) in enumerate(EMAILS, start=1):
        sync.users.add_users([i], email=address, mobile=mobile, landline=landline)

    once(sync)

    assert sync.emulator.contacts == {
        1000 + i: {"email": normal, "mobile_phone": mobile_e164, "landline_phone": landline_e164}
        for i, (_, normal, _) in enumerate(EMAILS, start=1)
    }
    before = sync.requests()
    for i, (_, _, cosmetic) in enumerate(EMAILS, start=1):
        sync.users.change(i, email=cosmetic, mobile=rewritten)

    report = once(sync)

    assert sync.requests() == before
    assert f"pushed 0, unchanged {len(EMAILS)}," in report


def test_impossible_values_are_skipped_with_the_reason_and_no_value(sync: Sync) -> None:
    """A phone that is no possible number and an impossible address skip their users; the
    status table says why without the value, and the other users sync."""
    sync.write(normalize={**NORMALIZE, "phone_region": "JP"})
    sync.users.add_users([1], email="good@example.com", mobile="12")
    sync.users.add_users([2], email="nobody@@example.com")
    sync.users.add_users([3], email="fine@example.com", mobile="0312345678")

    report = once(sync)

    assert "pushed 1," in report and "skipped 2" in report
    status = cdc_sync(sync.config, "status", "--limit", "10").stdout
    assert "contact mobile_phone is not a possible phone number" in status
    assert "contact email is not a possible e-mail address" in status
    assert "nobody@@" not in status
    assert sync.emulator.contacts == {
        1003: {"email": "fine@example.com", "mobile_phone": "+81312345678"}
    }


def test_check_counts_the_users_turning_normalisation_on_would_push(sync: Sync) -> None:
    """``check`` says how many users normalisation would re-push, and the next cycle pushes
    exactly those, once."""
    sync.users.add_users(range(1, 6))  # user<i>@example.com: already normal
    sync.users.add_users([6], email="Mixed@Example.COM")
    sync.users.add_users([7], email="x@y.org", mobile="+81 90 1234 5678")
    once(sync)
    sync.write(normalize={**NORMALIZE, "phone_region": "JP"})

    check = cdc_sync(sync.config, "check")

    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(r"^pending\s+2 user\(s\) would be pushed", check.stdout, re.M), check.stdout
    before = sync.requests()

    assert "pushed 2, unchanged 5," in once(sync)  # re-read within the lookback

    assert sync.requests() == before + 2
    assert sync.emulator.contacts[1006] == {"email": "Mixed@example.com"}
    assert sync.emulator.contacts[1007] == {"email": "x@y.org", "mobile_phone": "+819012345678"}
