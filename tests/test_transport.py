"""The HTTP/1.1 transport against loopback servers that answer byte by byte as each test says.

Every test runs on asyncio's own loop and on uvloop (the client's loop in production).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
import trustme

from cdc_sync import transport
from cdc_sync.engagelab import new_event_loop
from cdc_sync.transport import Http1Transport

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"code":0}\n'


@dataclass
class Request:
    connection: int
    head: bytes
    body: bytes


@dataclass
class Server:
    """What a scripted server saw: each request with the number of the connection it came on."""

    url: str
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    most_open: int = 0
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)


Answer = Callable[[Server, Request, asyncio.StreamWriter], Awaitable[None]]


def answering(raw: bytes) -> Answer:
    """A script that writes ``raw`` for every request."""

    async def answer(server: Server, request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    return answer


@asynccontextmanager
async def serving(answer: Answer, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """A loopback HTTP/1.1 server reading requests by Content-Length and answering by script."""
    server = Server("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        server.open_connections += 1
        server.most_open = max(server.most_open, server.open_connections)
        number = server.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                request = Request(number, head, await reader.readexactly(length))
                server.requests.append(request)
                await answer(server, request, writer)
                if writer.is_closing():
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            server.closed_by_client.set()
        finally:
            server.open_connections -= 1
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/user/contact"
    async with listener:
        yield server


def closes_after(raw: bytes) -> Answer:
    async def answer(server: Server, request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    return answer


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(coro, 10))  # a scenario that hangs fails

    return run


def post(url: str, body: bytes = b'{"euid":1}', **headers: str) -> httpx.Request:
    return httpx.Request("POST", url, headers=headers, stream=httpx.ByteStream(body))


async def send(pool: Http1Transport, request: httpx.Request) -> httpx.Response:
    response = await pool.handle_async_request(request)
    await response.aread()
    return response


async def then_one_more(
    answer: Answer,
    first: Callable[[Http1Transport, str], Awaitable[None]] | None = None,
    *,
    timeout: float = 5.0,
    wait_for_close: bool = False,
) -> list[int]:
    """A first request (answered, unless ``first`` does otherwise), then one that must succeed,
    on a pool of one connection; returns the server connection each request arrived on."""
    async with serving(answer) as server:
        pool = Http1Transport(1, timeout)
        if first is None:
            assert (await send(pool, post(server.url))).status_code == 200
        else:
            await first(pool, server.url)
        if wait_for_close:
            await server.closed_by_client.wait()
        assert (await send(pool, post(server.url))).status_code == 200
        await pool.aclose()
    return [r.connection for r in server.requests]


def test_answers_come_back_whole_over_one_reused_connection(run: Any) -> None:
    async def scenario() -> None:
        async with serving(answering(OK)) as server:
            pool = Http1Transport(4, 5.0)
            for _ in range(3):
                response = await send(pool, post(server.url, Authorization="Basic dTpw"))
                assert response.status_code == 200
                assert response.content == b'{"code":0}\n'
                assert response.headers["content-type"] == "application/json"
            await pool.aclose()
        assert server.connections == 1
        assert [r.connection for r in server.requests] == [1, 1, 1]

    run(scenario())


def test_the_request_goes_out_with_host_length_and_its_own_headers(run: Any) -> None:
    async def scenario() -> None:
        async with serving(answering(OK)) as server:
            pool = Http1Transport(1, 5.0)
            request = httpx.Request(
                "POST",
                server.url + "?a=1&b=%20",
                headers={"Authorization": "Basic dTpw", "Transfer-Encoding": "chunked"},
                stream=httpx.ByteStream(b'{"x":"\xc3\xa9"}'),
            )
            await send(pool, request)
            await pool.aclose()
        [seen] = server.requests
        lines = seen.head.split(b"\r\n")
        assert lines[0] == b"POST /v1/user/contact?a=1&b=%20 HTTP/1.1"
        headers = dict(line.split(b": ", 1) for line in lines[1:] if line)
        host = server.url.split("/")[2].encode()
        assert headers == {
            b"Authorization": b"Basic dTpw",
            b"Host": host,
            b"Content-Length": b"10",
        }
        assert seen.body == b'{"x":"\xc3\xa9"}'

    run(scenario())


def test_a_header_with_a_line_break_is_refused_before_sending(run: Any) -> None:
    async def scenario() -> None:
        async with serving(answering(OK)) as server:
            pool = Http1Transport(1, 5.0)
            with pytest.raises(httpx.LocalProtocolError, match="line break"):
                await send(pool, post(server.url, Authorization="Basic x\r\nX-Injected: 1"))
            await pool.aclose()
        assert server.requests == []

    run(scenario())


def test_no_more_connections_than_the_pool_allows(run: Any) -> None:
    async def answer(server: Server, request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.01)  # keep each connection busy while others queue
        writer.write(OK)

    async def scenario() -> None:
        async with serving(answer) as server:
            pool = Http1Transport(2, 5.0)
            responses = await asyncio.gather(*(send(pool, post(server.url)) for _ in range(8)))
            await pool.aclose()
        assert [r.status_code for r in responses] == [200] * 8
        assert server.connections == 2
        assert server.most_open == 2

    run(scenario())


def test_idle_connections_are_retired_before_servers_drop_them(run: Any) -> None:
    now = [0.0]

    async def scenario() -> None:
        async with serving(answering(OK)) as server:
            pool = Http1Transport(1, 5.0, keepalive=15.0, clock=lambda: now[0])
            await send(pool, post(server.url))
            now[0] = 14.0
            await send(pool, post(server.url))  # idle 14 s: reused
            now[0] = 29.5
            await send(pool, post(server.url))  # idle 15.5 s: a new connection
            await pool.aclose()
        assert [r.connection for r in server.requests] == [1, 1, 2]

    run(scenario())


def test_connection_close_is_honoured(run: Any) -> None:
    closing = OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    assert run(then_one_more(answering(closing))) == [1, 2]


def test_a_connection_the_server_closes_after_an_answer_is_not_reused(run: Any) -> None:
    # Whether the client saw the close before the second request or only when writing it,
    # the second request went out on a connection of its own.
    assert run(then_one_more(closes_after(OK))) in ([1, 2], [1, 1, 2])


def test_a_reused_connection_closed_unanswered_is_tried_once_more(run: Any) -> None:
    async def answer(server: Server, request: Request, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 2:
            writer.close()  # the server's keep-alive timer ran out as the request arrived
        else:
            writer.write(OK)

    assert run(then_one_more(answer)) == [1, 1, 2]


@pytest.mark.parametrize(
    ("raw", "content"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"co\r\n6\r\nde":0}\r\n0\r\n\r\n',
            b'{"code":0}',
        ),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, b'{"code":0}\n'),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["chunked", "early-hints-first", "no-content"],
)
def test_answer_framings(run: Any, raw: bytes, content: bytes) -> None:
    async def scenario() -> None:
        async with serving(answering(raw)) as server:
            pool = Http1Transport(1, 5.0)
            for _ in range(2):  # the connection stays in step after each framing
                response = await send(pool, post(server.url))
                assert response.content == content
            await pool.aclose()
        assert server.connections == 1

    run(scenario())


def test_an_answer_ended_by_closing_the_connection(run: Any) -> None:
    async def answer(server: Server, request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with serving(answer) as server:
            pool = Http1Transport(1, 5.0)
            response = await send(pool, post(server.url))
            await pool.aclose()
        assert response.content == b"all of it"

    run(scenario())


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (closes_after(b""), httpx.RemoteProtocolError, "server closed the connection"),
        (closes_after(OK[:-4]), httpx.ReadError, "answer cut short"),
        (answering(b"SMTP ready\r\n\r\n"), httpx.RemoteProtocolError, "malformed answer"),
        (
            answering(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (transport.MAX_ANSWER + 1)
                + b"x" * (transport.MAX_ANSWER + 1)
            ),
            httpx.RemoteProtocolError,
            f"answer longer than {transport.MAX_ANSWER} bytes",
        ),
    ],
    ids=["closed", "cut-short", "not-http", "too-long"],
)
def test_broken_answers_raise_httpx_errors_saying_why(
    run: Any, answer: Answer, error: type[Exception], message: str
) -> None:
    async def scenario() -> None:
        async with serving(answer) as server:
            pool = Http1Transport(1, 5.0)
            with pytest.raises(error, match=message) as raised:
                await send(pool, post(server.url))
            assert raised.value.request.url == server.url  # type: ignore[attr-defined]
            # The broken connection is gone; the next request gets a connection of its own.
            with pytest.raises(error):
                await send(pool, post(server.url))
            await pool.aclose()
        assert [r.connection for r in server.requests] == [1, 2]

    run(scenario())


def test_a_timed_out_request_takes_its_connection_with_it(run: Any) -> None:
    async def answer(server: Server, request: Request, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) > 1:
            writer.write(OK)  # the first request is never answered

    async def times_out(pool: Http1Transport, url: str) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await send(pool, post(url))

    assert run(then_one_more(answer, times_out, timeout=0.2, wait_for_close=True)) == [1, 2]


def test_a_cancelled_request_takes_its_connection_with_it(run: Any) -> None:
    started = asyncio.Event()

    async def answer(server: Server, request: Request, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 1:
            started.set()  # and never answer
        else:
            writer.write(OK)

    async def cancelled(pool: Http1Transport, url: str) -> None:
        first = asyncio.ensure_future(send(pool, post(url)))
        await started.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    assert run(then_one_more(answer, cancelled, wait_for_close=True)) == [1, 2]


def test_bytes_on_an_idle_connection_put_it_out_of_use(run: Any) -> None:
    # An answer, then bytes nobody asked for (some servers send 408 before closing).
    extra = OK + b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    assert run(then_one_more(answering(extra), wait_for_close=True)) == [1, 2]


def test_refused_connection_is_a_connect_error(run: Any) -> None:
    async def scenario() -> None:
        async with serving(answering(OK)) as server:
            url = server.url
        pool = Http1Transport(1, 5.0)
        with pytest.raises(httpx.ConnectError, match="cannot connect"):
            await send(pool, post(url))
        await pool.aclose()

    run(scenario())


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


def test_https_verifies_the_server_certificate(run: Any, authority: trustme.CA) -> None:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(served)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)

    async def scenario() -> None:
        async with serving(answering(OK), tls=served) as server:
            assert server.url.startswith("https://")
            pool = Http1Transport(1, 5.0, ssl_context=trusting)
            assert (await send(pool, post(server.url))).content == b'{"code":0}\n'
            await pool.aclose()
            stranger = Http1Transport(1, 5.0)  # the system's authorities: this CA is not one
            with pytest.raises(transport.CertificateError, match="was refused"):
                await send(stranger, post(server.url))
            await stranger.aclose()

    run(scenario())


def refused_certificate(run: Any, served: ssl.SSLContext) -> str:
    """The message of the error a default transport raises against a server using ``served``."""

    async def scenario() -> str:
        async with serving(answering(OK), tls=served) as server:
            pool = Http1Transport(1, 5.0)
            with pytest.raises(transport.CertificateError) as refused:
                await send(pool, post(server.url))
            await pool.aclose()
            return str(refused.value)

    return str(run(scenario()))


def test_an_unknown_authority_is_a_certificate_error_naming_the_trusted_bundle(
    run: Any, authority: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate from an authority not trusted says so, and which bundle was trusted."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(served)

    message = refused_certificate(run, served)

    assert message.startswith("the TLS certificate of 127.0.0.1:")
    assert "unable to get local issuer certificate" in message
    assert f"the authorities trusted are certifi's bundle {certifi.where()}" in message


def test_a_certificate_for_another_name_is_a_certificate_error(
    run: Any, authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trusted certificate made out to another host is refused, naming SSL_CERT_FILE."""
    bundle = tmp_path / "authorities.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("api.example.org").configure_cert(served)

    message = refused_certificate(run, served)

    assert "mismatch, certificate is not valid for '127.0.0.1'" in message
    assert f"the authorities trusted are SSL_CERT_FILE={bundle}" in message
