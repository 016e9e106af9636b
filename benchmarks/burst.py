"""(g) an idle cycle after a burst: what a running daemon pays once a burst has gone quiet.

The re-read window reaches back ``lookback`` from what the previous cycle's read could see, not
from the watermark, so once the source's clock has moved past a burst by the lookback, an idle
cycle reads nothing of it, as on a table that never had one.
"""

from __future__ import annotations

import time

import psycopg
from databases import RunRow, recent_runs, run_count, status_counts
from harness import Bench, Sync, progress
from processes import Daemon, Emulator
from psycopg import sql
from report import ERROR, Measurement, Row, median, verdict

LOOKBACK_S = 10  # the lookback of this measurement's sync: the burst ages out of it quickly
QUIET_ROWS = 1000
TOLERANCE = 1.5  # an idle cycle after the burst may cost this much of a quiet one, at most


def _cycles(sync: Sync, daemon: Daemon, count: int, what: str) -> list[RunRow]:
    """The next ``count`` cycles the daemon finishes."""
    before = run_count(sync.state_url)
    deadline = time.monotonic() + 4 * count + 120
    while run_count(sync.state_url) < before + count:
        if time.monotonic() > deadline or not daemon.running():
            raise RuntimeError(f"`cdc-sync run` did not finish {count} cycles {what}")
        time.sleep(0.5)
    return recent_runs(sync.state_url, count)


def _burst(bench: Bench, sync: Sync, rows: int) -> None:
    """``rows`` users written now, as a backfill of legacy rows would: stamped with the server's
    clock, without an EUID, so each is read and recorded (skipped) rather than pushed."""
    insert = sql.SQL(
        "INSERT INTO users (id, name, email, updated_at) SELECT i, 'legacy ' || i, "
        "'legacy' || i || '@example.com', now() FROM generate_series({first}, {last}) AS i"
    ).format(first=sql.Literal(QUIET_ROWS + 1), last=sql.Literal(QUIET_ROWS + rows))
    with psycopg.connect(bench.dbs.source_dsn(sync.source_url), autocommit=True) as conn:
        conn.execute(insert)
        conn.execute("VACUUM ANALYZE users")


def _settle(bench: Bench, sync: Sync) -> None:
    """Vacuum and analyse the tracking tables the burst grew, as the source's were after it.

    Recording the burst writes a status and a history row for each of its users; autovacuum
    then works through them for a while, and the idle cycles measured during that time pay for
    its I/O rather than for what they do themselves (seen: 38 ms cycles among 3 ms ones).
    The quiet table's cycles are measured after the same vacuum, so both are in steady state.
    (Only a PostgreSQL tracking database is vacuumed; SQLite has no autovacuum to wait for.)
    """
    if not sync.state_url.startswith("postgresql"):
        return
    with psycopg.connect(bench.dbs.source_dsn(sync.state_url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def measure_burst(bench: Bench) -> Measurement:
    """(g) idle cycles of one `cdc-sync run` on a quiet table, then after a burst has aged."""
    o = bench.options
    rows, count = o.burst_rows, o.idle_runs
    out = Measurement()
    with Emulator(bench.path("emulator-g.log"), latency=0) as emulator:
        sync = bench.sync(
            QUIET_ROWS,
            emulator.url,
            source={"batch_size": o.batch_size, "lookback": f"{LOOKBACK_S}s"},
        )
        bench.once(sync, "seed-g")
        _settle(bench, sync)
        progress(f"(g) `cdc-sync run`: {count} quiet cycles, a burst of {rows:,} rows, ...")
        with Daemon(sync.config, bench.path("daemon-g")) as daemon:
            quiet = _cycles(sync, daemon, count + 1, "on the quiet table")[1:]
            _burst(bench, sync, rows)
            deadline = time.monotonic() + 600
            while sum(status_counts(sync.state_url).values()) < QUIET_ROWS + rows:
                if time.monotonic() > deadline or not daemon.running():
                    raise RuntimeError("the burst was not recorded within 10 minutes")
                time.sleep(0.5)
            _settle(bench, sync)
            progress(f"(g) burst recorded; {count} cycles once it is {LOOKBACK_S} s old")
            time.sleep(LOOKBACK_S + 2)  # the source's clock moves past the burst's lookback
            _cycles(sync, daemon, 1, "after the burst aged")  # a cycle that saw past it
            after = _cycles(sync, daemon, count, "after the burst")
            daemon.stop()
    if any(c.pushed for c in quiet + after):
        return Measurement(
            rows=[Row("g", "idle cycle after a burst", "cycles pushed", None, result=ERROR)]
        )
    quiet_ms = median([c.seconds * 1000 for c in quiet])
    after_ms = median([c.seconds * 1000 for c in after])
    read = sorted({c.rows_read for c in after})
    out.rows += [
        Row(
            "g",
            f"idle cycle in `cdc-sync run`, quiet {QUIET_ROWS}-row table, median of {count}",
            f"{quiet_ms:.1f} ms",
            quiet_ms,
        ),
        Row(
            "g",
            f"idle cycle after a burst of {rows:,} rows ({LOOKBACK_S} s lookback passed), "
            f"median of {count}",
            f"{after_ms:.1f} ms, rows read {read}",
            after_ms,
            f"≤ {TOLERANCE:g} x quiet",
            verdict(after_ms <= TOLERANCE * quiet_ms),
        ),
    ]
    out.notes.append(
        f"One daemon (interval 1s, lookback {LOOKBACK_S}s): {count} idle cycles on a quiet "
        f"table, then {rows:,} rows inserted stamped now (no EUID: each is read and recorded as "
        "skipped once, no push), then, once the source's clock is past the burst by the "
        f"lookback, {count} more idle cycles. Before the re-read window was anchored to time, "
        "every one of those re-read the whole burst."
    )
    out.details = {
        "quiet_ms": [c.seconds * 1000 for c in quiet],
        "after_ms": [c.seconds * 1000 for c in after],
        "after_rows_read": [c.rows_read for c in after],
    }
    return out
