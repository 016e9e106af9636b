"""The EngageLab emulator: pure decisions, then the real server over HTTP, then its command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_sync.emulator import (
    FIRST_EUID,
    ContactUpdate,
    Emulator,
    EmulatorServer,
    FaultKind,
    Faults,
    Rejection,
    TokenBucket,
    delay_for,
    euid_for,
    main,
    merge_contacts,
    parse_contact_request,
    pick_fault,
    take_token,
)
from cdc_sync.engagelab import PROBE_DOCUMENT

KEY, SECRET = "test-key", "test-secret-do-not-echo"
CONTACT = "/v1/user/contact"
REGISTER = "/v1/user/register"


@pytest.fixture
def emulator() -> Emulator:
    return Emulator(KEY, SECRET)


@pytest.fixture
def server(emulator: Emulator) -> Iterator[EmulatorServer]:
    with EmulatorServer(emulator) as running:
        yield running


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=(KEY, SECRET), timeout=10.0) as http:
        yield http


def push(client: httpx.Client, euid: Any, **contacts: Any) -> httpx.Response:
    """Send one contact request the way cdc-sync does."""
    return client.post(CONTACT, json={"euid": euid, "contacts": contacts})


# --- pure decisions -------------------------------------------------------------------------------


def test_merge_replaces_given_keys_and_keeps_the_rest() -> None:
    """A patch replaces the keys it names and leaves the other stored keys alone."""
    stored = {"email": "old@example.com", "mobile_phone": "1"}

    merged = merge_contacts(stored, {"email": "new@example.com"})

    assert merged == {"email": "new@example.com", "mobile_phone": "1"}


def test_merge_empty_string_removes_the_key() -> None:
    """An empty string clears a key instead of storing an empty value."""
    merged = merge_contacts({"email": "a@example.com", "mobile_phone": "1"}, {"email": ""})

    assert merged == {"mobile_phone": "1"}


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (0.00, FaultKind.DROPPED),
        (0.24, FaultKind.DROPPED),
        (0.25, FaultKind.UNAVAILABLE),
        (0.49, FaultKind.UNAVAILABLE),
        (0.50, FaultKind.SERVER_ERROR),
        (0.74, FaultKind.SERVER_ERROR),
        (0.75, None),
        (0.99, None),
    ],
)
def test_pick_fault_splits_the_draw_by_cumulative_rates(
    draw: float, expected: FaultKind | None
) -> None:
    """One uniform draw lands on drop, then 503, then 500, then no fault, by cumulative rate."""
    faults = Faults(drop_rate=0.25, error_rate=0.25, server_error_rate=0.25)

    assert pick_fault(faults, draw) is expected


@given(st.floats(min_value=0.0, max_value=1.0), st.floats(0.0, 1.0), st.floats(0.0, 0.5))
def test_delay_stays_within_jitter_and_never_negative(
    draw: float, latency: float, jitter: float
) -> None:
    """The delay is latency plus or minus the jitter, clamped at zero."""
    delay = delay_for(Faults(latency=latency, latency_jitter=jitter), draw)

    assert max(0.0, latency - jitter) - 1e-9 <= delay <= latency + jitter + 1e-9


def test_token_bucket_allows_a_second_worth_then_refuses_until_refilled() -> None:
    """A full bucket lets `rate` requests through at once, then one more per 1/rate seconds."""
    bucket = TokenBucket(tokens=2.0, stamp=0.0)

    bucket, first = take_token(bucket, 2.0, 0.0)
    bucket, second = take_token(bucket, 2.0, 0.0)
    bucket, third = take_token(bucket, 2.0, 0.1)
    _, fourth = take_token(bucket, 2.0, 0.6)

    assert (first, second, third, fourth) == (True, True, False, True)


@pytest.mark.parametrize(
    "settings",
    [
        {"error_rate": 1.5},
        {"drop_rate": -0.1},
        {"error_rate": 0.6, "server_error_rate": 0.6},
        {"latency": "slow"},
        {"throttle_rps": 0},
        {"retry_after": True},
        {"fail_codes": {"x": 1}},
        {"throttled_euids": "7"},
        {"throttled_euids": [1.5]},
        {"no_such_setting": 1},
    ],
)
def test_faults_reject_invalid_settings(settings: dict[str, Any]) -> None:
    """Out-of-range, mistyped or unknown fault settings raise ValueError."""
    with pytest.raises(ValueError):  # noqa: PT011 -- the messages vary by setting on purpose
        Faults.from_json(settings)


def test_faults_round_trip_through_json() -> None:
    """to_json and from_json are inverses, with euid keys as strings in JSON."""
    faults = Faults(
        latency=0.02,
        throttle_rps=5.0,
        retry_after=2,
        throttled_euids=[9, 8],
        fail_codes={7: 55004},
        seed=3,
    )

    assert Faults.from_json(faults.to_json()) == faults
    assert faults.to_json()["fail_codes"] == {"7": 55004}
    assert faults.to_json()["throttled_euids"] == [8, 9]


def test_parse_contact_request_keeps_euid_and_contacts() -> None:
    """A valid body becomes a ContactUpdate with the euid and contacts as sent."""
    raw = b'{"euid": 10362473, "contacts": {"email": "12@gmail.com"}}'

    assert parse_contact_request(raw) == ContactUpdate(10362473, {"email": "12@gmail.com"})


def test_parse_contact_request_names_the_first_problem() -> None:
    """An invalid body becomes a Rejection carrying the code of its first problem."""
    raw = b'{"euid": 1, "contacts": {"fax": "1", "email": 5}}'

    assert parse_contact_request(raw) == Rejection(55102, "invalid contact key 'fax'")


# --- the contact endpoint over HTTP ---------------------------------------------------------------


def test_contact_is_accepted_and_stored(client: httpx.Client, emulator: Emulator) -> None:
    """A valid request is answered code 0 and its contacts are stored for the euid."""
    response = push(client, 10362473, mobile_phone="18023456879", email="12@gmail.com")

    assert response.status_code == 200
    assert response.json() == {"code": 0, "message": "success"}
    assert emulator.contacts == {10362473: {"mobile_phone": "18023456879", "email": "12@gmail.com"}}
    assert emulator.received(10362473) == [{"mobile_phone": "18023456879", "email": "12@gmail.com"}]


def test_contacts_merge_with_patch_semantics(client: httpx.Client, emulator: Emulator) -> None:
    """A later request changes only the keys it names, and both payloads are recorded in order."""
    push(client, 5, email="a@example.com", mobile_phone="1")

    push(client, 5, email="b@example.com")

    assert emulator.contacts[5] == {"email": "b@example.com", "mobile_phone": "1"}
    assert emulator.received(5) == [
        {"email": "a@example.com", "mobile_phone": "1"},
        {"email": "b@example.com"},
    ]


def test_empty_string_clears_a_stored_contact(client: httpx.Client, emulator: Emulator) -> None:
    """An empty string value removes that key from what is stored."""
    push(client, 5, email="a@example.com", whatsapp_phone="2")

    push(client, 5, email="")

    assert emulator.contacts[5] == {"whatsapp_phone": "2"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", 55004),
        (b"[1, 2]", 55004),
        (b'{"contacts": {"email": "a@b.c"}}', 40007),
        (b'{"euid": null, "contacts": {"email": "a@b.c"}}', 40007),
        (b'{"euid": "123", "contacts": {"email": "a@b.c"}}', 55108),
        (b'{"euid": 12.0, "contacts": {"email": "a@b.c"}}', 55108),
        (b'{"euid": true, "contacts": {"email": "a@b.c"}}', 55108),
        (b'{"euid": 0, "contacts": {"email": "a@b.c"}}', 55108),
        (b'{"euid": -4, "contacts": {"email": "a@b.c"}}', 55108),
        (b'{"euid": 1}', 55004),
        (b'{"euid": 1, "contacts": ["a@b.c"]}', 55004),
        (b'{"euid": 1, "contacts": {}}', 55004),
        (b'{"euid": 1, "contacts": {"fax": "1"}}', 55102),
        (b'{"euid": 1, "contacts": {"email": 42}}', 55004),
        (b'{"euid": 1, "contacts": {"email": null}}', 55004),
    ],
)
def test_invalid_contact_request_is_rejected_with_its_code(
    client: httpx.Client, emulator: Emulator, body: bytes, code: int
) -> None:
    """Each kind of invalid body gets HTTP 400 with its documented code and stores nothing."""
    response = client.post(CONTACT, content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["code"] == code
    assert emulator.contacts == {}
    assert emulator.stats()["rejected"] == {code: 1}


def test_unknown_euid_is_rejected_when_euids_are_known() -> None:
    """With a set of known euids, a known one is accepted and any other gets 55108."""
    emulator = Emulator(KEY, SECRET, known_euids={1, 2})
    with (
        EmulatorServer(emulator) as server,
        httpx.Client(base_url=server.url, auth=(KEY, SECRET)) as c,
    ):
        known = push(c, 1, email="a@example.com")
        unknown = push(c, 3, email="a@example.com")

    assert known.json()["code"] == 0
    assert (unknown.status_code, unknown.json()["code"]) == (400, 55108)


@pytest.mark.parametrize("auth", [None, (KEY, "wrong"), ("wrong", SECRET)])
def test_bad_credentials_get_40050(
    server: EmulatorServer, emulator: Emulator, auth: tuple[str, str] | None
) -> None:
    """A missing or wrong key or secret is answered HTTP 401 with code 40050."""
    with httpx.Client(base_url=server.url, auth=auth) as unauthorised:
        response = push(unauthorised, 1, email="a@example.com")

    assert (response.status_code, response.json()["code"]) == (401, 40050)
    assert emulator.contacts == {}


@pytest.mark.parametrize(
    ("auth", "code"), [((KEY, SECRET), 40007), ((KEY, "wrong"), 40050)], ids=["right", "wrong"]
)
def test_credentials_are_checked_before_the_body(
    server: EmulatorServer, auth: tuple[str, str], code: int
) -> None:
    """A body with no EUID gets 40007 only past authentication; bad credentials get 40050
    first, as ``cdc-sync check`` relies on EngageLab doing."""
    with httpx.Client(base_url=server.url, auth=auth) as http:
        response = http.post(CONTACT, json=PROBE_DOCUMENT)

    assert response.json()["code"] == code


def test_auth_fail_code_refuses_every_request(client: httpx.Client, emulator: Emulator) -> None:
    """With auth_fail_code set, even valid requests get that fatal code and HTTP 401."""
    emulator.set_faults(Faults(auth_fail_code=50031))

    response = push(client, 1, email="a@example.com")

    assert (response.status_code, response.json()["code"]) == (401, 50031)


def test_fail_codes_force_a_code_for_chosen_euids(client: httpx.Client, emulator: Emulator) -> None:
    """A euid in fail_codes gets its forced code while other euids are accepted."""
    emulator.set_faults(Faults(fail_codes={7: 55004}))

    forced = push(client, 7, email="a@example.com")
    other = push(client, 8, email="a@example.com")

    assert (forced.status_code, forced.json()["code"]) == (400, 55004)
    assert other.json()["code"] == 0
    assert set(emulator.contacts) == {8}


def test_error_status_is_configurable(client: httpx.Client, emulator: Emulator) -> None:
    """error_status lets business errors arrive with another HTTP status, such as 200."""
    emulator.set_faults(Faults(error_status=200))

    response = push(client, 1, fax="1")

    assert (response.status_code, response.json()["code"]) == (200, 55102)


# --- the register endpoint ------------------------------------------------------------------------


def test_register_allocates_stable_euids(client: httpx.Client) -> None:
    """Each (identity name, value) gets one euid of its seed's digest, the same on every call."""
    first = client.post(
        REGISTER, json={"identity_name": "user_id", "identity_values": ["u1", "u2"]}
    )
    again = client.post(REGISTER, json={"identity_name": "user_id", "identity_values": ["u2"]})
    other = client.post(REGISTER, json={"identity_name": "anonymous_id", "identity_values": ["u1"]})

    assert first.json() == {
        "code": 0,
        "message": "success",
        "data": [
            {"identity_value": "u1", "euid": euid_for(0, "user_id", "u1")},
            {"identity_value": "u2", "euid": euid_for(0, "user_id", "u2")},
        ],
    }
    assert again.json()["data"] == [{"identity_value": "u2", "euid": euid_for(0, "user_id", "u2")}]
    assert other.json()["data"] == [
        {"identity_value": "u1", "euid": euid_for(0, "anonymous_id", "u1")}
    ]
    assert (
        len(
            {
                euid_for(0, "user_id", "u1"),
                euid_for(0, "user_id", "u2"),
                euid_for(0, "anonymous_id", "u1"),
            }
        )
        == 3
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"identity_name": "user_id", "identity_values": [f"u{i}" for i in range(101)]}, 55101),
        ({"identity_name": "user_id", "identity_values": ["ok", "x" * 257]}, 55105),
        ({"identity_name": "email", "identity_values": ["u1"]}, 55106),
        ({"identity_name": "user_id", "identity_values": ["u1", ""]}, 55107),
    ],
)
def test_invalid_register_request_is_rejected(
    client: httpx.Client, body: dict[str, Any], code: int
) -> None:
    """Too many, too long, empty values or a bad identity name reject the whole request."""
    response = client.post(REGISTER, json=body)

    assert (response.status_code, response.json()["code"]) == (400, code)
    assert "data" not in response.json()


def test_register_gives_the_same_euids_after_a_restart() -> None:
    """Two emulators with the same seed give a value the same EUID, whatever the order asked."""
    euids = []
    for values in (["u1", "u2", "u3"], ["u3", "u1", "u2"]):
        with (
            EmulatorServer(Emulator(KEY, SECRET, faults=Faults(seed=7))) as server,
            httpx.Client(base_url=server.url, auth=(KEY, SECRET)) as c,
        ):
            body = {"identity_name": "user_id", "identity_values": values}
            data = c.post(REGISTER, json=body).json()["data"]
        euids.append({entry["identity_value"]: entry["euid"] for entry in data})

    assert euids[0] == euids[1]
    assert all(FIRST_EUID <= euid < 2**63 for euid in euids[0].values())


def test_register_can_answer_partially(client: httpx.Client, emulator: Emulator) -> None:
    """register_drop leaves chosen values out of a code-0 answer's data; the calls are recorded."""
    emulator.set_faults(Faults(register_drop=frozenset({"u2"})))

    answer = client.post(
        REGISTER, json={"identity_name": "user_id", "identity_values": ["u1", "u2"]}
    ).json()

    assert answer["code"] == 0
    assert [entry["identity_value"] for entry in answer["data"]] == ["u1"]
    assert emulator.register_calls() == [("user_id", ("u1", "u2"))]
    assert emulator.resolved() == {("user_id", "u1"): 1}


@pytest.mark.parametrize(("code", "status"), [(-1, 500), (40050, 401), (55004, 400)])
def test_register_codes_answer_a_whole_request(
    client: httpx.Client, emulator: Emulator, code: int, status: int
) -> None:
    """A register request holding a value of register_codes is answered with its code."""
    emulator.set_faults(Faults(register_codes={"u2": code}))

    response = client.post(
        REGISTER, json={"identity_name": "user_id", "identity_values": ["u1", "u2"]}
    )
    spared = client.post(REGISTER, json={"identity_name": "user_id", "identity_values": ["u1"]})

    assert (response.status_code, response.json()["code"]) == (status, code)
    assert "data" not in response.json()
    assert spared.json()["code"] == 0
    assert emulator.resolved() == {("user_id", "u1"): 1}


def test_register_checks_basic_auth(server: EmulatorServer) -> None:
    """register refuses a wrong secret with 40050, as contact does."""
    with httpx.Client(base_url=server.url, auth=(KEY, "wrong")) as c:
        response = c.post(REGISTER, json={"identity_name": "user_id", "identity_values": ["u1"]})

    assert (response.status_code, response.json()["code"]) == (401, 40050)


def test_register_faults_round_trip_as_json() -> None:
    """register_drop, register_codes and hold_contacts survive the admin endpoint's JSON."""
    faults = Faults(register_drop=frozenset({"a"}), register_codes={"b": -1}, hold_contacts=True)

    assert Faults.from_json(faults.to_json()) == faults


def test_registered_euid_becomes_known() -> None:
    """A euid created by register is accepted by contact even when known euids are restricted."""
    emulator = Emulator(KEY, SECRET, known_euids=())
    with (
        EmulatorServer(emulator) as server,
        httpx.Client(base_url=server.url, auth=(KEY, SECRET)) as c,
    ):
        body = {"identity_name": "user_id", "identity_values": ["u1"]}
        euid = c.post(REGISTER, json=body).json()["data"][0]["euid"]
        response = push(c, euid, email="a@example.com")

    assert response.json()["code"] == 0


# --- faults ---------------------------------------------------------------------------------------


def test_error_rate_answers_503_with_an_html_page(client: httpx.Client, emulator: Emulator) -> None:
    """With error_rate 1, every request gets a 503 proxy page that is not JSON."""
    emulator.set_faults(Faults(error_rate=1.0))

    response = push(client, 1, email="a@example.com")

    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    assert emulator.stats()["faults"]["unavailable"] == 1
    assert emulator.contacts == {}


def test_server_error_rate_answers_500_code_minus_one(
    client: httpx.Client, emulator: Emulator
) -> None:
    """With server_error_rate 1, every request gets HTTP 500 with code -1."""
    emulator.set_faults(Faults(server_error_rate=1.0))

    response = push(client, 1, email="a@example.com")

    assert (response.status_code, response.json()) == (
        500,
        {"code": -1, "message": "internal error"},
    )
    assert emulator.stats()["faults"]["server_error"] == 1


def test_drop_rate_closes_the_connection_without_answering(
    client: httpx.Client, emulator: Emulator
) -> None:
    """With drop_rate 1, the client sees a transport error, not a response."""
    emulator.set_faults(Faults(drop_rate=1.0))

    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        push(client, 1, email="a@example.com")

    assert emulator.stats()["faults"]["dropped"] == 1
    assert emulator.contacts == {}


def test_throttle_answers_429_with_retry_after(client: httpx.Client, emulator: Emulator) -> None:
    """Beyond throttle_rps, a burst gets 429 with the configured Retry-After header."""
    emulator.set_faults(Faults(throttle_rps=0.01, retry_after=2))

    responses = [push(client, 1, email="a@example.com") for _ in range(5)]

    throttled = [r for r in responses if r.status_code == 429]
    assert len(throttled) == 4
    assert {r.headers["Retry-After"] for r in throttled} == {"2"}
    assert throttled[0].json() == {"code": 429, "message": "too many requests"}
    assert emulator.stats()["faults"]["throttled"] == 4


def test_throttled_euids_are_always_answered_429(client: httpx.Client, emulator: Emulator) -> None:
    """A euid in throttled_euids gets 429 with Retry-After every time; other euids are accepted."""
    emulator.set_faults(Faults(throttled_euids=[7], retry_after=600))

    told = [push(client, 7, email="a@example.com") for _ in range(2)]
    other = push(client, 8, email="a@example.com")

    assert [(r.status_code, r.headers["Retry-After"]) for r in told] == [(429, "600")] * 2
    assert other.json()["code"] == 0
    assert set(emulator.contacts) == {8}
    assert emulator.stats()["faults"]["throttled"] == 2


def test_latency_still_answers(client: httpx.Client, emulator: Emulator) -> None:
    """With latency and jitter set, requests are delayed but still answered normally."""
    emulator.set_faults(Faults(latency=0.001, latency_jitter=0.001))

    response = push(client, 1, email="a@example.com")

    assert response.json()["code"] == 0


def test_faults_are_deterministic_for_a_seed() -> None:
    """Two emulators with the same seed and rates answer the same request sequence identically."""

    def statuses() -> list[int]:
        emulator = Emulator(
            KEY, SECRET, faults=Faults(error_rate=0.3, server_error_rate=0.3, seed=7)
        )
        with (
            EmulatorServer(emulator) as server,
            httpx.Client(base_url=server.url, auth=(KEY, SECRET)) as c,
        ):
            return [push(c, 1, email="a@example.com").status_code for _ in range(30)]

    first, second = statuses(), statuses()

    assert first == second
    assert {200, 500, 503} <= set(first)


# --- admin API ------------------------------------------------------------------------------------


def test_admin_endpoints_report_state(client: httpx.Client) -> None:
    """The admin API returns stored contacts, received payloads and counts as JSON."""
    push(client, 5, email="a@example.com")
    push(client, 5, fax="1")

    contacts = client.get("/_emulator/contacts").json()
    received = client.get("/_emulator/received").json()
    stats = client.get("/_emulator/stats").json()

    assert client.get("/_emulator/health").status_code == 200
    assert contacts == {"5": {"email": "a@example.com"}}
    assert received == {"5": [{"email": "a@example.com"}]}
    assert stats == {
        "requests": 2,
        "paths": {CONTACT: 2},
        "accepted": 1,
        "rejected": {"55102": 1},
        "faults": {"dropped": 0, "unavailable": 0, "server_error": 0, "throttled": 0},
    }


def test_admin_faults_replaces_the_faults(client: httpx.Client, emulator: Emulator) -> None:
    """Posting settings to /_emulator/faults replaces the faults in force."""
    response = client.post("/_emulator/faults", json={"fail_codes": {"9": 50034}})

    assert response.status_code == 200
    assert emulator.faults == Faults(fail_codes={9: 50034})
    assert client.get("/_emulator/faults").json()["fail_codes"] == {"9": 50034}
    assert push(client, 9, email="a@example.com").json()["code"] == 50034


def test_admin_faults_rejects_invalid_settings(client: httpx.Client, emulator: Emulator) -> None:
    """Invalid settings are answered 400 and leave the faults unchanged."""
    response = client.post("/_emulator/faults", json={"error_rate": 2})

    assert response.status_code == 400
    assert emulator.faults == Faults()


def test_reset_clears_state_counts_and_faults(client: httpx.Client, emulator: Emulator) -> None:
    """After reset, contacts, registrations, counts and faults are back to the start."""
    push(client, 5, email="a@example.com")
    client.post(REGISTER, json={"identity_name": "user_id", "identity_values": ["u1"]})
    emulator.set_faults(Faults(fail_codes={5: 55004}))

    assert client.post("/_emulator/reset").status_code == 200

    assert emulator.contacts == {}
    assert emulator.received(5) == []
    assert emulator.stats()["requests"] == 0
    assert emulator.faults == Faults()
    body = {"identity_name": "user_id", "identity_values": ["u9"]}
    assert client.post(REGISTER, json=body).json()["data"][0]["euid"] == euid_for(
        0, "user_id", "u9"
    )
    assert emulator.register_calls() == [("user_id", ("u9",))]


def test_server_url_is_unavailable_before_start() -> None:
    """Asking for the URL of a server that is not running raises RuntimeError."""
    server = EmulatorServer(Emulator(KEY, SECRET))

    with pytest.raises(RuntimeError):
        _ = server.url


def test_start_reraises_a_bind_failure(server: EmulatorServer) -> None:
    """Starting a second server on a port in use raises the bind error in the caller."""
    port = int(server.url.rsplit(":", 1)[1])

    with pytest.raises(OSError):  # noqa: PT011 -- any bind error will do
        EmulatorServer(Emulator(KEY, SECRET), port=port).start()


# --- command line ---------------------------------------------------------------------------------


def test_main_serves_until_sigterm_and_exits_zero() -> None:
    """`python -m cdc_sync.emulator --port 0` announces its URL, answers, and exits 0 on SIGTERM."""
    env = {**os.environ, "ENGAGELAB_API_SECRET": SECRET}
    command = [sys.executable, "-m", "cdc_sync.emulator", "--port", "0", "--api-key", KEY]
    process = subprocess.Popen(
        [*command, "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.removeprefix("emulator listening on ").strip()
        with httpx.Client(base_url=url, auth=(KEY, SECRET)) as c:
            response = push(c, 1, email="a@example.com")

        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()

    assert line.startswith("emulator listening on http://127.0.0.1:")
    assert response.json()["code"] == 0
    assert process.returncode == 0
    assert SECRET not in line + stdout + stderr


def test_main_requires_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a key and secret from flags or environment, main exits with a usage error."""
    monkeypatch.delenv("ENGAGELAB_API_KEY", raising=False)
    monkeypatch.delenv("ENGAGELAB_API_SECRET", raising=False)

    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "0"])

    assert exit_info.value.code == 2


def test_main_reports_a_port_in_use(
    server: EmulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the port is taken, main says so on stderr and exits 69 (EX_UNAVAILABLE)."""
    port = server.url.rsplit(":", 1)[1]

    status = main(["--port", port, "--api-key", KEY, "--api-secret", SECRET])

    assert status == 69
    assert "cannot listen" in capsys.readouterr().err
