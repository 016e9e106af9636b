"""The ``cdc-sync`` command: wiring, exit statuses, and the only place real collaborators are built.

The exit statuses are listed once, in :data:`EXIT_STATUSES`, which ``--help`` prints.
"""

from __future__ import annotations

import argparse
import enum
import functools
import gc
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import create_engine, event, make_url

from cdc_sync import __version__, logs
from cdc_sync.config import Settings, load_settings
from cdc_sync.configfile import resolve_config_path
from cdc_sync.durations import format_duration
from cdc_sync.engagelab import (
    ApiResult,
    Call,
    CodePolicy,
    Credentials,
    EngageLabClient,
    Registration,
    Verdict,
    judge_probe,
)
from cdc_sync.engine import (
    Engine,
    EngineSettings,
    Observer,
    Observers,
    Pusher,
    Stop,
    default_observer,
    utcnow,
)
from cdc_sync.errors import (
    EX_CONFIG,
    EX_FATAL_API,
    EX_UNAVAILABLE,
    EX_USERS_FAILED,
    EX_USERS_RETRYING,
    CdcSyncError,
    ConfigError,
    SetupError,
)
from cdc_sync.identity import R, Registrar, Resolver
from cdc_sync.lock import EX_TEMPFAIL, InstanceLock
from cdc_sync.mapping import Payload, Policy
from cdc_sync.normalise import Normalisation
from cdc_sync.notify import Notifier
from cdc_sync.outcomes import CycleCounts, RunOutcome, describe
from cdc_sync.proxies import Proxies
from cdc_sync.report import (
    cycle_line,
    render_check,
    render_preview,
    render_status,
    render_user,
    status_data,
    status_json,
)
from cdc_sync.rules import Retry
from cdc_sync.source import READ_ATTEMPTS, Source, SourceSpec
from cdc_sync.state import HISTORY_PER_USER, StateStore


class Needs(enum.IntEnum):
    """What a command needs built from the config, each level including the ones before it."""

    STATE = 1  # the tracking database only
    SOURCE = 2  # and the source
    API = 3  # and the EngageLab client


log = structlog.get_logger("cdc_sync.cli")

if TYPE_CHECKING:
    from cdc_sync.metrics import Metrics


@dataclass
class App:
    """Everything one sync needs, built from its settings: what its command declared it needs."""

    settings: Settings
    state: StateStore
    needs: Needs
    _source: Source | None = None
    client: EngageLabClient | None = None
    metrics: Metrics | None = None

    @property
    def source(self) -> Source:
        assert self._source is not None, "a command using the source declares Needs.SOURCE"
        return self._source

    def lookback(self) -> timedelta | int:
        """``source.lookback`` fitted to the cursor column's reflected type (exit 78 if it does
        not fit), so a wrong kind stops ``check`` and start-up before anything is pushed."""
        src = self.settings.source
        try:
            return self.source.fit_lookback(src.lookback, given="lookback" in src.model_fields_set)
        except ValueError as exc:
            raise ConfigError(str(self.settings.config_path), "source.lookback", str(exc)) from None

    def engine(self, *also: Observer, dry_run: bool = False, metrics: bool = False) -> Engine:
        """The engine, reporting to the run history, the log and ``also``; with ``dry_run``,
        one without an API client, for previews; with ``metrics``, also to the Prometheus
        metrics when ``metrics.listen`` is set (:attr:`metrics`)."""
        assert self.needs is Needs.API, "a command running cycles declares Needs.API"
        s = self.settings
        if metrics and s.metrics.listen is not None and self.metrics is None:
            from cdc_sync.metrics import Metrics  # prometheus_client is only needed here

            self.metrics = Metrics(s.name, self.state, s.schedule.interval.total_seconds())
        if self.metrics is not None:
            also = (*also, self.metrics)
        if self.client is None and not dry_run:
            answered = None if self.metrics is None else self.metrics.answered
            self.client = build_client(s, on_answer=answered)
        knobs = self.engine_settings()
        pusher: Pusher = _NoPushes() if dry_run else self.client  # type: ignore[assignment]
        identity = s.source.identity
        resolver = None
        if identity is not None:  # a dry run maps identity rows, and never resolves them
            registrar: Registrar = _NoPushes() if dry_run else self.client  # type: ignore[assignment]
            resolver = Resolver(identity.name, self.state, registrar, utcnow)
        observer = Observers(default_observer(self.state), *also) if also else None
        return Engine(knobs, self.source, self.state, pusher, resolver=resolver, observer=observer)

    def engine_settings(self) -> EngineSettings:
        s = self.settings
        return EngineSettings(
            name=s.name,
            batch_size=s.source.batch_size,
            lookback=self.lookback(),
            retry=Retry(s.retry.base, s.retry.max, s.retry.max_attempts),
            mapping=mapping_policy(s),
            audit_rows=s.audit.rows_per_cycle if s.audit.enabled else 0,
            keep_runs=s.state.keep_runs,
        )


class _NoPushes:
    """The pusher of a dry run: previews never push, and this makes sure."""

    def submit(self, payloads: Sequence[Payload]) -> Future[list[ApiResult | None]]:
        raise AssertionError("a dry run must not push")

    def resume(self) -> None:
        raise AssertionError("a dry run must not run a cycle")

    def registration(self, name: str, values: Sequence[str]) -> Call[Registration]:
        raise AssertionError("a dry run must not register")

    def submit_calls(self, calls: Sequence[Call[R]]) -> Future[list[R | None]]:
        raise AssertionError("a dry run must not register")


# No pre-ping: it costs a round trip per checkout, an idle poll's largest cost. A connection
# that died is found by the statement that uses it: source reads retry on a fresh one, and a
# state failure ends the cycle, the pool drops the dead connection, and the next cycle runs.
# Recycling keeps connections younger than most firewalls' idle timeouts.
POOL: dict[str, Any] = {"pool_size": 2, "max_overflow": 2, "pool_recycle": 1800}

CONNECT_TIMEOUT = 10
"""Seconds to connect to a PostgreSQL server (unless its URL says ``connect_timeout=``): without
one, libpq waits for the kernel to give up on an unreachable host, two minutes or more."""

STOP_MARGIN = 2 * CONNECT_TIMEOUT
"""What a stop may take beyond the request timeout and the statement timeout (see
:func:`stop_within`): connecting to the replica, and recording the pages in hand and the run."""


def stop_within(settings: Settings) -> float:
    """The most seconds from SIGTERM to the end of ``once`` or ``run``, as the README states.

    Once stopped, a cycle starts no request and no page read (Engine.run_cycle); what it may
    still wait for is the requests in flight (each at most ``engagelab.timeout``), one source
    statement under way (``source.statement_timeout``, after a connection), and the tracking
    database taking the pages in hand and the run. Keep it within systemd's TimeoutStopSec.
    """
    timeouts = settings.engagelab.timeout + settings.source.statement_timeout
    return timeouts.total_seconds() + STOP_MARGIN


def _postgres_engine(url: str) -> SqlEngine:
    """A pooled engine whose connections give up on a server that does not answer."""
    given = "connect_timeout" in make_url(url).query
    return create_engine(
        url, connect_args={} if given else {"connect_timeout": CONNECT_TIMEOUT}, **POOL
    )


def state_engine(url: str) -> SqlEngine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers (status) never block the writer
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL-safe
            cursor.close()

        return engine
    return _postgres_engine(url)


def source_engine(url: str) -> SqlEngine:
    if url.startswith("sqlite"):
        return create_engine(url)
    return _postgres_engine(url)


def source_spec(s: Settings) -> SourceSpec:
    src = s.source
    return SourceSpec(
        table=src.table,
        schema=src.schema_,
        key=src.key,
        cursor=src.cursor,
        euid=src.euid_column,
        contacts={key: column for key, column in s.contacts.items()},
        statement_timeout=src.statement_timeout,
        cursor_mode=src.cursor_mode,
        consent=src.consent,
        deleted=src.deleted,
    )


def mapping_policy(s: Settings) -> Policy:
    """How this sync maps rows: one value, built once, handed to every ``map_row``."""
    n = s.normalize
    normalise = None
    if n.emails or n.phones:
        normalise = Normalisation(
            emails=n.emails,
            phones=n.phones,
            phone_region=n.phone_region,
            phone_format=n.phone_format,
            phone_formats={str(key): form for key, form in n.phone_formats.items()},
        )
    return Policy(
        salt=s.name,
        clear=s.engagelab.clear_empty,
        normalise=normalise,
        on_leave=s.engagelab.on_leave,
        contact_keys=tuple(sorted(s.contacts)),
    )


def client_proxies(s: Settings) -> Proxies:
    """The proxies the client uses: engagelab.proxy, else HTTPS_PROXY / HTTP_PROXY / NO_PROXY."""
    if s.engagelab.proxy is not None:
        return Proxies.only(s.engagelab.proxy.get_secret_value())
    try:
        return Proxies.from_environment()
    except ValueError as exc:  # the message names the variable, never its value
        raise SetupError(
            f"the proxy in the environment is unusable: {exc}",
            "correct or unset the variable, or set engagelab.proxy",
        ) from None


def code_policy(s: Settings) -> CodePolicy:
    api = s.engagelab
    return CodePolicy(
        overrides={code: Verdict(kind) for code, kind in api.codes.items()},
        unknown=Verdict(api.unknown_code),
        rate_limit_codes=frozenset(api.rate_limit_codes),
        max_retry_after=api.max_retry_after.total_seconds(),
    )


def build_client(
    s: Settings, *, on_answer: Callable[[ApiResult, float], None] | None = None
) -> EngageLabClient:
    api = s.engagelab
    policy = code_policy(s)
    return EngageLabClient(
        api.base_url,
        api.api_key,
        api.api_secret.get_secret_value(),
        timeout=api.timeout.total_seconds(),
        concurrency=api.concurrency,
        rate_limit=api.rate_limit,
        policy=policy,
        proxies=client_proxies(s),
        on_answer=on_answer,
    )


@contextmanager
def open_app(settings: Settings, needs: Needs) -> Iterator[App]:
    state_db = state_engine(settings.state.url)
    app = App(settings, StateStore(state_db, settings.name), needs)
    if needs >= Needs.SOURCE:
        app._source = Source(source_engine(settings.source.url), source_spec(settings))
    try:
        yield app
    finally:
        if app.client is not None:
            app.client.close()
        if app._source is not None:
            app._source.engine.dispose()
        state_db.dispose()


# -- commands ----------------------------------------------------------------------------------


def cmd_migrate(app: App, args: argparse.Namespace) -> int:
    before, head = app.state.schema_revision()
    if before == head:  # the common case, e.g. ExecStartPre beside another host's daemon
        print(f"tracking tables already at revision {head}")
        return 0
    with InstanceLock(app.state.engine, app.settings.name):  # never under a running daemon
        app.state.migrate()
    print(f"tracking tables at revision {head} (were at {before or 'nothing'})")
    return 0


def ready(app: App) -> None:
    """Check the tracking tables and the source table before any cycle; then leave what start-up
    built (modules, table metadata, compiled regexes) out of the garbage collector's full
    passes, each of which would otherwise walk it again (about 60 ms)."""
    app.state.require_schema()
    app.source.open()
    app.lookback()
    gc.freeze()


def cmd_once(app: App, args: argparse.Namespace) -> int:
    if args.dry_run:
        app.state.require_schema()
        app.source.open()
        print(render_preview(app.settings.name, app.engine(dry_run=True).preview(args.sample)))
        return 0
    ready(app)
    stop = Stop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with InstanceLock(app.state.engine, app.settings.name):
        report = app.engine().run_cycle(stop)
    print(cycle_line(report))
    return 0 if report.outcome is RunOutcome.STOPPED else once_status(report.counts)


def once_status(counts: CycleCounts) -> int:
    """0 only when every row read was synced, unchanged, skipped or left, so cron and CI notice.
    (A cycle a signal stopped exits 0 whatever it left: the stop was asked for. A dry run
    exits 0: it sends nobody, so nobody is left.)"""
    if counts.failed:
        return EX_USERS_FAILED
    if counts.retrying or counts.deferred:
        return EX_USERS_RETRYING
    return 0


def cmd_run(app: App, args: argparse.Namespace) -> int:
    ready(app)
    from cdc_sync.scheduler import Daemon, Watchdog  # APScheduler is only needed here

    notifier = Notifier(os.environ)
    bound = page_bound(app.settings)
    watchdog = notifier.watchdog_seconds
    if watchdog is not None and watchdog < bound:
        log.warning(
            "watchdog_shorter_than_a_page",
            watchdog_s=watchdog,
            page_bound_s=bound,
            fix="raise WatchdogSec in the unit, or lower source.batch_size",
        )
    lock = InstanceLock(app.state.engine, app.settings.name)
    engine = app.engine(Watchdog(notifier), metrics=True)
    daemon = Daemon(engine, app.settings.schedule.interval, lock, notifier, cycle_line)
    address = app.settings.metrics.address
    server = None
    if app.metrics is not None and address is not None:
        server = app.metrics.serve(*address)
        log.info("metrics_serving", listen=app.settings.metrics.listen)
    try:
        return daemon.run()
    finally:
        if server is not None:
            server.close()
        notifier.close()


def page_bound(s: Settings) -> float:
    """Seconds one page may take at most, on the settings alone: between two pages the daemon
    pings the watchdog, so WatchdogSec must exceed this. A page is read in one statement (tried
    up to READ_ATTEMPTS times on a fresh connection when a replica throws it out, each try
    bounded by statement_timeout, the backoffs between them under 5 s), its pushes are paced by
    the rate limit, the slowest request ends at the request timeout, and the commit follows."""
    read = READ_ATTEMPTS * s.source.statement_timeout.total_seconds() + 5.0
    rate = s.engagelab.rate_limit
    push = s.source.batch_size / rate if rate else 0.0
    return read + push + s.engagelab.timeout.total_seconds()


def cmd_status(app: App, args: argparse.Namespace) -> int:
    app.state.require_schema()
    view = app.state.status_view(args.limit)
    now = utcnow()
    print(status_json(status_data(view, now)) if args.json else render_status(view, now))
    return 0


def cmd_check(app: App, args: argparse.Namespace) -> int:
    app.source.open()
    app.lookback()
    current, head = app.state.schema_revision()
    route = client_proxies(app.settings).describe(app.settings.engagelab.base_url)
    facts = app.source.facts()
    pending = None
    if current == head:  # counted only against tracking tables that can be read
        counter = Engine(app.engine_settings(), app.source, app.state, _NoPushes())  # type: ignore[arg-type]
        pending = counter.pending()
    if app.client is None:
        app.client = build_client(app.settings)
    probe = app.client.probe()
    text, ok = render_check(
        app.settings, app.source.spec, facts, current, head, route, pending, probe
    )
    print(text)
    if judge_probe(probe) is Credentials.REFUSED:
        return EX_FATAL_API
    return 0 if ok and probe.status is not None else EX_UNAVAILABLE


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=10, help="rows per section")
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


def _once_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="show what a cycle would push, with counts and a sample of keys; call no API and "
        "change nothing",
    )
    parser.add_argument("--sample", type=int, default=10, help="keys shown by --dry-run")


# -- operator commands: safe while the daemon runs ------------------------------------------
# They write the tracking tables and bump the operator epoch there; a running daemon reads the
# epoch with each run start and then drops what it cached (watermark, retry queue, status rows).


def cmd_show(app: App, args: argparse.Namespace) -> int:
    state = app.state
    state.require_schema()
    keys = [args.key] if args.key is not None else state.keys_of_euid(args.euid)
    users = [found for found in map(state.status_of, keys) if found is not None]
    if not users:
        who = f"user {args.key}" if args.key is not None else f"a user with euid {args.euid}"
        print(f"cdc-sync: sync {app.settings.name} has no record of {who}", file=sys.stderr)
        return 1
    print("\n\n".join(render_user(u, state.history(u.source_key, args.limit)) for u in users))
    return 0


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("key", nargs="?", help="the user's key (the source.key column)")
    who.add_argument("--euid", type=int, help="the user's EngageLab user id instead")
    parser.add_argument("--limit", type=int, default=HISTORY_PER_USER, help="history rows")


def cmd_retry(app: App, args: argparse.Namespace) -> int:
    app.state.require_schema()
    count = app.state.retry_now(args.keys, args.failed, utcnow())
    which = "the given users" if args.keys else "retrying" + (" and failed" if args.failed else "")
    print(f"{count} users ({which}) are due for a retry now; the next cycle pushes them")
    return 0


def _retry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keys", nargs="*", metavar="KEY", help="only these users")
    parser.add_argument(
        "--failed", action="store_true", help="failed users too, with a fresh count of attempts"
    )


def cmd_resync(app: App, args: argparse.Namespace) -> int:
    app.state.require_schema()
    if args.all == bool(args.keys):
        print("cdc-sync resync: give KEY... or --all, not both", file=sys.stderr)
        return 2
    if args.all:
        if not confirmed(f"Push every user of sync {app.settings.name} again?", args.yes):
            return 1
        count = app.state.resync_all(utcnow())
        print(f"the next cycle reads the whole table again and pushes every user ({count} known)")
    else:
        app.state.resync(args.keys, utcnow())
        print(f"{len(args.keys)} users are due now; the next cycle re-reads and pushes them")
    return 0


def _resync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keys", nargs="*", metavar="KEY", help="these users")
    parser.add_argument("--all", action="store_true", help="every user in the table")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def cmd_reset_watermark(app: App, args: argparse.Namespace) -> int:
    state, source = app.state, app.source
    state.require_schema()
    source.open()
    if args.beginning:
        target = None
    else:
        try:
            cursor = source.cursor_from_text(args.to)
        except ValueError:
            print(
                f"cdc-sync reset-watermark: --to {args.to!r} is not a value of the cursor "
                f"column {source.spec.cursor}; give an ISO 8601 time or a number",
                file=sys.stderr,
            )
            return 2
        target = source.position_before(cursor)
    now_at = describe(state.watermark()) or "the beginning"
    to = describe(target) or "the beginning"
    question = f"Move the watermark of sync {app.settings.name} from {now_at} to {to}?"
    if not confirmed(question, args.yes):
        return 1
    state.request_reset(target, utcnow())
    print(f"the next cycle starts from {to} (was {now_at}) and reads every row after it again")
    return 0


def _reset_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--to", metavar="TIME", help="read again every row whose cursor is at or after TIME"
    )
    where.add_argument("--beginning", action="store_true", help="read the whole table again")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def cmd_prune(app: App, args: argparse.Namespace) -> int:
    app.state.require_schema()
    keep = app.settings.state.keep_runs
    pruned = app.state.prune(utcnow() - keep)
    print(
        f"deleted {pruned.runs} runs and {pruned.history} history entries older than "
        f"{format_duration(keep)} (or beyond each user's newest {HISTORY_PER_USER})"
    )
    return 0


def confirmed(question: str, yes: bool) -> bool:
    """Whether the operator confirms ``question``: ``--yes``, or "y" typed at a terminal."""
    if yes:
        return True
    if not sys.stdin.isatty():
        print("cdc-sync: not confirmed: no terminal to ask on; add --yes", file=sys.stderr)
        return False
    answer = input(f"{question} [y/N] ")
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("cdc-sync: not confirmed; nothing changed", file=sys.stderr)
    return False


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Command:
    """A command of one sync: built from the config, it gets what ``needs`` says."""

    name: str
    help: str
    handler: Callable[[App, argparse.Namespace], int]
    needs: Needs
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments


@dataclass(frozen=True)
class Tool:
    """A command that reads no config and parses its own arguments: the emulator and the demo,
    run by :func:`with_emulator`."""

    name: str
    help: str


COMMANDS: tuple[Command | Tool, ...] = (
    Command(
        "migrate",
        "create or upgrade the tracking tables (alembic upgrade head)",
        cmd_migrate,
        Needs.STATE,
    ),
    Command(
        "once",
        "run one sync cycle, then exit (--dry-run: only say what it would push)",
        cmd_once,
        Needs.API,
        _once_arguments,
    ),
    Command(
        "run",
        "run the daemon: a cycle every schedule.interval until SIGTERM",
        cmd_run,
        Needs.API,
    ),
    Command(
        "status",
        "show the watermark, recent runs, counts by status, recent failures",
        cmd_status,
        Needs.STATE,
        _status_arguments,
    ),
    Command(
        "check",
        "validate the config and the databases, prove the credentials; say which index to create",
        cmd_check,
        Needs.API,
    ),
    Command(
        "show",
        "one user's status, payload hash, attempts, last answer and recent history",
        cmd_show,
        Needs.STATE,
        _show_arguments,
    ),
    Command(
        "retry",
        "retry now: retrying users (--failed: failed ones too), or the given ones",
        cmd_retry,
        Needs.STATE,
        _retry_arguments,
    ),
    Command(
        "resync",
        "push users again whatever their stored hashes, from their current rows",
        cmd_resync,
        Needs.STATE,
        _resync_arguments,
    ),
    Command(
        "reset-watermark",
        "make the next cycle read again from a time, or from the beginning",
        cmd_reset_watermark,
        Needs.SOURCE,
        _reset_arguments,
    ),
    Command(
        "prune",
        "delete run history and user history past retention now (also done hourly)",
        cmd_prune,
        Needs.STATE,
    ),
    Tool("emulator", "run the EngageLab emulator (for tests and demos)"),
    Tool("demo", "run the demo on embedded defaults"),
)


DESCRIPTION = "Keeps EngageLab contact information in step with an application's user table."

EX_PIPE = 128 + signal.SIGPIPE
"""A reader that went away (``| head``): the status a shell shows for a tool SIGPIPE killed."""

EXIT_STATUSES = f"""\
exit statuses:
  0    done
  1    unexpected error; show: no such user; resync --all, reset-watermark: not confirmed
  2    wrong command-line usage
  {EX_FATAL_API:<3}  EngageLab refused the sync (credentials, project), or its TLS certificate was
       refused: every request would fail (run: three cycles in a row)
  {EX_USERS_FAILED:<3}  once: users failed for good in this cycle (a permanent code, or retries
       used up)
  {EX_USERS_RETRYING:<3}  once: users are left to retry (EngageLab unreachable, throttling)
  {EX_UNAVAILABLE:<3}  something outside the config is wrong (a database unreachable, the table or a
       column missing, the tracking tables behind); the message says what and how to fix it
  {EX_TEMPFAIL:<3}  another instance of the same sync holds its lock (once, migrate)
  {EX_CONFIG:<3}  the configuration is wrong; the message names the file and every bad key
  {EX_PIPE:<3}  the reader of the output went away (cdc-sync status | head), said nothing
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cdc-sync",
        description=DESCRIPTION,
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"cdc-sync {__version__}")
    p.add_argument(
        "-c", "--config", help="config file (default: $CDC_SYNC_CONFIG or ./config.yaml)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        if isinstance(command, Tool):  # its own parser reads the rest, --help included
            own = sub.add_parser(command.name, help=command.help, add_help=False)
        else:
            own = sub.add_parser(command.name, help=command.help, description=command.help)
            command.arguments(own)
        own.set_defaults(run=command)
    return p


def with_emulator(command: str, args: list[str]) -> int:
    """Run ``emulator`` or ``demo``, which need the ``emulator`` extra (aiohttp, the emulator's
    server); without it, say how to install it."""
    try:
        module = importlib.import_module(f"cdc_sync.{command}")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "aiohttp":
            raise
        print(
            f"cdc-sync: {command} needs the EngageLab emulator, which a plain install leaves out; "
            "install it with: pip install 'cdc-sync[emulator]'",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    run: Callable[[list[str]], int] = module.main
    return run(args)


def quiet_on_broken_pipe(command: Callable[..., int]) -> Callable[..., int]:
    """Exit :data:`EX_PIPE` without a traceback when stdout's reader has gone, as Unix tools do.

    Python ignores SIGPIPE, so a write to a closed pipe raises BrokenPipeError; stdout is
    flushed here so that the error is raised here, then pointed at /dev/null so that the
    interpreter's own flush at exit does not raise it again (the recipe of Python's
    ``signal`` documentation). 141 rather than 0: under ``set -o pipefail`` cdc-sync then
    fails a pipeline exactly as ``grep`` or ``cat`` would.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            status = command(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EX_PIPE
        return status

    return wrapper


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    command: Command | Tool = args.run
    if isinstance(command, Tool):
        return with_emulator(command.name, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    journal = logs.to_journal(os.environ, sys.stderr)
    try:
        path = resolve_config_path(args.config, os.environ)
        # Only the commands that call the API read the EngageLab credentials.
        credentials = command.needs >= Needs.API
        settings = load_settings(path, os.environ, credentials=credentials)
        logs.configure(settings.logging.level, settings.logging.format, journal=journal)
        with open_app(settings, command.needs) as app:
            return command.handler(app, args)
    except CdcSyncError as exc:
        prefix = logs.priority_prefix("error") if journal else ""
        for line in f"cdc-sync: {exc}".splitlines():
            print(prefix + line, file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
