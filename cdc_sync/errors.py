"""Every error cdc-sync raises on purpose, named by what the caller should do about it.

    CdcSyncError                    root: anything we raise deliberately
    ├── ConfigError                 the configuration is wrong; fix the file (exit 78, EX_CONFIG)
    ├── SetupError                  the world around us is wrong; fix it and start again (exit 69)
    │   ├── SourceError             source unreachable, table or column missing
    │   └── StateError              tracking database unreachable or its schema is behind
    ├── FatalApiError               EngageLab refuses every request (credentials, project),
    │                               or its TLS certificate is refused; stop the cycle at once
    │                               and alert (exit 3)
    ├── Stopped                     the stop signal cut a wait short; the engine ends the cycle
    │                               as ``stopped`` (never reaches an operator)
    └── lock.LockBusy               another instance of this sync holds its lock; try later
                                    (exit 75, EX_TEMPFAIL)

Per-record problems (a bad row, an API code that concerns one user) are *not* exceptions: they are
values (:class:`cdc_sync.outcomes.RowOutcome`) recorded in the sync-status table, so one bad row
never stops the others. ``once`` still exits non-zero when they are left: 4 (``EX_USERS_FAILED``)
when a user failed for good, else 5 (``EX_USERS_RETRYING``) when users are left to retry.
"""

from __future__ import annotations

EX_CONFIG = 78
EX_UNAVAILABLE = 69
EX_FATAL_API = 3
EX_USERS_FAILED = 4  # ``once``: users failed for good in this cycle (permanent, or out of retries)
EX_USERS_RETRYING = 5  # ``once``: users are left to retry (EngageLab unreachable, throttling)


class CdcSyncError(Exception):
    """Root of every error cdc-sync raises deliberately."""

    exit_code = 1


class ConfigError(CdcSyncError):
    """The configuration file is missing, malformed or invalid.

    ``path`` is the file, ``key`` the dotted key path (empty for the whole file).
    """

    exit_code = EX_CONFIG

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class SetupError(CdcSyncError):
    """Something outside the config is not as it must be; ``hint`` says how to fix it."""

    exit_code = EX_UNAVAILABLE

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}\n  fix: {hint}" if hint else problem)


class SourceError(SetupError):
    """The source database is unreachable, or the table or a column does not exist."""


class StateError(SetupError):
    """The tracking database is unreachable or its schema is not at the latest migration."""


class FatalApiError(CdcSyncError):
    """EngageLab answered in a way that means every further request would fail too."""

    exit_code = EX_FATAL_API

    def __init__(self, code: int | None, status: int | None, message: str) -> None:
        self.code = code
        self.status = status
        self.message = message
        if status is None:  # no answer at all: EngageLab could not be reached as configured
            super().__init__(f"cdc-sync cannot reach EngageLab as configured: {message}")
        else:
            super().__init__(f"EngageLab refused the sync (HTTP {status}, code {code}): {message}")


class Stopped(CdcSyncError):
    """The stop signal came while something waited (a source read between its retries): the
    cycle ends as ``stopped``, and what was not done is done by the next one."""


def first_line(exc: BaseException) -> str:
    """The first line of a (database) error, without SQLAlchemy's statement and background link."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
