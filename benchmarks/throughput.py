"""(a) end-to-end push rate against the bare loop, and (b) the daemon's CPU per pushed row."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from databases import recent_runs, run_count, status_counts
from harness import Bench, progress
from processes import (
    API_KEY,
    API_SECRET,
    REPO,
    Daemon,
    Emulator,
    ProcessRun,
    cpu_seconds,
    run_measured,
)
from report import INFO, Measurement, Row, median, verdict

RATIO_TARGET = 0.85
CPU_TARGET_MS = 0.5


def _bare(bench: Bench, emulator: Emulator, rows: int, concurrency: int) -> dict[str, float]:
    """One bare-loop run: rows/s from the script's own clock, CPU from wait4."""
    emulator.reset()
    argv = [sys.executable, str(REPO / "benchmarks" / "bare.py"), emulator.url, API_KEY]
    argv += [API_SECRET, "--rows", str(rows), "--concurrency", str(concurrency)]
    run = run_measured(argv, bench.path("bare"))
    result = json.loads(run.stdout)
    if result["statuses"] != {"200": rows}:
        raise RuntimeError(f"the bare loop got answers {result['statuses']}, not {rows} x 200")
    return {"seconds": result["seconds"], "rate": rows / result["seconds"], "cpu": run.cpu}


def _end_to_end(bench: Bench, emulator: Emulator, rows: int) -> dict[str, float]:
    """One `cdc-sync once` over a fresh backlog of ``rows`` users."""
    sync = bench.pushing(rows, emulator.url)
    emulator.reset()
    emulator_cpu = cpu_seconds(emulator.pid)
    run = bench.once(sync)
    emulator_cpu = cpu_seconds(emulator.pid) - emulator_cpu
    stats = emulator.stats()
    [cycle] = recent_runs(sync.state_url, 1)
    if cycle.pushed != rows or stats["accepted"] != rows:
        raise RuntimeError(
            f"`once` pushed {cycle.pushed} and the emulator accepted {stats['accepted']} "
            f"of {rows} users ({run.stdout.strip()})"
        )
    return {
        "wall": run.wall,
        "cycle": cycle.seconds,
        "cpu": run.cpu,
        "user": run.user,
        "system": run.system,
        "maxrss_kib": run.maxrss_kib,
        "emulator_cpu": emulator_cpu,
        "requests": stats["requests"],
    }


def _until(done: Callable[[], bool], daemon: Daemon, seconds: float, what: str) -> None:
    """Poll ``done`` (5 times a second) until it holds; RuntimeError if the daemon died or
    ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while not done():
        if not daemon.running():
            raise RuntimeError(f"`cdc-sync run` exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {seconds:g} s")
        time.sleep(0.2)


def _daemon_batches(bench: Bench, emulator: Emulator, rows: int, batches: int) -> list[float]:
    """CPU seconds one long-running `cdc-sync run` spends on each of ``batches`` backlogs.

    The daemon starts on an empty table and runs its first (idle) cycle; then, ``batches``
    times, ``rows`` users are inserted stamped now and the daemon's CPU (/proc/PID/stat) is
    read before the insert and once the status table holds them all as synced. Start-up is
    outside every batch; the idle cycles while it waits are inside.
    """
    sync = bench.pushing(0, emulator.url)
    emulator.reset()
    spent = []
    with Daemon(sync.config, bench.path("daemon-b")) as daemon:
        pid = daemon.process.pid
        _until(lambda: run_count(sync.state_url) >= 1, daemon, 60, "first cycle")
        for batch in range(batches):
            ids = range(batch * rows + 1, (batch + 1) * rows + 1)
            before = cpu_seconds(pid)
            bench.dbs.add_users(sync.source_url, rows, ids, now=True)
            total = ids.stop - 1
            _until(
                lambda: status_counts(sync.state_url).get("synced", 0) >= total,  # noqa: B023 - waited on here
                daemon,
                60 + rows / 100,
                f"sync of batch {batch + 1} ({rows} users)",
            )
            spent.append(cpu_seconds(pid) - before)
            progress(f"(b) daemon batch {batch + 1}/{batches}: {spent[-1]:.2f} s CPU")
        daemon.stop()
    accepted = emulator.stats()["accepted"]
    if accepted != rows * batches:
        raise RuntimeError(f"the emulator accepted {accepted} of {rows * batches} users")
    return spent


def _idle(bench: Bench, emulator: Emulator, times: int) -> list[ProcessRun]:
    """`once` over an empty users table: the process's fixed cost (start, connect, reflect)."""
    sync = bench.sync(0, emulator.url)
    return [bench.once(sync, "idle") for _ in range(times)]


def measure_throughput(bench: Bench) -> Measurement:
    """(a) and (b): N users from PostgreSQL to the emulator at latency L, C in flight."""
    o = bench.options
    n, latency, concurrency = o.rows, o.latency, o.concurrency
    out = Measurement()
    with Emulator(bench.path("emulator-a.log"), latency=latency) as emulator:
        progress("(a) idle `once` runs (startup cost)")
        idle = _idle(bench, emulator, o.repeat)
        bare, e2e = [], []
        for attempt in range(1, o.repeat + 1):
            progress(f"(a) run {attempt}/{o.repeat}: bare loop, {n} rows")
            bare.append(_bare(bench, emulator, n, concurrency))
            progress(f"(a) run {attempt}/{o.repeat}: `cdc-sync once`, {n} rows")
            e2e.append(_end_to_end(bench, emulator, n))
            progress(
                f"(a) run {attempt}: bare {bare[-1]['rate']:.0f} rows/s, "
                f"end-to-end {n / e2e[-1]['cycle']:.0f} rows/s (cycle {e2e[-1]['cycle']:.1f} s)"
            )
        progress(f"(b) `cdc-sync run`, {o.repeat} backlogs of {n} users")
        daemon = _daemon_batches(bench, emulator, n, o.repeat)

    startup_wall = median([r.wall for r in idle])
    startup_cpu = median([r.cpu for r in idle])
    cycle = median([r["cycle"] for r in e2e])
    wall = median([r["wall"] for r in e2e])
    cpu = median([r["cpu"] for r in e2e])
    bare_rate = median([r["rate"] for r in bare])
    bare_cpu = median([r["cpu"] for r in bare])
    e2e_rate = n / cycle
    ratio = e2e_rate / bare_rate
    ceiling = concurrency / latency if latency > 0 else None
    cpu_ms = cpu / n * 1000
    marginal_ms = (cpu - startup_cpu) / n * 1000
    daemon_ms = median(daemon) / n * 1000
    setting = f"N={n}, L={latency * 1000:g} ms, C={concurrency}"
    out.rows += [
        Row("a", f"end-to-end rows/s, engine cycle time ({setting})", f"{e2e_rate:.0f}", e2e_rate),
        Row(
            "a",
            "end-to-end rows/s, whole `once` wall time (startup included)",
            f"{n / wall:.0f} ({wall:.2f} s wall)",
            n / wall,
        ),
        Row(
            "a",
            "end-to-end rows/s, `once` wall minus idle `once` wall",
            f"{n / max(wall - startup_wall, 1e-9):.0f} (idle `once` {startup_wall:.2f} s)",
            n / max(wall - startup_wall, 1e-9),
        ),
        Row(
            "a",
            "ceiling C/L",
            f"{ceiling:.0f}" if ceiling else "unbounded (L = 0)",
            ceiling,
        ),
        Row(
            "a",
            "bare aiohttp loop rows/s (same emulator, same N and C)",
            f"{bare_rate:.0f}",
            bare_rate,
        ),
        Row(
            "a",
            "end-to-end / bare (cycle-time rate)",
            f"{ratio:.2f}",
            ratio,
            f"≥ {RATIO_TARGET}",
            verdict(ratio >= RATIO_TARGET),
        ),
        Row(
            "b",
            f"daemon CPU per pushed row, running `cdc-sync run`, {n} users (user+sys)",
            f"{daemon_ms:.2f} ms ({median(daemon):.2f} s for {n})",
            daemon_ms,
            f"≤ {CPU_TARGET_MS} ms",
            verdict(daemon_ms <= CPU_TARGET_MS),
        ),
        Row(
            "b",
            "CPU per pushed row, whole `once` process, start-up included",
            f"{cpu_ms:.2f} ms ({cpu:.2f} s for {n})",
            cpu_ms,
            result=INFO,
        ),
        Row(
            "b",
            "daemon CPU per pushed row, idle `once` CPU subtracted",
            f"{marginal_ms:.2f} ms (idle `once` {startup_cpu:.2f} s)",
            marginal_ms,
            result=INFO,
        ),
        Row(
            "b",
            "for comparison: bare loop CPU per row (whole process); emulator CPU per request",
            f"{bare_cpu / n * 1000:.2f} ms; "
            f"{median([r['emulator_cpu'] for r in e2e]) / n * 1000:.2f} ms",
            bare_cpu / n * 1000,
        ),
    ]
    out.notes += [
        f"Median of {o.repeat} runs, each alternating the bare loop and `cdc-sync once` on a "
        f"freshly loaded users table of {n} users and an empty tracking database, against one "
        f"`python -m cdc_sync.emulator` process (latency {latency} s); `once` has "
        f"engagelab.concurrency {concurrency}, rate_limit null, batch_size {o.batch_size}. "
        "The headline end-to-end rate is N / (finished_at - started_at) of the cycle's row in "
        "cdc_sync_runs: the cycle from its first page query to its last commit, without process "
        "startup, config load and table reflection. The emulator has no first/last request "
        "times, so the two wall-clock variants are given beside it. The bare loop "
        "(benchmarks/bare.py, aiohttp, its own process) times its first request to its last "
        "answer. The ratio uses the cycle-time rate.",
        "(b) is judged on the daemon: one `cdc-sync run` (interval 1s, same settings and "
        f"emulator) started on an empty table, then given {o.repeat} backlogs of {n} users "
        "inserted stamped now; its user + system CPU from /proc/PID/stat, read before each "
        "insert and once all of that backlog is synced (the idle cycles while it waits "
        "included), median over the backlogs. A daemon starts once; the `once` rows show "
        "what a process start adds: `once` CPU is the child's ru_utime + ru_stime from "
        "os.wait4, interpreter start, imports, config, connections and reflection included "
        "(the idle `once` row shows how much).",
    ]
    out.details = {
        "rows": n,
        "latency_s": latency,
        "concurrency": concurrency,
        "batch_size": o.batch_size,
        "idle_once": [{"wall": r.wall, "cpu": r.cpu, "maxrss_kib": r.maxrss_kib} for r in idle],
        "bare": bare,
        "end_to_end": e2e,
        "daemon_batch_cpu_s": daemon,
    }
    return out
