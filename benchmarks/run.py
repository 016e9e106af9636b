"""cdc-sync's benchmark suite: `./dev bench [options]` (see benchmarks/README.md).

Starts a throwaway PostgreSQL server, runs the chosen measurements against it and against the
EngageLab emulator (each its own process, cdc-sync driven only through its command line), prints
a Markdown table with a PASS/FAIL column per target, and writes it to benchmarks/results/latest.md
and latest.json. Progress goes to stderr. Exit status: 0 when every measurement ran (whatever it
found), 1 when one broke (an ERROR row), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import psycopg
from burst import measure_burst
from databases import Databases
from harness import Bench, progress
from limits import measure_rate, measure_throttle
from processes import REPO
from report import ERROR, Measurement, Row, as_json, code_fingerprint, machine, markdown
from scale import measure_idle, measure_memory
from throughput import measure_throughput

from cdc_sync.testing.postgres import PostgresServer, scratch_dir

MEASUREMENTS: dict[str, tuple[str, Callable[[Bench], Measurement]]] = {
    "a/b": ("end-to-end rate vs the bare loop; CPU per row", measure_throughput),
    "c": ("peak RSS on 100k and 1M backlogs", measure_memory),
    "d": ("idle cycle on a 1M-row table; page query plan", measure_idle),
    "e": ("achieved rate against rate_limit", measure_rate),
    "f": ("behaviour against a throttling server", measure_throttle),
    "g": ("idle cycle after a burst", measure_burst),
}


def _letters(text: str) -> set[str]:
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set("abcdefg")
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown measurement {', '.join(sorted(unknown))}")
    return chosen


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="./dev bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument(
        "--only",
        type=_letters,
        default=set("abcdefg"),
        help="comma-separated measurements to run, e.g. a,d (a and b run together)",
    )
    p.add_argument("--rows", type=int, default=4000, help="(a) backlog N (default 4000)")
    p.add_argument(
        "--latency",
        type=float,
        default=0.02,
        help="server latency L in seconds for (a), (e), (f) (default 0.02)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="engagelab.concurrency C, and the bare loop's (default 32)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="(e) engagelab.rate_limit R per second (default 200)",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="source.batch_size (1000)")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="(a) runs of each side; medians are reported (default 3)",
    )
    p.add_argument(
        "--skip-1m",
        action="store_true",
        help="(c) skip the 1M-user sync ((d) still builds its 1M table cheaply)",
    )
    p.add_argument(
        "--sync-deadline",
        type=float,
        default=150.0,
        help="(c) SIGTERM each backlog sync after this many seconds; 0: no limit (default 150)",
    )
    p.add_argument("--idle-runs", type=int, default=20, help="(d) idle `once` runs (20)")
    p.add_argument("--burst-rows", type=int, default=200_000, help="(g) rows in the burst (200000)")
    p.add_argument("--rate-rows", type=int, default=0, help="(e) users to push (default 10·R)")
    p.add_argument("--throttle-rows", type=int, default=2000, help="(f) users (2000)")
    p.add_argument(
        "--throttle-rps", type=float, default=100.0, help="(f) the emulator's --throttle-rps (100)"
    )
    p.add_argument(
        "--retry-after", type=int, default=1, help="(f) the emulator's --retry-after seconds (1)"
    )
    p.add_argument(
        "--throttle-deadline",
        type=float,
        default=150.0,
        help="(f) give up waiting for every user to be synced after this (150 s)",
    )
    p.add_argument(
        "--state",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="tracking database: a PostgreSQL database on the benchmark's server "
        "(default), or a SQLite file",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="where latest.md and latest.json go",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the scratch directory (configs, logs, the PostgreSQL data)",
    )
    return p


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _settings(options: argparse.Namespace) -> list[str]:
    state = (
        "a PostgreSQL database on the same server as the source"
        if options.state == "postgres"
        else "a SQLite file (WAL) in the scratch directory"
    )
    return [
        f"**Tracking database:** {state} (--state {options.state}); source: a PostgreSQL "
        "database of the same throwaway server (fsync off, loopback)",
        f"**Settings:** N = {options.rows}, L = {options.latency * 1000:g} ms, "
        f"C = {options.concurrency}, batch_size {options.batch_size}, R = {options.rate:g}/s, "
        f"repeats {options.repeat}, --sync-deadline {options.sync_deadline:g} s"
        + (", --skip-1m" if options.skip_1m else ""),
    ]


def _postgres_version(server: PostgresServer) -> str:
    with psycopg.connect(server.dsn()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


def run(options: argparse.Namespace) -> int:
    started, clock = datetime.now(UTC), time.monotonic()
    info: dict[str, object] = {
        "started": started.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(REPO),
        "code_at_start": code_fingerprint(REPO),
        "settings": {
            k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(options).items()
        },
    }
    results: dict[str, Measurement] = {}
    failed = False
    scratch = scratch_dir("cdc-sync-bench-")
    server = PostgresServer(scratch)
    try:
        progress(f"starting PostgreSQL in {scratch}")
        server.init()
        server.start()
        info["postgres"] = _postgres_version(server)
        work = scratch / "work"
        work.mkdir()
        bench = Bench(options, Databases(server, work, options.state), work)
        for key, (title, measure) in MEASUREMENTS.items():
            if not set(key) & options.only:  # "a/b" runs for a or b
                continue
            progress(f"({key}) {title}")
            try:
                results[key] = measure(bench)
            except Exception as exc:  # one broken measurement must not hide the others
                traceback.print_exc()
                failed = True
                message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                results[key] = Measurement(rows=[Row(key, title, message, result=ERROR)])
    finally:
        server.stop()
        if options.keep:
            progress(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    duration = info["duration_s"] = time.monotonic() - clock
    info["code_at_end"] = code_fingerprint(REPO)
    info["load_average_at_end"] = os.getloadavg()
    text = markdown(info, _settings(options), results)
    options.results.mkdir(parents=True, exist_ok=True)
    (options.results / "latest.md").write_text(text)
    (options.results / "latest.json").write_text(as_json(info, results))
    print(text)
    progress(f"done in {duration / 60:.1f} min; wrote {options.results}/latest.md, .json")
    return 1 if failed else 0


def main() -> int:
    options = parser().parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(options)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
