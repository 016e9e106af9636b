"""An HTTPS server on loopback for tests of certificates: it completes a TLS handshake (or sees
the client refuse it) and answers every request with EngageLab's success."""

from __future__ import annotations

import socketserver
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import trustme

SUCCESS = b'HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{"code":0,"message":"success"}'


@contextmanager
def https_server(authority: trustme.CA, name: str = "127.0.0.1") -> Iterator[str]:
    """Serve HTTPS with a certificate from ``authority`` made out to ``name``; yield its URL."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(name).configure_cert(context)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                with context.wrap_socket(self.request, server_side=True) as tls:
                    while tls.recv(65536):
                        tls.sendall(SUCCESS)
            except (ssl.SSLError, OSError):
                return  # the client refused the certificate: what these tests are about

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"https://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join()
