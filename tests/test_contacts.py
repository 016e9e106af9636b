"""Contacts as EngageLab gets them, end to end: a PostgreSQL source, ``cdc-sync`` processes and
the emulator over HTTP. Normalisation of messy values, and users who leave the sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_cli import Sync, cdc_sync
from userdb import CONTACT_COLUMNS, UserDb, write_config

from cdc_sync.cli import state_engine
from cdc_sync.emulator import EmulatorServer, euid_for
from cdc_sync.state import StateStore, UserStatus

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
    assert f"synced 0, unchanged {len(EMAILS)}," in report


def test_impossible_values_are_skipped_with_the_reason_and_no_value(sync: Sync) -> None:
    """A phone that is no possible number and an impossible address skip their users; the
    status table says why without the value, and the other users sync."""
    sync.write(normalize={**NORMALIZE, "phone_region": "JP"})
    sync.users.add_users([1], email="good@example.com", mobile="12")
    sync.users.add_users([2], email="nobody@@example.com")
    sync.users.add_users([3], email="fine@example.com", mobile="0312345678")

    report = once(sync)

    assert "synced 1," in report and "skipped 2" in report
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

    assert "synced 2, unchanged 5," in once(sync)  # re-read within the lookback

    assert sync.requests() == before + 2
    assert sync.emulator.contacts[1006] == {"email": "Mixed@example.com"}
    assert sync.emulator.contacts[1007] == {"email": "x@y.org", "mobile_phone": "+819012345678"}


# -- leaving the sync -------------------------------------------------------------------------

LEAVE_COLUMNS = """
ALTER TABLE users ADD COLUMN consent boolean DEFAULT true;
ALTER TABLE users ADD COLUMN deleted_at timestamptz;
"""


def sql(users: UserDb, statement: str) -> None:
    with users.engine.begin() as connection:
        connection.exec_driver_sql(statement)


def status_of(sync: Sync, key: int) -> UserStatus:
    state_url = yaml.safe_load(sync.config.read_text())["state"]["url"]
    store = StateStore(state_engine(state_url), "users")
    try:
        found = store.status_of(str(key))
    finally:
        store.engine.dispose()
    assert found is not None, f"user {key} has no status row"
    return found


@pytest.mark.parametrize("on_leave", ["keep", "clear"])
def test_users_who_leave_are_cleared_or_kept_and_recorded_as_left(
    sync: Sync, on_leave: str
) -> None:
    """A user who withdraws consent, is soft-deleted or is deleted is emptied in EngageLab with
    ``on_leave: clear`` and left as is with ``keep``; both record them as ``left`` with the
    reason, and none of them is pushed again."""
    sql(sync.users, LEAVE_COLUMNS)
    sync.write(
        source={"consent": "consent", "deleted": "deleted_at"},
        engagelab={"on_leave": on_leave},
        audit={"enabled": True},
    )
    sync.users.add_users(range(1, 5), mobile="+819012345678")
    once(sync)
    held = sync.emulator.contacts
    sql(sync.users, "UPDATE users SET consent = false, updated_at = now() WHERE id = 1")
    sql(sync.users, "UPDATE users SET deleted_at = now(), updated_at = now() WHERE id = 2")
    sql(sync.users, "DELETE FROM users WHERE id = 3")
    before = sync.requests()

    once(sync)

    cleared = dict.fromkeys(CONTACT_COLUMNS, "")  # every configured contact
    if on_leave == "clear":
        assert sync.requests() == before + 3
        for euid in (1001, 1002, 1003):
            assert sync.emulator.received(euid)[-1] == cleared
            assert sync.emulator.contacts.get(euid, {}) == {}
    else:
        assert sync.requests() == before
        assert sync.emulator.contacts == held
    assert sync.emulator.contacts[1004] == held[1004]
    reasons = {key: status_of(sync, key) for key in (1, 2, 3)}
    assert {key: row.status for key, row in reasons.items()} == {1: "left", 2: "left", 3: "left"}
    assert "consent" in (reasons[1].last_message or "")
    assert "soft-deleted" in (reasons[2].last_message or "")
    assert "no longer in the source" in (reasons[3].last_message or "")
    settled = sync.requests()

    once(sync)

    assert sync.requests() == settled


@pytest.mark.parametrize("on_leave", ["keep", "clear"])
def test_a_user_who_comes_back_is_pushed_again_only_if_cleared(sync: Sync, on_leave: str) -> None:
    """A user who consents again is synced again: pushed anew where their contacts were
    cleared, confirmed without a call where EngageLab kept them."""
    sql(sync.users, LEAVE_COLUMNS)
    sync.write(source={"consent": "consent"}, engagelab={"on_leave": on_leave})
    sync.users.add_users([1])
    once(sync)
    sql(sync.users, "UPDATE users SET consent = false, updated_at = now() WHERE id = 1")
    once(sync)
    before = sync.requests()

    sql(sync.users, "UPDATE users SET consent = true, updated_at = now() WHERE id = 1")
    once(sync)

    assert sync.requests() == before + (1 if on_leave == "clear" else 0)
    assert sync.emulator.contacts[1001] == {"email": "user1@example.com"}
    assert status_of(sync, 1).status == "synced"


def test_a_user_who_never_consented_is_never_pushed(sync: Sync) -> None:
    """Rows whose consent column is false or NULL make no call and are recorded as left."""
    sql(sync.users, LEAVE_COLUMNS)
    sync.write(source={"consent": "consent"}, engagelab={"on_leave": "clear"})
    sync.users.add_users([1, 2, 3])
    sql(sync.users, "UPDATE users SET consent = NULL WHERE id = 1")
    sql(sync.users, "UPDATE users SET consent = false WHERE id = 2")

    once(sync)

    assert sync.requests() == 1
    assert set(sync.emulator.contacts) == {1003}
    assert status_of(sync, 1).status == status_of(sync, 2).status == "left"


def test_the_check_for_deleted_rows_resumes_where_the_last_process_stopped(sync: Sync) -> None:
    """Each ``once`` checks the next slice of tracked users for deleted rows, not the first
    slice again, so a deletion far into the table is found by successive processes."""
    sync.write(audit={"enabled": True, "rows_per_cycle": 2}, engagelab={"on_leave": "clear"})
    sync.users.add_users(range(1, 7))
    once(sync)  # pushes all six; the check covers users 1 and 2
    sql(sync.users, "DELETE FROM users WHERE id = 5")

    once(sync)  # users 3 and 4
    assert status_of(sync, 5).status == "synced"
    once(sync)  # users 5 and 6

    assert status_of(sync, 5).status == "left"
    assert sync.emulator.received(1005)[-1] == dict.fromkeys(CONTACT_COLUMNS, "")


def test_identity_users_who_leave_are_cleared_at_their_stored_euid_and_never_registered(
    sync: Sync,
) -> None:
    """With ``source.identity``, users who leave in each of the three ways are cleared at the
    EUID resolved for them before, with no new register call; a user who never consented is
    recorded as left without ever being registered."""
    sql(sync.users, LEAVE_COLUMNS)
    sync.write(
        source={
            "euid": None,
            "identity": {"name": "user_id", "column": "name"},
            "consent": "consent",
            "deleted": "deleted_at",
        },
        engagelab={"on_leave": "clear"},
        audit={"enabled": True},
    )
    sync.users.add_users(range(1, 6))
    sql(sync.users, "UPDATE users SET consent = false WHERE id = 5")
    once(sync)
    euids = {i: euid_for(0, "user_id", f"user {i}") for i in range(1, 6)}
    registered = [v for _, values in sync.emulator.register_calls() for v in values]
    assert sorted(registered) == [f"user {i}" for i in range(1, 5)]
    assert set(sync.emulator.contacts) == {euids[i] for i in range(1, 5)}
    sql(sync.users, "UPDATE users SET consent = false, updated_at = now() WHERE id = 1")
    sql(sync.users, "UPDATE users SET deleted_at = now(), updated_at = now() WHERE id = 2")
    sql(sync.users, "DELETE FROM users WHERE id = 3")
    calls = len(sync.emulator.register_calls())

    once(sync)

    assert len(sync.emulator.register_calls()) == calls
    cleared = dict.fromkeys(CONTACT_COLUMNS, "")
    for key in (1, 2, 3):
        assert sync.emulator.received(euids[key])[-1] == cleared
        assert sync.emulator.contacts.get(euids[key], {}) == {}
    assert sync.emulator.contacts[euids[4]] == {"email": "user4@example.com"}
    statuses = {key: status_of(sync, key).status for key in (1, 2, 3, 5)}
    assert statuses == {1: "left", 2: "left", 3: "left", 5: "left"}
    assert euids[5] not in sync.emulator.contacts
