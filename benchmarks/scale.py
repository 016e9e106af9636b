"""(c) the daemon's peak memory on large backlogs, and (d) an idle cycle on a 1M-row table."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from databases import (
    INDEX_NAME,
    ROW_SPACING_S,
    RunRow,
    recent_runs,
    run_count,
    watermark,
)
from harness import Bench, Sync, progress
from processes import Daemon, Emulator
from psycopg import sql
from report import ERROR, INCOMPLETE, INFO, Measurement, Row, median, percentile, verdict

RSS_TARGET_MB = 200.0
RSS_GROWTH_TARGET = 1.20
IDLE_TARGET_MS = 5.0
SEED_ROWS = 1000  # rows synced through `once` when (d) builds its own table
# The first page of an idle cycle as cdc-sync sends it (cdc_sync.source.first_page): the page
# joined to the source's clock, replay lag and horizon, so that an idle poll is one statement.
# Once the previous read saw past the watermark by the lookback, the page resumes strictly after
# the watermark (cdc_sync.rules.reread_from); infinite cursors are left to the sweep by key.
PAGE_QUERY = (
    "SELECT horizon.ceiling, horizon.replica_lag, horizon.seen, page.* FROM (SELECT now() AS "
    "ceiling, CASE WHEN NOT pg_is_in_recovery() THEN NULL WHEN pg_last_wal_receive_lsn() = "
    "pg_last_wal_replay_lsn() THEN 0.0 ELSE extract(epoch FROM now() - "
    "pg_last_xact_replay_timestamp())::float8 END AS replica_lag, CASE WHEN NOT "
    "pg_is_in_recovery() THEN now() ELSE greatest(pg_last_xact_replay_timestamp(), (SELECT "
    "last_msg_send_time FROM pg_stat_wal_receiver WHERE latest_end_lsn <= "
    "pg_last_wal_replay_lsn())) END AS seen) AS horizon "
    "LEFT JOIN LATERAL (SELECT id, updated_at, engagelab_euid, email, mobile, landline, "
    "whatsapp, true AS found FROM users WHERE updated_at < 'infinity'::timestamptz AND "
    "(updated_at, id) > ({cursor}, {key}) ORDER BY updated_at, id LIMIT {limit}) AS page ON true "
    "ORDER BY page.updated_at, page.id"
)


def _mb(kib: float) -> float:
    return kib * 1024 / 1e6


def _sync_backlog(bench: Bench, emulator: Emulator, rows: int) -> dict[str, Any]:
    """Push a backlog of ``rows`` users with `once`; stop it at the deadline if one is set."""
    o = bench.options
    progress(f"(c) loading {rows:,} users")
    sync = bench.pushing(rows, emulator.url)
    emulator.reset()
    deadline = o.sync_deadline or None
    progress(
        f"(c) `cdc-sync once` over {rows:,} users"
        + (f" (stopped after {deadline:g} s if not done)" if deadline else "")
    )
    run = bench.once(
        sync,
        stop_after=deadline,
        sample=lambda: {"requests": float(emulator.stats()["requests"])},
    )
    [cycle] = recent_runs(sync.state_url, 1)
    complete = cycle.outcome == "ok" and cycle.pushed == rows
    if complete:
        bench.synced[rows] = sync
    progress(
        f"(c) {rows:,}: pushed {cycle.pushed:,} in {run.wall:.0f} s, "
        f"peak RSS {_mb(run.maxrss_kib):.0f} MB{'' if complete else ' (INCOMPLETE)'}"
    )
    return {
        "rows": rows,
        "complete": complete,
        "pushed": cycle.pushed,
        "outcome": cycle.outcome,
        "wall_s": run.wall,
        "cycle_s": cycle.seconds,
        "cpu_s": run.cpu,
        "maxrss_kib": run.maxrss_kib,
        "rss_samples": list(run.samples),
    }


def _trend(samples: list[dict[str, float]], batch_size: int) -> str:
    """How RSS moved from the end of the first page to the last sample, as text (or "")."""
    started = [s for s in samples if s.get("requests", 0) >= batch_size]
    if len(started) < 2:
        return ""
    first, last = started[0], started[-1]
    return (
        f"; RSS {_mb(first['rss_kib']):.0f} MB at {first['requests']:,.0f} requests, "
        f"{_mb(last['rss_kib']):.0f} MB at {last['requests']:,.0f}"
    )


def measure_memory(bench: Bench) -> Measurement:
    """(c) peak RSS of `once` (wait4's ru_maxrss) on backlogs of 100k and 1M users, L = 0."""
    o = bench.options
    sizes = [100_000] if o.skip_1m else [100_000, 1_000_000]
    out = Measurement()
    with Emulator(bench.path("emulator-c.log"), latency=0) as emulator:
        runs = {rows: _sync_backlog(bench, emulator, rows) for rows in sizes}
        baseline = bench.once(bench.sync(0, emulator.url), "idle-c")
    for rows, run in runs.items():
        mb = _mb(run["maxrss_kib"])
        shown = f"{mb:.0f} MB"
        if run["complete"]:
            shown += f" (pushed in {run['wall_s']:.0f} s, {rows / run['cycle_s']:.0f} rows/s)"
        else:
            shown += f" after {run['pushed']:,} of {rows:,} rows ({run['outcome']} at deadline"
            shown += f"{_trend(run['rss_samples'], o.batch_size)})"
        if rows == 1_000_000:
            target, result = f"≤ {RSS_TARGET_MB:g} MB", verdict(mb <= RSS_TARGET_MB)
        else:
            target, result = "", INFO
        if not run["complete"]:
            result = INCOMPLETE
        out.rows.append(
            Row("c", f"peak RSS of `once`, backlog of {rows:,} (L = 0)", shown, mb, target, result)
        )
    out.rows.append(
        Row(
            "c",
            "for comparison: peak RSS of `once` on an empty table",
            f"{_mb(baseline.maxrss_kib):.0f} MB",
            _mb(baseline.maxrss_kib),
        )
    )
    if len(runs) == 2:
        small, large = runs[100_000], runs[1_000_000]
        growth = large["maxrss_kib"] / small["maxrss_kib"]
        complete = small["complete"] and large["complete"]
        out.rows.append(
            Row(
                "c",
                "peak RSS 1M / 100k",
                f"{growth:.2f}",
                growth,
                f"≤ {RSS_GROWTH_TARGET:.2f}",
                verdict(growth <= RSS_GROWTH_TARGET) if complete else INCOMPLETE,
            )
        )
    else:
        out.rows.append(
            Row(
                "c",
                "peak RSS 1M / 100k",
                "skipped (--skip-1m)",
                None,
                f"≤ {RSS_GROWTH_TARGET:.2f}",
                "skipped",
            )
        )
    for rows, run in runs.items():
        if run["complete"]:
            cpu_ms = run["cpu_s"] / rows * 1000
            out.rows.append(
                Row(
                    "b",
                    f"daemon CPU per pushed row at L = 0, backlog {rows:,}",
                    f"{cpu_ms:.2f} ms",
                    cpu_ms,
                )
            )
    out.notes.append(
        "Peak RSS is ru_maxrss from os.wait4 on the `once` child (KiB; shown in MB = 10^6 "
        "bytes), over a fresh table and tracking database, emulator latency 0, "
        f"concurrency {o.concurrency}, batch_size {o.batch_size}. "
        + (
            f"Each sync is sent SIGTERM after {o.sync_deadline:g} s (--sync-deadline; 0 = no "
            "limit): a stopped run's peak RSS is shown but proves nothing against the target, so "
            "it is INCOMPLETE. The RSS over time is in latest.json (details.c)."
            if o.sync_deadline
            else "No deadline (--sync-deadline 0)."
        )
    )
    out.details = {str(rows): run for rows, run in runs.items()}
    out.details["empty_table_maxrss_kib"] = baseline.maxrss_kib
    return out


# -- (d) ---------------------------------------------------------------------------------------


def _seeded_table(bench: Bench, emulator: Emulator, rows: int) -> Sync:
    """A ``rows``-user table in the state a synced one has, without pushing ``rows`` users.

    The newest SEED_ROWS users are loaded and synced with `once`; then the older users are
    inserted server-side, all dated before the watermark minus the lookback, where an idle cycle
    never reads. The source and the watermark are as after a full sync; the tracking table holds
    SEED_ROWS rows instead of ``rows``.
    """
    progress(f"(d) building a {rows:,}-row table synced up to its newest {SEED_ROWS} users")
    newest = range(rows - SEED_ROWS + 1, rows + 1)
    source_url = bench.dbs.users(rows, newest)
    sync = bench.sync_on(
        source_url, rows, emulator.url, source={"batch_size": bench.options.batch_size}
    )
    bench.once(sync, "seed")
    bench.dbs.add_users(source_url, rows, range(1, rows - SEED_ROWS + 1))
    return sync


def _daemon_cycles(bench: Bench, sync: Sync, count: int) -> list[RunRow]:
    """The idle cycles of one long-lived `cdc-sync run`, after its first (cold) one."""
    before = run_count(sync.state_url)
    deadline = time.monotonic() + 2 * count + 60
    with Daemon(sync.config, bench.path("daemon-d")) as daemon:
        while run_count(sync.state_url) < before + count + 1:
            if time.monotonic() > deadline or not daemon.running():
                break
            time.sleep(0.5)
        daemon.stop()
    done = run_count(sync.state_url) - before
    return recent_runs(sync.state_url, done)[1:]


def _explain(bench: Bench, sync: Sync) -> tuple[str, dict[str, Any], str]:
    """EXPLAIN (ANALYZE, BUFFERS) of an idle cycle's first page query: text, JSON, the query."""
    mark = watermark(sync.state_url)
    dsn = bench.dbs.source_dsn(sync.source_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if mark is None:  # the watermark format changed: fall back to the newest row
            [mark] = conn.execute(
                "SELECT updated_at, id FROM users ORDER BY updated_at DESC, id DESC LIMIT 1"
            ).fetchall()
        cursor, key = mark
        query = _page_query(cursor, key, bench.options.batch_size)
        text = "\n".join(
            row[0]
            for row in conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query).fetchall()
        )
        [(plan,)] = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + query
        ).fetchall()
        shown = query.as_string(conn)
    return text, plan[0], shown


def _page_query(cursor: Any, key: Any, limit: int) -> sql.Composed:
    return sql.SQL(PAGE_QUERY).format(
        cursor=sql.Literal(cursor), key=sql.Literal(key), limit=sql.Literal(limit)
    )


def _scan_of(plan: dict[str, Any]) -> dict[str, Any]:
    """The node that reads the users table (the first, depth first, whose relation it is)."""
    nodes = [plan["Plan"]]
    while nodes:
        node = nodes.pop(0)
        if node.get("Relation Name") == "users":
            return dict(node)
        nodes[:0] = node.get("Plans", [])
    return {}


def _warm_rows(cycles: list[RunRow]) -> list[Row]:
    """Rows for the cycles of a long-lived daemon (its SQL statements compiled, pools warm)."""
    if not cycles or any(c.pushed for c in cycles):
        return [
            Row(
                "d",
                "idle cycle in `cdc-sync run`",
                f"no usable cycles ({len(cycles)})",
                None,
                f"≤ {IDLE_TARGET_MS:g} ms",
                ERROR,
            )
        ]
    ms = [c.seconds * 1000 for c in cycles]
    med = median(ms)
    return [
        Row(
            "d",
            f"idle cycle in a long-lived `cdc-sync run`, median of {len(ms)}",
            f"{med:.1f} ms (p95 {percentile(ms, 0.95):.1f} ms)",
            med,
            f"≤ {IDLE_TARGET_MS:g} ms",
            verdict(med <= IDLE_TARGET_MS),
        ),
    ]


def measure_idle(bench: Bench) -> Measurement:
    """(d) K `once` runs on a synced 1M-row table with no changes; the page query's plan."""
    o = bench.options
    rows = 1_000_000
    out = Measurement()
    with Emulator(bench.path("emulator-d.log"), latency=0) as emulator:
        sync = bench.synced.get(rows)
        origin = "the 1M table (c) synced"
        if sync is None:
            sync = _seeded_table(bench, emulator, rows)
            origin = (
                f"a 1M table synced up to its newest {SEED_ROWS} users through `once`, the "
                f"other {rows - SEED_ROWS:,} inserted behind the watermark (so cdc_sync_status "
                f"holds {SEED_ROWS} rows, not 1M)"
            )
        progress(f"(d) {o.idle_runs} idle `once` runs on {rows:,} rows")
        runs = [bench.once(sync, "idle-1m") for _ in range(o.idle_runs)]
        cycles = recent_runs(sync.state_url, o.idle_runs)
        progress(f"(d) `cdc-sync run` (interval 1s) for {o.idle_runs + 1} idle cycles")
        warm = _daemon_cycles(bench, sync, o.idle_runs)
    if len(cycles) != o.idle_runs or any(c.pushed for c in cycles):
        raise RuntimeError(
            f"the idle cycles pushed users or went unrecorded ({[c.pushed for c in cycles]}); "
            "on the seeded table, an audit sweep enabled by default would push the users behind "
            "the watermark: sync the 1M table for real (--only c,d --sync-deadline 0)"
        )
    seconds = [c.seconds for c in cycles]
    med, p95 = median(seconds) * 1000, percentile(seconds, 0.95) * 1000
    text, plan, query = _explain(bench, sync)
    scan = _scan_of(plan)
    kind, index = scan.get("Node Type", "?"), scan.get("Index Name")
    range_scan = (
        kind in ("Index Scan", "Index Only Scan") and index == INDEX_NAME and "Index Cond" in scan
    )
    shown_plan = f"{kind}" + (f" using {index}" if index else "")
    shown_plan += f"; {plan['Execution Time']:.2f} ms"
    out.rows += [
        *_warm_rows(warm),
        Row(
            "d",
            f"first cycle of a fresh `once` on {rows:,} rows, idle, median of {o.idle_runs}",
            f"{med:.1f} ms (p95 {p95:.1f} ms)",
            med,
        ),
        Row(
            "d",
            "idle `once` process wall, median (startup included)",
            f"{median([r.wall for r in runs]):.2f} s",
            median([r.wall for r in runs]),
        ),
        Row(
            "d",
            "page query plan (EXPLAIN ANALYZE)",
            shown_plan,
            plan["Execution Time"],
            f"index range scan on {INDEX_NAME}",
            verdict(range_scan),
        ),
    ]
    out.notes.append(
        f"On {origin}; updated_at runs {ROW_SPACING_S} s apart and ends an hour ago, so an idle "
        "cycle re-reads none of it: the window reaches back the 5-minute lookback from what the "
        "previous read saw, which is past the watermark "
        f"(rows read per cycle: {sorted({c.rows_read for c in cycles})}). Cycle time is "
        "finished_at - started_at from cdc_sync_runs, as the engine records it: the run's "
        "start, the page query (which brings the source's clock), the last hashes (from memory "
        "in a running daemon) and the due-retry check, without process startup. The target "
        "is judged on the daemon, whose idle poll this is: one `cdc-sync run` (interval 1s) "
        "left to run K + 1 cycles, the first dropped. Each `once` cycle is the first of its "
        "process, which also compiles its SQL statements (SQLAlchemy caches them per process) "
        "and fills connection pools: a cost a daemon pays once. The plan is of the first page "
        "query of an idle cycle, resuming after the watermark (inlined as literals)."
    )
    out.blocks["(d) page query plan"] = query + "\n\n" + text
    out.details = {
        "origin": origin,
        "cycle_ms": [s * 1000 for s in seconds],
        "daemon_cycle_ms": [c.seconds * 1000 for c in warm],
        "rows_read": [c.rows_read for c in cycles],
        "once_wall_s": [r.wall for r in runs],
        "once_cpu_s": [r.cpu for r in runs],
        "plan": plan,
    }
    return out
