"""Proxies: which one carries a request (pure), and the transport through Debian's tinyproxy."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Iterator

import httpx
import pytest
import trustme
from tinyproxy import PROXY_USER, TinyProxy, free_port
from tlsserver import https_server

from cdc_sync.emulator import EmulatorServer
from cdc_sync.engagelab import PROXY_FIX, ApiResult, EngageLabClient, Verdict
from cdc_sync.mapping import Payload
from cdc_sync.proxies import Proxies, Proxy
from cdc_sync.transport import Http1Transport

PASSWORD = "pr0xy-pa55word"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment naming no proxy, in either case."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


# -- which proxy (pure) ---------------------------------------------------------------------------


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("http://proxy.corp:3128", Proxy("proxy.corp", 3128)),
        ("proxy.corp:3128", Proxy("proxy.corp", 3128)),  # no scheme: http, as curl takes it
        ("http://proxy.corp", Proxy("proxy.corp", 80)),
        ("HTTP://proxy.corp:8080/", Proxy("proxy.corp", 8080)),
        ("http://[::1]:3128", Proxy("::1", 3128)),
        ("http://u:p@proxy.corp:1", Proxy("proxy.corp", 1, basic("u", "p"))),
        ("http://a%40b:p%3Aq%2F@proxy.corp:1", Proxy("proxy.corp", 1, basic("a@b", "p:q/"))),
        ("http://u@proxy.corp:1", Proxy("proxy.corp", 1, basic("u", ""))),
    ],
)
def test_proxy_urls(url: str, proxy: Proxy) -> None:
    """A proxy URL gives host, port and the Proxy-Authorization of its percent-decoded userinfo."""
    assert Proxy.parse(url) == proxy


@pytest.mark.parametrize(
    "url",
    [
        f"https://u:{PASSWORD}@proxy.corp:3128",
        f"socks5://u:{PASSWORD}@proxy.corp:1080",
        f"http://u:{PASSWORD}@proxy.corp:port",
        f"http://u:{PASSWORD}@:3128",
        f"http://u:{PASSWORD}@proxy.corp:3128/path",
    ],
)
def test_unusable_proxy_urls_are_refused_without_quoting_them(url: str) -> None:
    """A proxy URL that cannot be used is refused with a message that holds no password."""
    with pytest.raises(ValueError, match=r"http://\[user:password@\]host\[:port\]") as refused:
        Proxy.parse(url)

    assert PASSWORD not in str(refused.value)


def test_a_proxy_shows_itself_without_its_credentials() -> None:
    """Neither str nor repr of a proxy shows its user or password."""
    proxy = Proxy.parse(f"http://someone:{PASSWORD}@proxy.corp:3128")

    shown = f"{proxy} {proxy!r}"

    assert str(proxy) == "http://proxy.corp:3128"
    assert PASSWORD not in shown and "someone" not in shown
    assert base64.b64encode(f"someone:{PASSWORD}".encode()).decode() not in shown


@pytest.mark.parametrize("upper", [True, False], ids=["upper case", "lower case"])
def test_the_environment_names_the_proxies_and_what_bypasses_them(
    monkeypatch: pytest.MonkeyPatch, upper: bool
) -> None:
    """HTTPS_PROXY and HTTP_PROXY carry their schemes; NO_PROXY hosts and domains go straight."""
    for name, value in [
        ("HTTPS_PROXY", "http://secure.proxy:3128"),
        ("HTTP_PROXY", "http://plain.proxy:3128"),
        ("NO_PROXY", "localhost, .internal,10.1.2.3"),
    ]:
        monkeypatch.setenv(name if upper else name.lower(), value)

    proxies = Proxies.from_environment()

    assert proxies.route("https", "ma-api.engagelab.com") == Proxy("secure.proxy", 3128)
    assert proxies.route("http", "ma-api.engagelab.com") == Proxy("plain.proxy", 3128)
    assert proxies.route("https", "api.internal") is None
    assert proxies.route("https", "internal") is None
    assert proxies.route("https", "localhost") is None
    assert proxies.route("http", "10.1.2.3") is None
    assert proxies.route("https", "notinternal") == Proxy("secure.proxy", 3128)


def test_no_proxy_star_bypasses_every_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """NO_PROXY=* sends every request straight out."""
    monkeypatch.setenv("HTTPS_PROXY", "http://secure.proxy:3128")
    monkeypatch.setenv("NO_PROXY", "*")

    assert Proxies.from_environment().route("https", "ma-api.engagelab.com") is None


def test_an_unusable_environment_proxy_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy variable that cannot be used is named, its value (and password) not quoted."""
    monkeypatch.setenv("https_proxy", f"socks5://u:{PASSWORD}@proxy.corp:1080")

    with pytest.raises(ValueError, match=r"^HTTPS_PROXY: ") as refused:
        Proxies.from_environment()

    assert PASSWORD not in str(refused.value)


def test_the_configured_proxy_carries_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """engagelab.proxy (Proxies.only) is used for every origin, whatever NO_PROXY says."""
    monkeypatch.setenv("NO_PROXY", "*")

    proxies = Proxies.only("http://configured:3128")

    assert proxies.route("https", "ma-api.engagelab.com") == Proxy("configured", 3128)
    assert proxies.route("http", "127.0.0.1") == Proxy("configured", 3128)


def test_no_proxy_settings_send_everything_straight() -> None:
    """With no variable set, no request goes through a proxy."""
    proxies = Proxies.from_environment()

    assert proxies.route("https", "ma-api.engagelab.com") is None
    assert proxies.route("http", "127.0.0.1") is None


# -- the transport through a real proxy ------------------------------------------------------------

ONE = [Payload(100, {"email": "a@b.c"})]


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusting(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


@pytest.fixture
def https_api(authority: trustme.CA) -> Iterator[str]:
    """An HTTPS server answering EngageLab's success, with a certificate from ``authority``."""
    with https_server(authority) as url:
        yield url


def push(url: str, proxies: Proxies, context: ssl.SSLContext | None = None) -> list[ApiResult]:
    """Push two payloads, one after the other, through ``proxies``; their results."""
    transport = Http1Transport(1, 5.0, ssl_context=context, proxies=proxies)
    with EngageLabClient(url, "key", "secret", concurrency=1, transport=transport) as client:
        results = client.push_all([*ONE, Payload(101, {"email": "d@e.f"})])
    return [result for result in results if result is not None]


def test_https_goes_through_a_connect_tunnel(
    http_proxy: TinyProxy, https_api: str, trusting: ssl.SSLContext
) -> None:
    """An https origin is reached with TLS inside one CONNECT tunnel, kept alive across requests."""
    results = push(https_api, Proxies.only(http_proxy.url), trusting)

    assert [result.verdict for result in results] == [Verdict.SUCCESS, Verdict.SUCCESS]
    target = https_api.removeprefix("https://")
    assert http_proxy.requests() == [f"CONNECT {target} HTTP/1.1"]


def test_https_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, http_proxy: TinyProxy, https_api: str, trusting: ssl.SSLContext
) -> None:
    """HTTPS_PROXY, read from the environment, carries an https origin."""
    monkeypatch.setenv("HTTPS_PROXY", http_proxy.url)

    results = push(https_api, Proxies.from_environment(), trusting)

    assert results[0].verdict is Verdict.SUCCESS
    assert http_proxy.requests() == [f"CONNECT {https_api.removeprefix('https://')} HTTP/1.1"]


def test_plain_http_goes_to_the_proxy_in_absolute_form(
    http_proxy: TinyProxy, api: EmulatorServer
) -> None:
    """A plain-http origin's requests are handed to the proxy with the whole URL."""
    results = push(api.url, Proxies.only(http_proxy.url))

    assert [result.verdict for result in results] == [Verdict.SUCCESS, Verdict.SUCCESS]
    assert api.emulator.contacts[100] == {"email": "a@b.c"}
    assert http_proxy.requests() == [f"POST {api.url}/v1/user/contact HTTP/1.1"] * 2


def test_no_proxy_sends_the_host_straight_out(
    monkeypatch: pytest.MonkeyPatch, https_api: str, trusting: ssl.SSLContext
) -> None:
    """A host in NO_PROXY is reached directly, though HTTPS_PROXY names a proxy that is down."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")  # nobody listens
    refused = push(https_api, Proxies.from_environment(), trusting)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    bypassed = push(https_api, Proxies.from_environment(), trusting)

    assert refused[0].verdict is Verdict.TRANSIENT
    assert refused[0].message == "connection failed: ConnectError"
    assert [result.verdict for result in bypassed] == [Verdict.SUCCESS, Verdict.SUCCESS]


def test_a_proxy_asking_for_credentials_stops_the_sync(
    authenticating_proxy: TinyProxy, https_api: str, trusting: ssl.SSLContext
) -> None:
    """A tunnel refused with 407 is fatal: every request would be refused, so none is retried."""
    results = push(https_api, Proxies.only(authenticating_proxy.url), trusting)

    assert [result.verdict for result in results] == [Verdict.FATAL]  # the second is not sent
    assert "answered CONNECT" in results[0].message and "407" in results[0].message
    assert PROXY_FIX in results[0].message


def test_proxy_credentials_from_the_url_are_sent(
    authenticating_proxy: TinyProxy, https_api: str, api: EmulatorServer, trusting: ssl.SSLContext
) -> None:
    """The proxy URL's user and password open the tunnel, and authorise absolute-form requests."""
    user, password = PROXY_USER
    proxies = Proxies.only(authenticating_proxy.url.replace("://", f"://{user}:{password}@"))

    tunnelled = push(https_api, proxies, trusting)
    forwarded = push(api.url, proxies)

    assert [result.verdict for result in tunnelled + forwarded] == [Verdict.SUCCESS] * 4
    assert len(authenticating_proxy.requests()) == 3  # one CONNECT, two forwarded POSTs


def test_the_tunnel_works_on_asyncios_own_loop_too(
    http_proxy: TinyProxy, https_api: str, trusting: ssl.SSLContext
) -> None:
    """start_tls over the tunnel works on asyncio's loop as on uvloop (the client's)."""

    async def scenario() -> int:
        proxies = Proxies.only(http_proxy.url)
        transport = Http1Transport(1, 5.0, ssl_context=trusting, proxies=proxies)
        request = httpx.Request("POST", https_api + "/v1/user/contact", content=b"{}")
        response = await transport.handle_async_request(request)
        await transport.aclose()
        return response.status_code

    assert asyncio.run(scenario()) == 200
    assert http_proxy.requests() == [f"CONNECT {https_api.removeprefix('https://')} HTTP/1.1"]


def test_plain_http_without_the_proxys_credentials_stops_the_sync(
    authenticating_proxy: TinyProxy, api: EmulatorServer
) -> None:
    """A forwarded request answered 407 by the proxy is fatal, as a refused tunnel is."""
    results = push(api.url, Proxies.only(authenticating_proxy.url))

    assert [(result.verdict, result.status) for result in results] == [(Verdict.FATAL, 407)]
    assert api.emulator.stats()["requests"] == 0


def test_a_certificate_refused_inside_the_tunnel_is_fatal(
    monkeypatch: pytest.MonkeyPatch, http_proxy: TinyProxy, https_api: str
) -> None:
    """TLS inside a tunnel checks the API's certificate as a direct connection does."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    results = push(https_api, Proxies.only(http_proxy.url))  # certifi's bundle: CA unknown

    assert [result.verdict for result in results] == [Verdict.FATAL]
    assert results[0].message.startswith("the TLS certificate of 127.0.0.1:")
    assert "certifi's bundle" in results[0].message
