"""The systemd notification protocol (``sd_notify(3)``): readiness, status, watchdog, stopping.

The protocol is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` names a Linux abstract-namespace socket). It is a handful of
lines, so it is written here rather than taken from a library: ``systemd-python`` needs
libsystemd's headers to build, and the small pure-Python packages add nothing to a ``sendto``
(``sdnotify`` has had no release since 2017). Outside systemd (no ``$NOTIFY_SOCKET``) every call
does nothing.

The watchdog is enabled when ``$WATCHDOG_USEC`` is set (and ``$WATCHDOG_PID``, when set, is this
process); systemd restarts the service if no ``WATCHDOG=1`` arrives within that interval. Who
calls :meth:`Notifier.watchdog`, and when, is the daemon's business: only when cycles progress.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("cdc_sync.notify")


class Notifier:
    """Sends notifications to the service manager named in ``environ`` (none: a no-op)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):  # abstract namespace: a NUL byte in place of the @
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_usec = _watchdog_usec(environ)
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def watchdog_seconds(self) -> float | None:
        """The watchdog interval systemd set (None: no watchdog)."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 1e6

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        if self.watchdog_usec is not None:
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping: finishing the page in flight")

    def send(self, message: str) -> None:
        """Send one datagram; a failure is logged once and never stops the daemon."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd_notify_failed", socket=self.address, error=str(exc))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` when it applies to this process, as ``sd_watchdog_enabled`` reads it."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        pid = environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec if usec > 0 else None
