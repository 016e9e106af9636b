"""Which HTTP proxy, if any, carries a request to an origin (pure: no I/O).

Two sources, as curl and httpx read them: ``engagelab.proxy`` in the config, which carries every
request, or else the standard variables ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` (either
case), read and matched by the standard library's own :func:`urllib.request.getproxies_environment`
and :func:`urllib.request.proxy_bypass_environment`: ``NO_PROXY`` is ``*`` or a comma-separated
list of host names, each also standing for its subdomains (``internal`` and ``.internal`` both
match ``api.internal``); address ranges (CIDR) are not understood.

A proxy is reached over plain http (``http://[user:password@]host[:port]``, port 80 by default).
The user and password become a ``Proxy-Authorization`` header and nothing else: a :class:`Proxy`
shows itself (``str``, ``repr``) by host and port only, so no message or log line can carry them.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

PROXY_FORM = "http://[user:password@]host[:port]"

# What urllib.request.proxy_bypass does on Linux, but given the NO_PROXY value rather than reading
# the environment again; in the standard library since Python 2, though typeshed leaves it out.
_bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: where it listens, and the credentials its URL gave, as a header value."""

    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """The proxy at ``url``; a ValueError whose message never quotes ``url`` (it may hold a
        password). A URL without a scheme is taken as http, as curl takes it."""
        parts = urllib.parse.urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"the proxy's port is not a number; write {PROXY_FORM}") from None
        if parts.scheme.lower() != "http":
            raise ValueError(
                f"a proxy is reached over plain http, not {parts.scheme}; write {PROXY_FORM}"
            )
        if not parts.hostname:
            raise ValueError(f"the proxy URL names no host; write {PROXY_FORM}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"a proxy URL has no path or query; write {PROXY_FORM}")
        authorization = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            authorization = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
        return cls(parts.hostname, port, authorization)

    @property
    def header(self) -> bytes:
        """The ``Proxy-Authorization`` header line of a request to this proxy, or nothing."""
        return b"Proxy-Authorization: %s\r\n" % self.authorization if self.authorization else b""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Proxies:
    """The proxy for http and for https origins, the hosts that bypass them, and where these
    settings came from (for ``check``). The default carries nothing through a proxy."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str = ""
    source: str = "none set"

    @classmethod
    def only(cls, url: str, source: str = "engagelab.proxy") -> Proxies:
        """Every request through the proxy at ``url``, whatever the environment says."""
        proxy = Proxy.parse(url)
        return cls(proxy, proxy, source=source)

    @classmethod
    def from_environment(cls) -> Proxies:
        """HTTP_PROXY, HTTPS_PROXY and NO_PROXY (or their lower-case forms), as urllib reads
        them; a ValueError naming the variable when a proxy URL is unusable."""
        found = urllib.request.getproxies_environment()

        def parsed(scheme: str) -> Proxy | None:
            url = found.get(scheme)
            if not url:
                return None
            try:
                return Proxy.parse(url)
            except ValueError as exc:
                raise ValueError(f"{scheme.upper()}_PROXY: {exc}") from None

        http, https = parsed("http"), parsed("https")
        names = [f"{scheme.upper()}_PROXY" for scheme, p in (("https", https), ("http", http)) if p]
        return cls(http, https, found.get("no", ""), " and ".join(names) or "none set")

    def route(self, scheme: str, host: str) -> Proxy | None:
        """The proxy a request to ``host`` over ``scheme`` goes through; None: straight there."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or (self.no_proxy and _bypass(host, {"no": self.no_proxy})):
            return None
        return proxy

    def describe(self, url: str) -> str:
        """How a request to ``url`` goes out, for ``check``: never the proxy's credentials."""
        parts = urllib.parse.urlsplit(url)
        proxy = self.route(parts.scheme, parts.hostname or "")
        if proxy is None:
            configured = self.https if parts.scheme == "https" else self.http
            bypassed = " (NO_PROXY)" if configured else ""
            return f"none: straight to {parts.hostname}{bypassed}; proxy settings: {self.source}"
        tunnel = "a CONNECT tunnel" if parts.scheme == "https" else "absolute-form requests"
        credentials = ", with Proxy-Authorization" if proxy.authorization else ""
        return f"{proxy} ({self.source}), {tunnel}{credentials}"
