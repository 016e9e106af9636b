"""Child processes, measured: `cdc-sync` commands (CPU and peak RSS from ``wait4``), the daemon,
and the servers it talks to (the emulator, the arrival-time recorder), each its own process."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-key"
API_SECRET = "bench-secret"  # noqa: S105 - the emulator's throwaway credentials
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessRun:
    """A finished child process: wall time and its own resource usage (from ``wait4``)."""

    returncode: int
    wall: float
    user: float
    system: float
    maxrss_kib: int
    stdout: str
    stderr: str
    stopped: bool = False  # SIGTERM was sent at ``stop_after``
    samples: tuple[dict[str, float], ...] = ()

    @property
    def cpu(self) -> float:
        return self.user + self.system


def run_measured(
    argv: Sequence[str],
    log: Path,
    *,
    stop_after: float | None = None,
    sample: Callable[[], Mapping[str, float]] | None = None,
    check: bool = True,
    timeout: float = 3600,
) -> ProcessRun:
    """Run a child to completion; ``wait4`` gives exactly its CPU time and peak RSS.

    ``stop_after`` seconds in, the child gets SIGTERM (cdc-sync then finishes and records the
    page in flight, and exits); ``timeout`` seconds in, SIGKILL and TimeoutError. With
    ``sample``, once a second the child's current RSS and whatever ``sample()`` returns are noted
    in ``samples``. The wait itself blocks in a thread, so the clock stops when the child exits.
    """
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    samples: list[dict[str, float]] = []
    stopped = False
    reaped: list[tuple[int, int, Any]] = []
    with out_path.open("w") as out, err_path.open("w") as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO)
        waiter = threading.Thread(target=_reap, args=(child.pid, reaped), daemon=True)
        waiter.start()
        try:
            while True:
                waiter.join(timeout=1.0)
                if not waiter.is_alive():
                    break
                elapsed = time.perf_counter() - started
                if stop_after is not None and not stopped and elapsed > stop_after:
                    child.send_signal(signal.SIGTERM)
                    stopped = True
                if elapsed > timeout:
                    raise TimeoutError(f"{' '.join(argv[-3:])} still running after {timeout:g} s")
                if sample is not None:
                    samples.append({"t": elapsed, "rss_kib": rss_kib(child.pid), **sample()})
        except BaseException:
            _kill(child)
            raise
        wall = time.perf_counter() - started
    [(_, status, usage)] = reaped
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait
    run = ProcessRun(
        child.returncode,
        wall,
        usage.ru_utime,
        usage.ru_stime,
        usage.ru_maxrss,
        out_path.read_text(),
        err_path.read_text(),
        stopped,
        tuple(samples),
    )
    if check and run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output on stderr"
        raise RuntimeError(
            f"`{' '.join(argv[-3:])}` exited {run.returncode}: {last}\n{run.stderr[-2000:]}"
        )
    return run


def _reap(pid: int, into: list[tuple[int, int, Any]]) -> None:
    """Wait for ``pid`` and keep its status and rusage (thread body of :func:`run_measured`)."""
    # ChildProcessError: _kill() reaped it after an interrupt; there is nothing left to measure.
    with contextlib.suppress(ChildProcessError):
        into.append(os.wait4(pid, 0))


def rss_kib(pid: int) -> float:
    """A live process's resident set size now (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _kill(child: subprocess.Popen[Any]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


def cli(config: Path, command: str, log: Path, **kwargs: Any) -> ProcessRun:
    """``cdc-sync -c CONFIG COMMAND`` as a measured child process."""
    argv = [sys.executable, "-m", "cdc_sync.cli", "-c", str(config), command]
    return run_measured(argv, log, **kwargs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ServerProcess:
    """A child that prints ``... listening on URL`` and serves until SIGTERM."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self._log = log.open("w")
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO
        )
        self.url = self._await_url(timeout=30)

    def _await_url(self, timeout: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if "listening on " not in line:
            self.stop()
            raise RuntimeError(f"server did not start ({line.strip() or 'no output'})")
        return line.rsplit("listening on ", 1)[1].strip()

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:  # noqa: S310
            return json.load(response)

    def post(self, path: str, body: object = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode()
        request = urllib.request.Request(  # noqa: S310 - our own loopback server
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return json.load(response)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


class Emulator(ServerProcess):
    """``python -m cdc_sync.emulator`` as its own process, configured by its flags."""

    def __init__(self, log: Path, **flags: float | int | None) -> None:
        argv = [sys.executable, "-m", "cdc_sync.emulator", "--port", "0"]
        argv += ["--api-key", API_KEY, "--api-secret", API_SECRET]
        for name, value in flags.items():
            if value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        super().__init__(argv, log)
        self.faults = self.get("/_emulator/faults")

    def stats(self) -> dict[str, Any]:
        return dict(self.get("/_emulator/stats"))

    def reset(self) -> None:
        """Forget stored contacts and counts, keeping the faults the process started with."""
        self.post("/_emulator/reset")
        self.post("/_emulator/faults", self.faults)


class Recorder(ServerProcess):
    """benchmarks/recorder.py as its own process: answers success, keeps arrival times."""

    def __init__(self, log: Path, latency: float) -> None:
        argv = [sys.executable, str(REPO / "benchmarks" / "recorder.py"), "--port", "0"]
        super().__init__([*argv, "--latency", str(latency)], log)

    def arrivals(self) -> list[float]:
        return [float(t) for t in self.get("/_times")]

    def longest_stall(self) -> float:
        """The longest delay of the recorder's event loop so far, in seconds."""
        return float(self.get("/_stalls")["max_s"])


class Daemon:
    """``cdc-sync -c CONFIG run`` as a child; SIGTERM stops it once the cycle in flight is done."""

    def __init__(self, config: Path, log: Path) -> None:
        self._out = log.with_suffix(".out").open("w")
        self._err = log.with_suffix(".err").open("w")
        argv = [sys.executable, "-m", "cdc_sync.cli", "-c", str(config), "run"]
        self.process = subprocess.Popen(argv, stdout=self._out, stderr=self._err, cwd=REPO)
        self._log = log

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """Stop the daemon and return its exit status; RuntimeError if it failed."""
        status = self._terminate()
        if status not in (0, -signal.SIGTERM):
            tail = self._log.with_suffix(".err").read_text()
            lines = [line for line in tail.splitlines() if line.strip()]
            last = lines[-1].strip() if lines else "no output on stderr"
            raise RuntimeError(f"`cdc-sync run` exited {status}: {last}\n{tail[-2000:]}")
        return status

    def _terminate(self) -> int:
        """SIGTERM, SIGKILL after a minute; close the log files."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        self._err.close()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._terminate()  # stop() already judged a normal exit; never mask an exception here
