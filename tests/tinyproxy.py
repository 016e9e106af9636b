"""Debian's tinyproxy on a loopback port, started for a test: a real HTTP proxy that tunnels
``CONNECT`` and forwards absolute-form requests, with Basic proxy authentication if asked."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROXY_USER = ("cdc", "pr0xy-pa55word")  # what the authenticating proxy asks for

READY = "Accepting connections"  # the last line tinyproxy logs before it serves
REQUEST = re.compile(r"Request \(file descriptor \d+\): (.*)$")


class TinyProxy:
    """A running tinyproxy: its URL, and what it was asked to do."""

    def __init__(self, process: subprocess.Popen[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._process = process
        self._log = log
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._keep_log, daemon=True)
        self._reader.start()

    def _keep_log(self) -> None:
        """Copy its output to the log, to the end, so tinyproxy never blocks on a full pipe."""
        assert self._process.stdout is not None
        with self._log.open("w") as saved:
            for line in self._process.stdout:
                saved.write(line)
                if READY in line:
                    saved.flush()
                    self._ready.set()
        self._ready.set()  # it exited: wait_ready says so

    def wait_ready(self) -> None:
        self._ready.wait(timeout=30)  # a readiness wait: its log says when it serves
        if self._process.poll() is not None or not self._ready.is_set():
            self.stop()
            raise OSError(f"tinyproxy did not start: {self._log.read_text()}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
        self._process.wait(timeout=30)
        self._reader.join(timeout=30)

    def requests(self) -> list[str]:
        """The request lines it received (``CONNECT host:port HTTP/1.1``, ``POST http://...``).
        Stops the proxy first, so that its log is complete."""
        self.stop()
        lines = self._log.read_text().splitlines()
        return [found[1] for line in lines if (found := REQUEST.search(line))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def tinyproxy(directory: Path, auth: tuple[str, str] | None = None) -> Iterator[TinyProxy]:
    """Run tinyproxy in the foreground until the block ends.

    Raises OSError when tinyproxy is not installed or does not start.
    """
    binary = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise FileNotFoundError("tinyproxy is not installed (apt-get install tinyproxy)")
    port = free_port()
    lines = ["Listen 127.0.0.1", f"Port {port}", "Timeout 30", "MaxClients 64", "LogLevel Info"]
    if os.geteuid() == 0:  # tinyproxy drops root itself, to the user named here
        nobody = pwd.getpwnam("nobody")
        lines += [f"User {nobody.pw_name}", f"Group {grp.getgrgid(nobody.pw_gid).gr_name}"]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proxy = TinyProxy(process, port, directory / "tinyproxy.log")
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.stop()
