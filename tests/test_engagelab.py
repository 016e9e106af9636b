"""Classification of EngageLab answers, and the client against the emulator over real HTTP."""

import asyncio
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from tlsserver import https_server
from values import any_text, emails, phones

from cdc_sync.emulator import Emulator, EmulatorServer, Faults
from cdc_sync.engagelab import (
    CERTIFICATE_FIX,
    MAX_RETRY_AFTER,
    ApiResult,
    CodePolicy,
    Credentials,
    EngageLabClient,
    Registration,
    Verdict,
    classify,
    judge_probe,
    new_event_loop,
    parse_retry_after,
    read_registration,
)
from cdc_sync.mapping import Payload
from cdc_sync.redact import MESSAGE_LIMIT

T, P, F, S = Verdict.TRANSIENT, Verdict.PERMANENT, Verdict.FATAL, Verdict.SUCCESS


def body(code: object, message: str = "m") -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


@pytest.mark.parametrize(
    ("status", "raw", "verdict", "code"),
    [
        (200, body(0, "success"), S, 0),
        (400, body(0), T, 0),  # success code with an error status: do not believe it
        (401, body(40050), F, 40050),
        (200, body(50031), F, 50031),
        (400, body(50034), F, 50034),
        (400, body(50074), F, 50074),
        (400, body(40007), P, 40007),
        (400, body(55108), P, 55108),
        (400, body(55004), P, 55004),
        (400, body(55102), P, 55102),
        (400, body(55103), P, 55103),
        (400, body(55014), P, 55014),
        (500, body(-1), T, -1),
        (200, body(-1), T, -1),
        (500, body(55004), P, 55004),  # the body's code decides before the status
        (400, body(99999), P, 99999),  # unknown: permanent by default
        (503, body(99999), T, 99999),
        (403, body(99999), F, 99999),
        (429, body(99999), T, 99999),
        (401, b"<html>nope</html>", F, None),
        (403, b"", F, None),
        (407, b"<html>proxy authentication required</html>", F, None),
        (503, b"<html>bad gateway</html>", T, None),
        (200, b"not json", T, None),
        (200, b"[1, 2]", T, None),
        (200, body("0"), T, None),  # a code that is not an integer is not an answer
        (200, body(True), T, None),
        (429, b"", T, None),
    ],
)
def test_classify(status: int, raw: bytes, verdict: Verdict, code: int | None) -> None:
    """Every answer gets exactly one verdict, the body's code first and the HTTP status second."""
    result = classify(status, raw)

    assert (result.verdict, result.code, result.status) == (verdict, code, status)


def test_classify_overrides_and_unknown_policy() -> None:
    """Configured overrides win over the built-in table; unknown codes follow the policy."""
    policy = CodePolicy(overrides={55004: T, 12345: F}, unknown=T)

    assert classify(400, body(55004), policy=policy).verdict is T
    assert classify(400, body(12345), policy=policy).verdict is F
    assert classify(400, body(777), policy=policy).verdict is T


def test_rate_limit_codes_are_throttling() -> None:
    """A configured rate-limit business code is transient and flagged as throttling."""
    result = classify(400, body(4290), "7", CodePolicy(rate_limit_codes=frozenset({4290})))

    assert (result.verdict, result.throttled, result.retry_after) == (T, True, 7.0)


def test_429_is_throttling_with_retry_after() -> None:
    """HTTP 429 is a throttling signal and carries Retry-After."""
    result = classify(429, b"", "3")

    assert (result.verdict, result.throttled, result.retry_after) == (T, True, 3.0)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        (" 12 ", 12.0),
        ("soon", None),
        ("1.5", None),  # delta-seconds are digits only
        ("600", 600.0),
        ("-5", None),
        ("+5", None),
        ("\u0661\u0662", None),  # Arabic-Indic digits: float() would take them
        ("1e3", None),
        ("nan", None),
        ("inf", None),
        ("Sat, 28 Nov 2026 12:00:30 GMT", 30.0),
        ("Sat, 28 Nov 2026 11:00:00 GMT", 0.0),
        ("Sat, 28 Nov 2026 12:00:30 -0000", 30.0),  # a zone-less date: once a TypeError
        ("\u00b2", None),  # a digit to str.isdigit(), not to float(): once a ValueError
        ("9" * 400, 1e9),  # once float("inf")
        ("Sat, 28 Nov 99999 12:00:30 GMT", None),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 251606433599.0),
        ("Sat, 28 Nov 2026 12:00:00 +9999", None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    """Retry-After is read as ASCII delta-seconds or an HTTP date, never negative; the rest is
    None."""
    assert parse_retry_after(header, datetime(2026, 11, 28, 12, 0, tzinfo=UTC)) == seconds


@pytest.mark.parametrize(
    "header", ["600", "99999999999", "9" * 5000, "Fri, 31 Dec 9999 23:59:59 GMT"]
)
def test_retry_after_is_capped(header: str) -> None:
    """A Retry-After beyond the cap is cut to it: 300 s by default, or as configured."""
    assert classify(429, b"", header).retry_after == MAX_RETRY_AFTER == 300.0
    assert classify(429, b"", header, CodePolicy(max_retry_after=60.0)).retry_after == 60.0


def test_message_is_truncated() -> None:
    """An API message is kept short enough to store."""
    assert len(classify(400, body(55004, "x" * 1000)).message) == 200


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        ("bad\u0000value", "bad\ufffdvalue"),  # PostgreSQL text cannot hold a NUL
        ("bad\ud800value", "bad\ufffdvalue"),  # an unpaired surrogate is not UTF-8
        ("two\nlines\tand\x1b[31mred", "two lines and\ufffd[31mred"),
        ("caf\u00e9 \U0001f600 ok", "caf\u00e9 \U0001f600 ok"),
    ],
)
def test_message_is_cleaned_of_what_storage_or_a_terminal_refuses(message: str, kept: str) -> None:
    """NULs, unpaired surrogates and control characters in an answer's message are replaced."""
    assert classify(400, body(55004, message)).message == kept


def test_message_is_redacted_of_the_values_sent_and_anything_like_them() -> None:
    """The user's own contact values become their key's name; other addresses and long digit
    runs are masked, whatever their case."""
    sent = {"email": "Alice@Example.com", "mobile_phone": "+8613900000001"}
    message = "invalid contact value: alice@example.com, +8613900000001, bob@x.org, 8613900000002"

    result = classify(400, body(55004, message), contacts=sent)

    assert result.message == "invalid contact value: <email>, <mobile_phone>, <email>, <number>"


def test_a_redacted_value_straddling_the_cut_leaves_nothing_behind() -> None:
    """Redaction happens before the message is cut, so no part of a value survives the cut."""
    sent = {"email": "someone.long@example.com"}

    result = classify(400, body(55004, "x" * 190 + sent["email"]), contacts=sent)

    assert result.message == "x" * 190 + "<email>"


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"code": 1' + b"0" * 5000 + b"}", b"\xff\xfe\x00", b'{"code": 1e999}'],
    ids=["nested beyond recursion", "5000-digit code", "not UTF-8", "infinite code"],
)
def test_bodies_that_break_a_json_parser_are_not_answers(raw: bytes) -> None:
    """A body the JSON parser chokes on is a transient non-answer, never an exception."""
    result = classify(400, raw)

    assert (result.verdict, result.code) == (T, None)


@pytest.mark.parametrize("code", [3_000_000_000, 10**20, -(2**40)])
def test_codes_beyond_32_bits_are_classified_as_they_are(code: int) -> None:
    """A code no 32-bit column holds is still classified, by its real value (the status table
    stores it elsewhere, see rules.stored_answer)."""
    result = classify(400, body(code))

    assert (result.verdict, result.code) == (P, code)


json_bodies = st.builds(
    lambda code, message: json.dumps({"code": code, "message": message}).encode(),
    st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.none(), st.booleans()),
    st.one_of(any_text, st.text(min_size=900, max_size=1200), st.integers(), st.none()),
)


@settings(max_examples=300)
@given(
    status=st.integers(min_value=100, max_value=599),
    raw=st.one_of(st.binary(max_size=64), json_bodies),
    retry_after=st.one_of(st.none(), any_text, st.integers(min_value=0).map(str)),
    unknown=st.sampled_from([T, P]),
)
def test_any_answer_is_classified_into_storable_values(
    status: int, raw: bytes, retry_after: str | None, unknown: Verdict
) -> None:
    """Whatever status, body and Retry-After come back, classify returns one verdict, a bounded
    clean message and a finite wait, and raises nothing."""
    result = classify(status, raw, retry_after, CodePolicy(unknown=unknown))

    assert result.verdict in set(Verdict)
    assert len(result.message) <= MESSAGE_LIMIT
    assert "\x00" not in result.message and "\n" not in result.message
    result.message.encode()  # no unpaired surrogate
    assert result.retry_after is None or 0 <= result.retry_after <= 1e9


@settings(max_examples=200)
@given(
    email=emails,
    phone=phones,
    before=any_text,
    after=any_text,
    upper=st.booleans(),
)
def test_no_answer_echoes_a_value_sent(
    email: str, phone: str, before: str, after: str, upper: bool
) -> None:
    """An answer quoting the values sent, in any case and amid any text, keeps none of them."""
    echoed = f"{before}{email.upper() if upper else email} / {phone}{after}"

    message = classify(400, body(55004, echoed), contacts={"email": email, "mobile_phone": phone})
    text = message.message.casefold()

    assert email.casefold() not in text
    assert phone not in text


@pytest.fixture
def emulator() -> Emulator:
    return Emulator("key", "secret")


@pytest.fixture
def server(emulator: Emulator):  # type: ignore[no-untyped-def]
    with EmulatorServer(emulator) as running:
        yield running


def client(url: str, secret: str = "secret", **options: object) -> EngageLabClient:
    return EngageLabClient(url, "key", secret, **options)  # type: ignore[arg-type]


def test_push_all_sends_each_payload_once(server: EmulatorServer, emulator: Emulator) -> None:
    """Every payload of a page reaches EngageLab once, with Basic auth and an integer euid."""
    payloads = [Payload(100 + i, {"email": f"u{i}@example.com"}) for i in range(20)]

    with client(server.url, concurrency=4) as api:
        results = api.push_all(payloads)

    assert [r.verdict if r else None for r in results] == [S] * 20
    assert emulator.contacts == {100 + i: {"email": f"u{i}@example.com"} for i in range(20)}
    assert emulator.stats()["accepted"] == 20


def test_fatal_answer_stops_new_requests(server: EmulatorServer, emulator: Emulator) -> None:
    """After a fatal answer no further request starts; unsent payloads come back as None."""
    payloads = [Payload(100 + i, {"email": "a@b.c"}) for i in range(50)]

    with client(server.url, secret="wrong", concurrency=2) as api:
        results = api.push_all(payloads)

    sent = [r for r in results if r is not None]
    assert all(r.verdict is F and r.code == 40050 for r in sent)
    assert 1 <= len(sent) <= 2  # at most the requests already in flight
    assert emulator.stats()["requests"] == len(sent)


def test_per_user_codes_do_not_stop_the_page(server: EmulatorServer, emulator: Emulator) -> None:
    """A permanent failure for one user leaves the others unaffected."""
    emulator.set_faults(Faults(fail_codes={101: 55004}))

    with client(server.url) as api:
        results = api.push_all(
            [
                Payload(100, {"email": "a@b.c"}),
                Payload(101, {"email": "b@b.c"}),
                Payload(102, {"email": "c@b.c"}),
            ]
        )

    assert [(r.verdict, r.code) for r in results if r] == [(S, 0), (P, 55004), (S, 0)]


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        (Faults(error_rate=1.0), "HTTP 503, body is not an API answer"),
        (Faults(server_error_rate=1.0), "internal error"),
        (Faults(drop_rate=1.0), "connection failed: RemoteProtocolError"),
    ],
)
def test_server_faults_are_transient(
    server: EmulatorServer, emulator: Emulator, faults: Faults, message: str
) -> None:
    """Proxy pages, code -1 and dropped connections all come back as transient results."""
    emulator.set_faults(faults)

    with client(server.url) as api:
        [result] = api.push_all([Payload(100, {"email": "a@b.c"})])

    assert result is not None
    assert result == ApiResult(T, result.code, result.status, message)


def test_timeout_is_transient(server: EmulatorServer, emulator: Emulator) -> None:
    """A request that outlives the timeout is a transient failure, not an exception."""
    emulator.set_faults(Faults(latency=2.0))

    with client(server.url, timeout=0.05) as api:
        [result] = api.push_all([Payload(100, {"email": "a@b.c"})])

    assert result == ApiResult(T, None, None, "request timed out")


def test_unreachable_server_is_transient() -> None:
    """Nothing listening is a transient failure."""
    with client("http://127.0.0.1:9") as api:
        [result] = api.push_all([Payload(100, {"email": "a@b.c"})])

    assert result is not None and result.verdict is T
    assert result.message.startswith("connection failed")


def test_an_answer_echoing_the_payload_is_redacted(
    server: EmulatorServer, emulator: Emulator
) -> None:
    """Over HTTP, an API error quoting the contact values sent comes back without them."""
    echo = '{"code": 55004, "message": "invalid contact value: {email} ({mobile_phone})"}'
    emulator.set_faults(Faults(answers={100: (400, echo)}))

    with client(server.url) as api:
        [result] = api.push_all([Payload(100, {"email": "a@b.cd", "mobile_phone": "+81901"})])

    assert result == ApiResult(P, 55004, 400, "invalid contact value: <email> (<mobile_phone>)")


def recording(order: list[int], gate: asyncio.Event | None = None) -> httpx.MockTransport:
    """A transport at the client's seam that notes each euid as its request starts."""

    async def answer(request: httpx.Request) -> httpx.Response:
        order.append(json.loads(request.content)["euid"])
        await asyncio.sleep(0)  # a real request yields to the others while it is out
        if gate is not None:
            await gate.wait()
        return httpx.Response(200, json={"code": 0, "message": "success"})

    return httpx.MockTransport(answer)


def test_batches_go_out_in_the_order_they_were_submitted() -> None:
    """Every request of a page starts before any of the next page's: pages finish in order."""
    order: list[int] = []
    first = [Payload(100 + i, {"email": "a@b.c"}) for i in range(20)]
    second = [Payload(200 + i, {"email": "a@b.c"}) for i in range(20)]

    with client("http://api.test", concurrency=4, transport=recording(order)) as api:
        answers = [api.submit(first), api.submit(second)]
        results = [answer.result(timeout=10) for answer in answers]

    assert [len([r for r in batch if r and r.verdict is S]) for batch in results] == [20, 20]
    assert order == [p.euid for p in first + second]


def test_a_failing_push_fails_its_batch_and_not_the_client() -> None:
    """An exception that is not an answer (a bug) reaches the caller; later batches still go."""

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["euid"] == 666:
            raise ValueError("bug in a transport")
        return httpx.Response(200, json={"code": 0, "message": "success"})

    with client("http://api.test", concurrency=2, transport=httpx.MockTransport(answer)) as api:
        with pytest.raises(ValueError, match="bug in a transport"):
            api.push_all([Payload(665, {"email": "a@b.c"}), Payload(666, {"email": "a@b.c"})])
        [result] = api.push_all([Payload(667, {"email": "a@b.c"})])

    assert result is not None and result.verdict is S


def test_closing_fails_batches_still_out_instead_of_leaving_them_waiting() -> None:
    """A batch in flight when the client closes ends with an error, not a wait forever."""
    order: list[int] = []
    api = client("http://api.test", concurrency=2, transport=recording(order, asyncio.Event()))
    pending = api.submit([Payload(100 + i, {"email": "a@b.c"}) for i in range(5)])
    api.close()

    with pytest.raises(RuntimeError, match="client was closed"):
        pending.result(timeout=10)
    assert len(order) <= 2  # no request started after the close


def test_the_client_loop_is_uvloop_where_it_exists() -> None:
    """On Linux the client's event loop is uvloop's (a sixth less CPU per request)."""
    import uvloop

    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_a_refused_certificate_is_fatal_and_says_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An untrusted certificate stops the sync (FATAL), naming the CA bundle and the fix."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with https_server(trustme.CA()) as url, client(url, concurrency=1) as api:
        results = api.push_all([Payload(100, {"email": "a@b.c"}), Payload(101, {"email": "d@e.f"})])

    assert results[0] is not None and results[0].verdict is F
    assert results[0].message.startswith("the TLS certificate of 127.0.0.1:")
    assert "certifi's bundle" in results[0].message
    assert CERTIFICATE_FIX in results[0].message
    assert results[1] is None  # not sent: every request would be refused the same way


def cancelled_when(
    reached: threading.Event, answer: Any, then: Callable[[], None] = lambda: None
) -> list[ApiResult | None]:
    """Push six payloads (euids 100-105) two at a time through a transport answering with
    ``answer``; cancel once ``reached`` is set, then call ``then``. The batch's results."""
    with client("http://api.test", concurrency=2, transport=httpx.MockTransport(answer)) as api:
        pending = api.submit([Payload(100 + i, {"email": "a@b.c"}) for i in range(6)])
        reached.wait(10)
        api.cancel()
        then()
        return pending.result(timeout=60)  # hang guard only


def test_cancel_ends_a_retry_after_pause_with_the_rest_not_sent() -> None:
    """Requests held by a Retry-After pause end as not sent at once on cancel; the answer that
    asked for the pause is kept."""
    told = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["euid"] == 100:
            told.set()
            return httpx.Response(429, headers={"Retry-After": "600"})
        return httpx.Response(200, json={"code": 0, "message": "success"})

    results = cancelled_when(told, answer)

    assert results[0] is not None and results[0].retry_after == MAX_RETRY_AFTER
    assert results[0].throttled
    assert all(r is None or r.verdict is S for r in results[1:])
    assert None in results[1:]


def test_cancel_awaits_requests_in_flight_and_sends_no_more() -> None:
    """Requests in flight when the client is cancelled are answered and kept; the queued ones
    end as not sent, and never reach the server."""
    order: list[int] = []
    started, release = threading.Event(), threading.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        order.append(json.loads(request.content)["euid"])
        if len(order) == 2:
            started.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        return httpx.Response(200, json={"code": 0, "message": "success"})

    results = cancelled_when(started, answer, release.set)

    assert [r is not None and r.verdict is S for r in results] == [True, True] + [False] * 4
    assert order == [100, 101]


def test_after_cancel_nothing_is_sent_until_resume() -> None:
    """A batch submitted after cancel ends as not sent at once; after resume, batches go out."""
    order: list[int] = []

    with client("http://api.test", transport=recording(order)) as api:
        api.cancel()
        refused = api.submit([Payload(100, {"email": "a@b.c"})]).result(timeout=60)
        api.resume()
        sent = api.submit([Payload(101, {"email": "a@b.c"})]).result(timeout=60)

    assert refused == [None]
    assert sent[0] is not None and sent[0].verdict is S
    assert order == [101]


OK = ApiResult(Verdict.SUCCESS, 0, 200, "success")


@pytest.mark.parametrize(
    ("body", "euids"),
    [
        (b'{"code":0,"data":[{"identity_value":"u1","euid":7}]}', {"u1": 7}),
        (b'{"code":0,"data":[{"identity_value":"u1","euid":"7"}]}', {}),
        (b'{"code":0,"data":[{"identity_value":"u1","euid":0}]}', {}),
        (b'{"code":0,"data":[{"identity_value":"u1","euid":true}]}', {}),
        (b'{"code":0,"data":[{"identity_value":"u1","euid":9223372036854775808}]}', {}),
        (b'{"code":0,"data":[{"identity_value":1,"euid":7}, 5]}', {}),
        (b'{"code":0,"data":{"u1":7}}', {}),
        (b'{"code":0}', {}),
        (b"[1]", {}),
        (b"not json", {}),
    ],
)
def test_a_register_answer_gives_only_well_formed_euids(body: bytes, euids: dict[str, int]) -> None:
    """Every well-formed data entry gives its value's EUID; anything else leaves it unresolved."""
    assert read_registration(OK, body) == Registration(OK, euids)


def test_a_failed_register_answer_gives_no_euids() -> None:
    """A register answer that is not a success resolves nothing, whatever its data says."""
    failed = ApiResult(Verdict.TRANSIENT, -1, 500, "internal error")

    registration = read_registration(failed, b'{"data":[{"identity_value":"u1","euid":7}]}')

    assert registration == Registration(failed, {})


def test_register_and_contact_calls_share_one_client(server: EmulatorServer) -> None:
    """One client sends register and contact calls; a fatal register answer stops the pushes."""
    server.emulator.set_faults(Faults(register_codes={"bad": 40050}))
    with EngageLabClient(server.url, "key", "secret", concurrency=1) as api:
        [registration] = api.submit_calls([api.registration("user_id", ["u1"])]).result()
        assert registration is not None
        euid = registration.euids["u1"]
        [pushed] = api.push_all([Payload(euid, {"email": "a@b.c"})])
        [refused] = api.submit_calls([api.registration("user_id", ["bad"])]).result()
        [after] = api.push_all([Payload(euid, {"email": "d@e.f"})])

    assert pushed is not None and pushed.verdict is Verdict.SUCCESS
    assert refused is not None and refused.result.verdict is Verdict.FATAL
    assert after is None
    assert server.emulator.contacts == {euid: {"email": "a@b.c"}}


def test_a_register_call_takes_at_most_100_values(server: EmulatorServer) -> None:
    """The client refuses to build a register call of more than 100 (or no) values."""
    with EngageLabClient(server.url, "key", "secret") as api:
        with pytest.raises(ValueError, match="1 to 100 values"):
            api.registration("user_id", [str(i) for i in range(101)])
        with pytest.raises(ValueError, match="1 to 100 values"):
            api.registration("user_id", [])


# -- the credentials probe of `cdc-sync check` ---------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "faults", "judged", "code"),
    [
        ("secret", Faults(), Credentials.ACCEPTED, 40007),
        ("wrong", Faults(), Credentials.REFUSED, 40050),
        ("secret", Faults(auth_fail_code=50034), Credentials.REFUSED, 50034),
        ("secret", Faults(server_error_rate=1.0), Credentials.UNPROVEN, -1),
    ],
    ids=["accepted", "wrong secret", "no such project", "neither"],
)
def test_probe_tells_whether_the_credentials_pass(
    server: EmulatorServer,
    emulator: Emulator,
    secret: str,
    faults: Faults,
    judged: Credentials,
    code: int,
) -> None:
    """A request with no EUID proves the credentials by its code, and changes no user."""
    emulator.set_faults(faults)

    with client(server.url, secret) as api:
        result = api.probe()

    assert (judge_probe(result), result.code) == (judged, code)
    assert emulator.contacts == {}


def test_probe_of_an_unreachable_api_is_unproven_with_no_status() -> None:
    """Nothing listening proves nothing: no HTTP status, a connection failure."""
    with client("http://127.0.0.1:9") as api:
        result = api.probe()

    assert (judge_probe(result), result.status) == (Credentials.UNPROVEN, None)
    assert result.message.startswith("connection failed")
