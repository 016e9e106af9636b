"""An httpx transport: keep-alive HTTP/1.1 over asyncio protocols, parsed by httptools.

Why not a general-purpose client underneath: cdc-sync sends one small POST per user to one
origin, and pushing is most of the daemon's CPU. Measured on this project's 2-core machine
(uvloop, loopback, 32 requests in flight, 4000 POSTs), CPU per request was about 0.2 ms for
aiohttp's ``ClientSession``, more again through httpx's own connection pool, and 0.04 ms for
this transport. httptools is llhttp, Node's C parser, as uvicorn uses it; what is left here is
a pool of sockets and the bytes of a request head. httpx stays the API (``httpx.Request`` in,
``httpx.Response`` out, ``httpx.MockTransport`` at the same seam in tests) and its exceptions
say why a request failed, which the client records in the sync-status table.

Proxies (:mod:`cdc_sync.proxies` decides which, once per origin): an https origin is reached
through a ``CONNECT`` tunnel, TLS started over it with ``loop.start_tls``, and a plain-http
origin by sending the proxy absolute-form requests; a proxy URL's credentials go in
``Proxy-Authorization``. A request to an origin no proxy carries costs nothing more than before.

What it does not do, because the EngageLab client never needs it: redirects (callers see the
3xx), HTTP/2, request bodies sent in pieces, answers to HEAD requests, and proxies spoken to over
TLS (``https://`` proxies) or SOCKS: an HTTP proxy on the local network is what production hosts
are given, and the tunnel keeps the API's own TLS end to end.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import certifi
import httptools
import httpx

from cdc_sync.proxies import Proxies, Proxy

MAX_ANSWER = 1 << 20
"""Bytes of answer body accepted; an EngageLab answer is a few dozen."""

KEEPALIVE = 15.0
"""Seconds an idle connection is reused for. Servers and load balancers close idle keep-alive
connections after a while (nginx after 75 s, many balancers after 60 s); a request written into
a connection the server is closing fails, so connections are retired well before that."""

_Origin = tuple[str, str, int]
_Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class ProxyRefused(httpx.ProxyError):
    """The proxy refused to open a tunnel: its credentials are wrong (407) or it does not allow
    the destination (403). Every further request would be refused the same way."""


class CertificateError(httpx.ConnectError):
    """The server's TLS certificate was refused: signed by an authority not trusted here, or
    not made out to the host's name. The same certificate is refused next time too, so this is
    a configuration problem (the URL, or the authorities trusted), never worth a retry."""


def default_trust(
    environ: Mapping[str, str] = os.environ,
) -> tuple[ssl.SSLContext, str]:
    """The authorities httpx trusts by default, and what they are, for messages.

    As :func:`httpx.create_ssl_context`: the bundle named by ``SSL_CERT_FILE``, else the
    directory named by ``SSL_CERT_DIR``, else certifi's bundle (not the system's).
    """
    if path := environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=path), f"SSL_CERT_FILE={path}"
    if path := environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=path), f"SSL_CERT_DIR={path}"
    bundle = certifi.where()
    return ssl.create_default_context(cafile=bundle), f"certifi's bundle {bundle}"


class _Failed(Exception):
    """Why a connection could not deliver an answer; becomes an httpx exception in the pool."""

    def __init__(
        self, kind: type[httpx.TransportError], message: str, *, unanswered: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.unanswered = unanswered  # the connection ended before any byte of an answer


class _Connection(asyncio.Protocol):
    """One socket carrying one request at a time; its answer resolves the future ``send`` got."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[_Answer] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self.received = False  # a byte of the current answer has arrived
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, answer: asyncio.Future[_Answer]) -> None:
        assert self._transport is not None
        self._answer = answer
        self.received = False
        self._transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._answer is None:  # bytes nobody asked for: this connection is out of step
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(httpx.RemoteProtocolError, f"malformed answer: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is None:
            return
        if self._headers_done and self._delimited_by_close():
            self.on_message_complete()
        elif self.received:
            self._fail(httpx.ReadError, "answer cut short")
        else:
            self._fail(httpx.RemoteProtocolError, "server closed the connection", unanswered=True)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._answer is None:  # a second answer to one request: out of step
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER:
            self._fail(httpx.RemoteProtocolError, f"answer longer than {MAX_ANSWER} bytes")
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        answer, status = self._answer, self._parser.get_status_code()
        headers, body = self._headers, b"".join(self._body)
        keep_alive = self._parser.should_keep_alive()
        self._reset()
        if answer is None:  # failed while parsing, or an answer nobody asked for
            return
        if 100 <= status < 200:  # informational (103 Early Hints): the answer is still to come
            self._answer = answer
            return
        self._answer = None
        if not keep_alive:
            self.close()
        if not answer.done():
            answer.set_result((status, headers, body))

    def _reset(self) -> None:
        self._headers, self._body, self._size, self._headers_done = [], [], 0, False

    def _delimited_by_close(self) -> bool:
        """An answer with neither Content-Length nor Transfer-Encoding ends when the socket does."""
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _fail(
        self, kind: type[httpx.TransportError], message: str, *, unanswered: bool = False
    ) -> None:
        answer, self._answer = self._answer, None
        self._reset()
        self.close()
        if answer is not None and not answer.done():
            answer.set_exception(_Failed(kind, message, unanswered=unanswered))


@dataclass(frozen=True, slots=True)
class _Route:
    """How requests reach one origin: straight, through a proxy's tunnel, or handed to a proxy in
    absolute form (``forward``: the header lines added to each such request)."""

    proxy: Proxy | None = None
    forward: bytes | None = None


_DIRECT = _Route()


class _Tunnel(asyncio.Protocol):
    """A connection to a proxy until it answers ``CONNECT``; then TLS takes the socket over."""

    def __init__(self, answered: asyncio.Future[None], proxy: Proxy, target: str) -> None:
        self._answered = answered
        self._proxy = proxy
        self._target = target
        self._head = b""

    def data_received(self, data: bytes) -> None:
        self._head += data
        if b"\r\n\r\n" not in self._head or self._answered.done():
            return
        line = self._head.split(b"\r\n", 1)[0].decode("latin-1")
        status = line.split(" ", 2)[1] if line.count(" ") >= 1 else ""
        if status.isdigit() and 200 <= int(status) < 300:
            self._answered.set_result(None)
            return
        said = f"proxy {self._proxy} answered CONNECT {self._target} with {line[:120]!r}"
        kind = ProxyRefused if status in ("403", "407") else httpx.ProxyError
        self._answered.set_exception(_Failed(kind, said))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._answered.done():
            said = f"proxy {self._proxy} closed the connection before answering CONNECT"
            self._answered.set_exception(_Failed(httpx.ProxyError, said))


class Http1Transport(httpx.AsyncBaseTransport):
    """Sends httpx requests over at most ``connections`` keep-alive sockets.

    A request is written whole and its answer read whole, so the response returned is complete
    and its connection back in the pool. ``timeout`` bounds each request from waiting for a
    connection to its last byte; a request that times out takes its connection with it.
    """

    def __init__(
        self,
        connections: int,
        timeout: float,
        *,
        keepalive: float = KEEPALIVE,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Proxies | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connections = connections
        self._timeout = timeout
        self._keepalive = keepalive
        self._ssl_context = ssl_context
        self._trust = "the SSL context given to the transport"
        self._clock = clock
        self._slots: asyncio.Semaphore | None = None  # made on the loop that sends
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._proxies = proxies or Proxies()  # none: every origin straight
        self._routes: dict[_Origin, _Route] = {}  # decided at an origin's first request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._connections)
        origin = _origin(request.url)
        route = self._routes.get(origin) or self._route(origin)
        data = _serialize(request, await request.aread(), route.forward)
        connected = False
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                for last_try in (False, True):
                    connection, reused = await self._connection(origin)
                    connected = True
                    try:
                        status, headers, body = await self._exchange(origin, connection, data)
                    except _Failed as exc:
                        # A server may close an idle connection just as it is reused. Nothing of
                        # an answer came, so send once more on a new connection: a contact
                        # update sent twice leaves the same contacts.
                        if exc.unanswered and reused and not last_try:
                            continue
                        raise
                    break
        except TimeoutError as exc:
            if not connected:
                message = "no connection within the timeout"
                raise httpx.ConnectTimeout(message, request=request) from exc
            message = "no complete answer within the timeout"
            raise httpx.ReadTimeout(message, request=request) from exc
        except _Failed as exc:
            raise exc.kind(str(exc), request=request) from None
        return httpx.Response(status, headers=headers, content=body, request=request)

    async def _exchange(self, origin: _Origin, connection: _Connection, data: bytes) -> _Answer:
        """Send one request on ``connection`` and wait for its answer."""
        answer: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        connection.send(data, answer)
        try:
            result = await answer
        except BaseException:  # failed, timed out or cancelled: the connection is out of step
            self._discard(connection)
            raise
        if connection.closed:  # the server said Connection: close
            self._discard(connection)
        else:
            connection.idle_since = self._clock()
            self._idle.setdefault(origin, []).append(connection)
        return result

    async def _connection(self, origin: _Origin) -> tuple[_Connection, bool]:
        """An idle connection to ``origin`` that is still fresh, or a new one; and which."""
        idle = self._idle.get(origin)
        if idle:
            retire_before = self._clock() - self._keepalive
            while idle:
                connection = idle.pop()
                if not connection.closed and connection.idle_since >= retire_before:
                    return connection, True
                self._discard(connection)
        return await self._connect(origin), False

    def _route(self, origin: _Origin) -> _Route:
        """Decide once how requests reach ``origin``, and remember it."""
        scheme, host, _ = origin
        proxy = self._proxies.route(scheme, host)
        if proxy is None:
            route = _DIRECT
        elif scheme == "https":
            route = _Route(proxy)
        else:
            route = _Route(proxy, forward=proxy.header)
        self._routes[origin] = route
        return route

    async def _connect(self, origin: _Origin) -> _Connection:
        scheme, host, port = origin
        proxy = self._routes[origin].proxy
        context = self._tls() if scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            if proxy is None:
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=context, server_hostname=host if context else None
                )
            elif context is None:  # plain http: the proxy takes absolute-form requests
                _, connection = await loop.create_connection(_Connection, proxy.host, proxy.port)
            else:
                connection = await _tunnel(proxy, host, port, context)
        except ssl.SSLCertVerificationError as exc:
            raise _Failed(CertificateError, self._refused(host, port, exc)) from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror), other TLS (SSLError)
            via = f" through proxy {proxy}" if proxy else ""
            raise _Failed(httpx.ConnectError, f"cannot connect{via}: {exc}") from exc
        self._open.add(connection)
        return connection

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context, self._trust = default_trust()
        return self._ssl_context

    def _refused(self, host: str, port: int, exc: ssl.SSLCertVerificationError) -> str:
        """What was wrong with a certificate, and which authorities it was held against."""
        return (
            f"the TLS certificate of {host}:{port} was refused: {exc.verify_message}; "
            f"the authorities trusted are {self._trust}"
        )

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def aclose(self) -> None:
        for connection in self._open:
            connection.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports close their sockets before the loop stops


async def _tunnel(proxy: Proxy, host: str, port: int, context: ssl.SSLContext) -> _Connection:
    """A TLS connection to ``host`` through a ``CONNECT`` tunnel that ``proxy`` opens."""
    loop = asyncio.get_running_loop()
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    answered: asyncio.Future[None] = loop.create_future()
    raw, _ = await loop.create_connection(
        lambda: _Tunnel(answered, proxy, target), proxy.host, proxy.port
    )
    try:
        authority = target.encode("ascii")
        raw.write(
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (authority, authority, proxy.header)
        )
        await answered
        connection = _Connection()
        tls = await loop.start_tls(raw, connection, context, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    assert tls is not None  # None only when the transport was closing
    connection.connection_made(tls)
    return connection


def _origin(url: httpx.URL) -> _Origin:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host, port


def _serialize(request: httpx.Request, body: bytes, forward: bytes | None = None) -> bytes:
    """The request's head and body as they go on the wire.

    Host and Content-Length come from the URL and the body, unless the request has its own.
    A header with a line break in it is refused: it would smuggle in headers of its own.
    ``forward``: the request goes to a proxy, in absolute form, with these header lines added.
    """
    url = request.url
    target = url.raw_path
    if forward is not None:
        target = b"%s://%s%s" % (url.raw_scheme, url.netloc, url.raw_path)
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), target)]
    if forward:
        lines.append(forward)
    names = set()
    for name, value in request.headers.raw:
        if b"\n" in value or b"\r" in value:
            raise httpx.LocalProtocolError(f"header {name!r} has a line break", request=request)
        lowered = name.lower()
        if lowered == b"transfer-encoding":  # the body is sent whole, with its length
            continue
        names.add(lowered)
        lines.append(b"%s: %s\r\n" % (name, value))
    if b"host" not in names:
        lines.append(b"Host: %s\r\n" % url.netloc)
    if b"content-length" not in names and (body or request.method not in ("GET", "HEAD")):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)
