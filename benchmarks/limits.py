"""(e) the rate cdc-sync achieves against its configured limit, and (f) its behaviour against a
server that throttles (HTTP 429 with Retry-After)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from databases import recent_runs, status_counts
from harness import Bench, progress
from processes import Daemon, Emulator, Recorder
from report import INCOMPLETE, INFO, Measurement, Row, verdict

RATE_TOLERANCE = 0.05
THROTTLED_TARGET = 0.05
SETTLE_S = 10.0  # the 429 share is judged after this long


def busiest_window(arrivals: Sequence[float], width: float = 1.0) -> tuple[int, float]:
    """The most arrivals in any window [t, t + width), and the first arrival in that window."""
    ordered = sorted(arrivals)
    best, best_start, first = 0, ordered[0] if ordered else 0.0, 0
    for last, t in enumerate(ordered):
        while ordered[first] <= t - width:
            first += 1
        if last - first + 1 > best:
            best, best_start = last - first + 1, ordered[first]
    return best, best_start


def measure_rate(bench: Bench) -> Measurement:
    """(e) engagelab.rate_limit = R, 10·R users, arrivals timed by benchmarks/recorder.py."""
    o = bench.options
    rate, latency = o.rate, o.latency
    n = o.rate_rows or int(10 * rate)
    out = Measurement()
    with Recorder(bench.path("recorder.log"), latency) as recorder:
        sync = bench.pushing(n, recorder.url, rate_limit=rate)
        progress(f"(e) `cdc-sync once`, {n} users, rate_limit {rate}/s")
        run = bench.once(sync)
        arrivals = recorder.arrivals()
        stall = recorder.longest_stall()
    [cycle] = recent_runs(sync.state_url, 1)
    if len(arrivals) != n or cycle.pushed != n:
        raise RuntimeError(
            f"{len(arrivals)} requests arrived and {cycle.pushed} users were pushed, not {n}"
        )
    span = arrivals[-1] - arrivals[0]
    achieved = (n - 1) / span if span > 0 else float("inf")
    busiest, busiest_at = busiest_window(arrivals)
    achieved_ratio, busiest_ratio = achieved / rate, busiest / rate
    out.rows += [
        Row(
            "e",
            f"achieved rate / R (R = {rate:g}/s, N = {n}, L = {latency * 1000:g} ms, "
            f"C = {o.concurrency})",
            f"{achieved_ratio:.3f} ({achieved:.1f}/s)",
            achieved_ratio,
            f"{1 - RATE_TOLERANCE:.2f} to {1 + RATE_TOLERANCE:.2f}",
            verdict(abs(achieved_ratio - 1) <= RATE_TOLERANCE),
        ),
        Row(
            "e",
            "busiest 1-second window / R",
            f"{busiest_ratio:.3f} ({busiest} requests in the window from "
            f"{busiest_at - arrivals[0]:.2f} s after the first arrival; recorder's longest "
            f"loop stall {stall * 1000:.0f} ms)",
            busiest_ratio,
            f"≤ {1 + RATE_TOLERANCE:.2f}",
            verdict(busiest_ratio <= 1 + RATE_TOLERANCE),
        ),
        Row(
            "e",
            "N / engine cycle time (reading and recording included)",
            f"{n / cycle.seconds:.1f}/s ({cycle.seconds:.2f} s)",
            n / cycle.seconds,
        ),
    ]
    out.notes.append(
        "The emulator keeps no arrival times, so cdc-sync pushes to benchmarks/recorder.py "
        f"(aiohttp, its own process), which notes time.monotonic() as each request arrives and "
        f"answers code 0 after {latency} s. Achieved rate = (N - 1) / (last arrival - first "
        "arrival): N requests span N - 1 intervals. Busiest window = most arrivals in any "
        "[t, t + 1 s) starting at an arrival. The recorder also notes its own longest event-loop "
        "stall: arrivals during a stall are timed late and bunch up, so a stall of s seconds can "
        "add up to R * s requests to a window without cdc-sync sending them closer together."
    )
    out.details = {
        "rows": n,
        "rate_limit": rate,
        "span_s": span,
        "achieved_per_s": achieved,
        "busiest_window": busiest,
        "busiest_window_starts_s_after_first": busiest_at - arrivals[0],
        "arrivals_s_after_first": [round(t - arrivals[0], 6) for t in arrivals],
        "recorder_longest_stall_s": stall,
        "cycle_s": cycle.seconds,
        "once_wall_s": run.wall,
    }
    return out


def measure_throttle(bench: Bench) -> Measurement:
    """(f) `cdc-sync run` against an emulator answering 429 above a fixed rate."""
    o = bench.options
    n, throttle, deadline = o.throttle_rows, o.throttle_rps, o.throttle_deadline
    out = Measurement()
    samples: list[dict[str, float]] = []
    with Emulator(
        bench.path("emulator-f.log"),
        latency=o.latency,
        throttle_rps=throttle,
        retry_after=o.retry_after,
    ) as emulator:
        sync = bench.pushing(n, emulator.url, schedule={"interval": "1s"})
        progress(
            f"(f) `cdc-sync run` until {n} users are synced or {deadline:g} s pass "
            f"(throttle {throttle:g}/s, Retry-After {o.retry_after})"
        )
        started = time.monotonic()
        done_at = None
        with Daemon(sync.config, bench.path("run")) as daemon:
            while time.monotonic() - started < deadline and daemon.running():
                stats = emulator.stats()
                synced = status_counts(sync.state_url).get("synced", 0)
                samples.append(
                    {
                        "t": time.monotonic() - started,
                        "requests": stats["requests"],
                        "throttled": stats["faults"]["throttled"],
                        "synced": synced,
                    }
                )
                if synced >= n:
                    done_at = samples[-1]["t"]
                    break
                time.sleep(0.5)
            daemon.stop()
        final = emulator.stats()
        held = len(emulator.get("/_emulator/contacts"))
    counts = status_counts(sync.state_url)
    synced = counts.get("synced", 0)

    requests, throttled = final["requests"], final["faults"]["throttled"]
    first = next((s for s in samples if s["requests"] > 0), None)
    settled = (
        None
        if first is None
        else next((s for s in samples if s["t"] >= first["t"] + SETTLE_S), None)
    )
    late_requests = requests - settled["requests"] if settled else 0
    late_throttled = throttled - settled["throttled"] if settled else 0
    late_share = late_throttled / late_requests if late_requests else 0.0
    lost = n - synced
    out.rows += [
        Row(
            "f",
            f"429 share of all requests (throttle {throttle:g}/s, N = {n}, C = {o.concurrency})",
            f"{throttled / max(requests, 1):.1%} ({throttled} of {requests})",
            throttled / max(requests, 1),
        ),
        Row(
            "f",
            f"429 share after the first {SETTLE_S:g} s",
            f"{late_share:.1%} ({late_throttled} of {late_requests})"
            + ("" if settled else "; nothing was sent after 10 s"),
            late_share,
            f"< {THROTTLED_TARGET:.0%}",
            verdict(late_share < THROTTLED_TARGET),
        ),
        Row(
            "f",
            "time to sync everyone (from `cdc-sync run` start)",
            f"{done_at:.1f} s" if done_at is not None else f"not done in {deadline:g} s",
            done_at,
            result=INFO if done_at is not None else INCOMPLETE,
        ),
        Row(
            "f",
            "users lost (not synced at the end / not held by the emulator)",
            f"{lost} / {n - held}",
            float(max(lost, n - held)),
            "0",
            verdict(lost == 0 and held == n),
        ),
    ]
    minimum = n / throttle
    out.notes.append(
        f"`python -m cdc_sync.emulator --throttle-rps {throttle:g} --retry-after "
        f"{o.retry_after} --latency {o.latency}` (429s are answered at once, without the "
        f"latency); `cdc-sync run` with schedule.interval 1s, concurrency {o.concurrency}, "
        "rate_limit null and the shipped retry policy (base 30s, max 1h, 20 attempts). Twice a "
        "second the benchmark reads /_emulator/stats and counts synced users in "
        "cdc_sync_status; the 429 share after 10 s differences the stats from the first sample "
        f"at least 10 s after the first request was seen. No client can finish faster than "
        f"N / throttle = {minimum:.0f} s. 'Lost' counts users not marked synced when the "
        "daemon is stopped, and users whose contacts the emulator does not hold."
    )
    out.details = {
        "rows": n,
        "status_counts": counts,
        "requests": requests,
        "throttled": throttled,
        "emulator_holds": held,
        "done_at_s": done_at,
        "samples": samples,
    }
    return out
