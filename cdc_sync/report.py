"""Plain-text views for operators: ``cdc-sync status`` and ``check``, and a cycle's summary line.

Pure formatting: each view is a function of the values the state store and the source return.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cdc_sync.dburls import mask_password
from cdc_sync.durations import format_duration
from cdc_sync.engagelab import Credentials, judge_probe
from cdc_sync.outcomes import CycleCounts, RowOutcome, RunOutcome, describe
from cdc_sync.outcomes import Progress as Backlog
from cdc_sync.rules import Status
from cdc_sync.state import HistoryEntry, Progress, RunRow, StatusView, UserStatus

if TYPE_CHECKING:
    from cdc_sync.config import Settings
    from cdc_sync.engagelab import ApiResult
    from cdc_sync.engine import Preview
    from cdc_sync.outcomes import CycleReport
    from cdc_sync.rules import Position
    from cdc_sync.source import IndexAdvice, SourceFacts, SourceSpec


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned text table; ``None`` shows as ``-``."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join("  " + line for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cycle_line(report: CycleReport) -> str:
    """One line for a cycle: what ``once`` prints and the daemon's systemd STATUS."""
    c = report.counts
    users = ", ".join(f"{_LABELS[n]} {getattr(c, n)}" for n in _CYCLE_USERS)
    return f"cycle {report.run_id} {report.outcome}: {c.rows_read} rows read; users: {users}"


def backlog(view: StatusView, now: datetime) -> tuple[RunRow, Backlog] | None:
    """How far the run under way has got, when its scan met a backlog (and counted it)."""
    running = view.runs[0] if view.runs else None
    if running is None or running.outcome != RunOutcome.RUNNING:
        return None
    if running.rows_estimated is None:
        return None
    seconds = (now - running.started_at).total_seconds()
    return running, Backlog(running.counts.rows_read, running.rows_estimated, seconds)


def status_data(view: StatusView, now: datetime) -> dict[str, Any]:
    """What ``status`` shows, as plain values (``status --json`` prints them as they are)."""
    at = view.progress
    under_way = backlog(view, now)
    progress = None
    if under_way is not None:
        run, p = under_way
        remaining = p.remaining_seconds
        progress = {
            "run": run.id,
            "rows_done": p.done,
            "rows_estimated": p.total,
            "rows_per_s": round(p.rate, 1),
            "remaining_s": None if remaining is None else round(remaining),
        }
    return {
        "sync": view.name,
        "watermark": describe(at.watermark),
        "watermark_reset": None if view.reset is None else {"to": describe(view.reset[0])},
        "cursor_reach": {
            "rows": at.reach_rows,
            "counted_at": at.reach_checked_at,
            "sweep_under_way": at.reach_key is not None,
        },
        "watermark_held": None
        if not at.held_rows
        else {"rows": at.held_rows, "ahead_by_s": at.held_by_s},
        "users": {status.value: view.counts.get(status, 0) for status in Status},
        "progress": progress,
        "runs": [_run_data(run) for run in view.runs],
        "problems": [asdict(user) for user in view.problems],
    }


def _run_data(run: RunRow) -> dict[str, Any]:
    data = asdict(run)
    counts: dict[str, int] = data.pop("counts")
    return data | counts  # the counts beside the other columns, as in the table


def status_json(data: dict[str, Any]) -> str:
    """``status --json``: :func:`status_data`'s values, timestamps in ISO 8601."""
    return json.dumps(data, default=_iso, indent=2)


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def render_status(view: StatusView, now: datetime) -> str:
    counts = view.counts
    by_status = ", ".join(f"{k} {counts.get(k, 0)}" for k in Status)
    parts = [
        f"sync {view.name}",
        f"  watermark: {describe(view.progress.watermark) or 'none (the next cycle reads all)'}",
        *progress_lines(view.progress),
        f"  users: {by_status} (total {sum(counts.values())})",
        *(
            [f"  watermark reset pending: the next cycle starts from {_from(view.reset[0])}"]
            if view.reset
            else []
        ),
        *backlog_lines(backlog(view, now)),
        "",
        "recent runs (newest first; read counts rows, the other counts users)",
        table(
            ["run", "started", "outcome", *(_LABELS[n] for n in _RUN_COUNTS), "lag", "error"],
            [
                [
                    r.id,
                    r.started_at,
                    r.outcome,
                    *(getattr(r.counts, n) for n in _RUN_COUNTS),
                    _lag(r.replica_lag_s),
                    r.error,
                ]
                for r in view.runs
            ],
        ),
        "",
        "users not synced (failed, then retrying, then skipped)",
        table(
            [
                "key",
                "euid",
                "status",
                "attempts",
                "code",
                "message",
                "last attempt",
                "next attempt",
            ],
            [
                [
                    p.source_key,
                    p.euid,
                    p.status,
                    p.attempts,
                    p.last_code,
                    p.last_message,
                    p.last_attempt_at,
                    p.next_attempt_at,
                ]
                for p in view.problems
            ],
        )
        if view.problems
        else "  none",
    ]
    return "\n".join(parts)


def backlog_lines(under_way: tuple[RunRow, Backlog] | None) -> list[str]:
    """What ``status`` says of a long scan under way: rows done of the estimate, rate, time left."""
    if under_way is None:
        return []
    run, p = under_way
    left = p.remaining_seconds
    return [
        f"  progress: run {run.id} has read {p.done:,} of about {p.total:,} rows, "
        f"{p.rate:,.0f} rows/s, "
        + (
            "time left unknown"
            if left is None
            else f"about {_duration(timedelta(seconds=left))} left"
        )
    ]


def progress_lines(progress: Progress) -> list[str]:
    """What ``status`` says of the rows the watermark cannot cover: outside the cursor's reach,
    and ahead of the source's clock."""
    lines = []
    if progress.reach_checked_at is None:
        lines.append("  outside the cursor's reach: not counted yet (the next cycle sweeps them)")
    else:
        lines.append(
            f"  outside the cursor's reach: {progress.reach_rows} rows (NULL or infinite cursor), "
            f"read by key; counted {_cell(progress.reach_checked_at)}"
            + ("; sweep under way" if progress.reach_key is not None else "")
        )
    if progress.held_rows:
        lines.append(f"  watermark held: {held_text(progress.held_rows, progress.held_by_s)}")
    return lines


def render_user(user: UserStatus, history: Sequence[HistoryEntry]) -> str:
    """``cdc-sync show``: one user's status row and recent outcomes (hashes, never contacts)."""
    lines = [
        f"user {user.source_key}",
        f"  euid:          {_cell(user.euid)}",
        f"  status:        {user.status}",
        f"  pushed hash:   {_cell(user.pushed_hash or None)}  (the payload EngageLab accepted)",
        f"  attempted:     {_cell(user.attempted_hash or None)}  (the payload last tried)",
        f"  attempts:      {user.attempts}",
        f"  last answer:   code {_cell(user.last_code)}: {_cell(user.last_message)}",
        f"  first seen:    {_cell(user.first_seen_at)}",
        f"  last attempt:  {_cell(user.last_attempt_at)}",
        f"  last success:  {_cell(user.last_success_at)}",
        f"  next attempt:  {_cell(user.next_attempt_at)}",
        "",
        "history (newest first)",
    ]
    rows = [[h.at, h.status, h.attempts, h.code, h.message, h.attempted_hash] for h in history]
    headers = ["at", "status", "attempts", "code", "message", "payload hash"]
    lines.append(table(headers, rows) if rows else "  none")
    return "\n".join(lines)


def render_preview(name: str, preview: Preview) -> str:
    """``cdc-sync once --dry-run``: what a cycle would do."""
    a = preview.actions
    return "\n".join(
        [
            f"dry run of sync {name}: nothing was pushed or recorded",
            f"  from:    {_from(preview.watermark)}",
            f"  read:    {preview.rows_read} rows, {preview.retries_due} users due for a retry",
            f"  push:    {a.get('push', 0)}",
            f"  unchanged: {a.get('unchanged', 0) + a.get('confirm', 0)}, "
            f"deferred: {a.get('defer', 0)}, skipped: {a.get('skip', 0)}",
            f"  e.g.:    {', '.join(preview.sample) or 'none'}",
        ]
    )


def _from(position: Position | None) -> str:
    return describe(position) or "the beginning"


# The counts each view shows, and what it calls them.
_LABELS = {name: name.replace("_", " ") for name in CycleCounts.names()} | {"rows_read": "read"}
_RUN_COUNTS = [n for n in CycleCounts.names() if n != "audit_checked"]
_CYCLE_USERS = [n for n in CycleCounts.names() if n in set(RowOutcome)]  # what it did with rows


def render_check(
    settings: Settings,
    spec: SourceSpec,
    facts: SourceFacts,
    current: str | None,
    head: str | None,
    route: str | None = None,
    pending: int | None = None,
    probe: ApiResult | None = None,
) -> tuple[str, bool]:
    """The report of ``cdc-sync check`` and whether everything needed to run is in place.

    ``pending``: users whose row, read now, would be pushed (see :meth:`Engine.pending`).
    ``probe``: the answer to ``check``'s credentials probe (``EngageLabClient.probe``)."""
    lookback = settings.source.lookback
    lines = [f"config     {settings.config_path}: valid"]
    exposure = secret_warning(settings)
    if exposure:
        lines.append(f"WARNING    {exposure}")
    lines += [
        f"source     {facts.url}: reachable",
        f"table      {spec.qualified_table}: columns {', '.join(spec.columns())} present",
    ]
    lines += index_lines(facts.index, spec.cursor, spec.key)
    lines += cursor_lines(facts, spec.cursor)
    if spec.gap_free:
        lines.append(
            "lookback   not used: cursor_mode xid8 reads nothing a running transaction "
            "could still land behind"
        )
    else:
        horizon, observed = facts.horizon, facts.longest_transaction
        lines.append(f"lookback   {_duration(lookback)} re-read behind the watermark each cycle")
        lines.append(f"lag        {_seconds(horizon.replica_lag, 'source is not a replica')}")
        lines.append(
            f"longest    write transaction running now: "
            f"{_seconds(observed, 'not visible from a standby')}; declared: "
            f"{_duration(settings.source.max_transaction or timedelta(0))}"
        )
        warning = lookback_warning(
            lookback, horizon.replica_lag, settings.source.max_transaction, observed
        )
        if warning:
            lines.append(f"WARNING    {warning}")
    ok = current == head
    state_url = settings.state.url
    if ok:
        lines.append(f"state      {mask_password(state_url)}: tracking tables at revision {head}")
    else:
        lines.append(
            f"state      {mask_password(state_url)}: tracking tables at {current or 'nothing'}, "
            f"need {head}; run `cdc-sync migrate`"
        )
    if pending is not None:
        lines.append(
            f"pending    {pending} user(s) would be pushed when next read: new, changed, or "
            "mapped differently than last sent (normalize or clear_empty changed)"
        )
    api = settings.engagelab
    lines.append(f"engagelab  {api.base_url} (api key {api.api_key}): {_probed(probe)}")
    if route is not None:
        lines.append(f"proxy      {route}")
    return "\n".join(lines), ok


def cursor_lines(facts: SourceFacts, cursor: str) -> list[str]:
    """What ``check`` says of the cursor column: its type, the rows outside the keyset scan's
    reach (NULL or infinite) with the fix, a zone-less type's risks, rows ahead of the clock."""
    nullable = "nullable" if facts.nullable else "NOT NULL"
    lines = [f"cursor     {cursor}: {facts.cursor_type}, {nullable}"]
    outside = facts.null_rows + facts.infinite_rows
    if facts.nullable or outside:
        lines.append(
            f"WARNING    {facts.null_rows} rows have a NULL {cursor} and {facts.infinite_rows} an "
            "infinite one: the keyset scan cannot order them, so they are read by key (once "
            "an hour) and only the audit sees them change"
            + (
                "; give every row a value and keep it so, on the primary:"
                if facts.reach_fix
                else f"; give every row a value and make {cursor} NOT NULL"
            )
        )
        lines += [f"           {statement}" for statement in facts.reach_fix]
    if facts.zoneless:
        lines.append(
            f"WARNING    {cursor} is a timestamp without time zone, read as wall-clock time in "
            "the session's zone: when the clock falls back (DST) an hour repeats, and a change "
            "stamped in the repeated hour can sort behind the watermark; a writer whose zone is "
            "ahead of the server's stamps rows in the future, which hold the watermark. Use a "
            "lookback of at least 1h over a fall-back, turn on the audit, or convert the column: "
            f"ALTER TABLE ... ALTER COLUMN {cursor} TYPE timestamptz USING {cursor} AT TIME ZONE "
            "'<the writers' zone>'"
        )
    if facts.ahead_rows:
        lines.append(f"WARNING    {held_text(facts.ahead_rows, facts.ahead_by_s)}")
    return lines


def held_text(rows: int, ahead_by: float | None) -> str:
    """Why the watermark is held by rows stamped ahead of the source's clock (check, status)."""
    by = f", the furthest by {format_duration(timedelta(seconds=round(ahead_by or 0)))}"
    return (
        f"{rows} rows are stamped ahead of the source's clock{by}: the watermark is held at the "
        "clock until it passes them (moving past them could skip rows that commit later with "
        "honest stamps), and every cycle reads them again. A writer's clock or time zone is "
        "ahead of the server's"
    )


def index_lines(advice: IndexAdvice, cursor: str, key: str) -> list[str]:
    """What ``check`` says of the index behind the poll: present, or the statements to run."""
    if advice.present:
        return [f"index      {advice.present} on ({cursor}, {key}): present"]
    if not advice.statements:
        return [f"index      none applies: {advice.note}"]
    lines = [
        f"index      none on ({cursor}, {key}): every poll scans the table. "
        "Create it on the primary (it replicates):"
    ]
    if advice.note:
        lines.append(f"           ({advice.note})")
    return lines + [f"           {statement}" for statement in advice.statements]


def _probed(probe: ApiResult | None) -> str:
    """What the credentials probe proved, in words."""
    if probe is None:
        return "not asked"
    answer = f"HTTP {probe.status}, code {probe.code}: {probe.message}"
    judged = judge_probe(probe)
    if judged is Credentials.ACCEPTED:
        return f"credentials accepted (a request with no EUID was answered {answer})"
    if judged is Credentials.REFUSED:
        return f"credentials REFUSED ({answer}); fix engagelab.api_key and engagelab.api_secret"
    if probe.status is None:
        return f"UNREACHABLE ({probe.message}); check engagelab.base_url and the network"
    return (
        f"credentials not proven: a request with no EUID was answered {answer}; the check "
        "relies on EngageLab checking credentials before the body, and this answer is neither "
        "a per-record code (they passed) nor a refusal"
    )


def lookback_warning(
    lookback: timedelta | int,
    lag: float | None,
    declared: timedelta | None,
    observed: float | None,
) -> str | None:
    """Why the lookback may be too short to catch rows that commit late, or None if it is not.

    A row commits up to (longest write transaction) after the time stamped in it, and reaches
    the replica up to (replay lag) later still; a lookback shorter than both together lets it
    land behind the watermark unseen.
    """
    if isinstance(lookback, int):
        return None  # a sequence cursor: no clock to compare with
    longest = max(declared.total_seconds() if declared else 0.0, observed or 0.0)
    need = longest + (lag or 0.0)
    if lookback.total_seconds() >= need:
        return None
    return (
        f"lookback {_duration(lookback)} is shorter than replica lag ({lag or 0:.1f}s) plus "
        f"the longest write transaction ({longest:.1f}s); raise source.lookback above "
        f"{need:.0f}s, or use cursor_mode xid8"
    )


def _lag(seconds: float | None) -> str | None:
    """A run's replica lag for the runs table; None (shown '-') when the source is no replica."""
    return None if seconds is None else f"{seconds:.1f}s"


def _seconds(value: float | None, otherwise: str) -> str:
    return otherwise if value is None else f"{value:.1f}s"


def _duration(value: timedelta | int) -> str:
    if isinstance(value, int):
        return f"{value} (cursor units)"
    return format_duration(value)


def secret_warning(settings: Settings) -> str | None:
    """Why the config file's secrets are exposed, or None: a secret written in a file that group
    or others may read."""
    exposed = settings.exposed_secrets
    if not exposed:
        return None
    return (
        f"{settings.config_path} holds {' and '.join(exposed)} as written text and is readable "
        f"by others (mode {settings.config_mode or 0:04o}); run chmod 600 on it, or write "
        "${VARIABLE} references and keep the values in an EnvironmentFile= readable by root only"
    )
