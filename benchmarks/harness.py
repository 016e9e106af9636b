"""What every measurement shares: progress lines, config files, and :class:`Bench`.

cdc-sync is driven only through its command line (``python -m cdc_sync.cli -c CFG once``), so the
benchmarks keep working while the engine, the client and the rate limiting change underneath. The
only cdc-sync module imported anywhere in benchmarks/ is the PostgreSQL harness it ships for tests
and benchmarks (:mod:`cdc_sync.testing.postgres`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from databases import Databases
from processes import API_KEY, API_SECRET, ProcessRun, cli


def progress(message: str) -> None:
    """One progress line on stderr (stdout is the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_config(
    path: Path, *, source_url: str, state_url: str, api_url: str, **overrides: Mapping[str, Any]
) -> Path:
    """A config for the users table (the shape of tests/userdb.py), merged per section."""
    config: dict[str, Any] = {
        "name": "users",
        "source": {
            "url": source_url,
            "table": "users",
            "key": "id",
            "cursor": "updated_at",
            "euid": "engagelab_euid",
            "batch_size": 1000,
            "lookback": "5m",
        },
        "contacts": {
            "email": "email",
            "mobile_phone": "mobile",
            "landline_phone": "landline",
            "whatsapp_phone": "whatsapp",
        },
        "state": {"url": state_url},
        "engagelab": {
            "base_url": api_url,
            "api_key": API_KEY,
            "api_secret": API_SECRET,
            "concurrency": 32,
            "rate_limit": None,
            "timeout": "10s",
        },
        # The shipped config.yaml's retry defaults.
        "retry": {"base": "30s", "max": "1h", "max_attempts": 20},
        "schedule": {"interval": "1s"},
        "logging": {"level": "WARNING", "format": "console"},
    }
    for section, values in overrides.items():
        config[section] = {**config[section], **values}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class Sync:
    """A users table, an empty migrated tracking database, and the config joining them."""

    rows: int
    source_url: str
    state_url: str
    config: Path


class Bench:
    """What every measurement shares: options, the databases, a work directory for files."""

    def __init__(self, options: Any, dbs: Databases, work: Path) -> None:
        self.options = options
        self.dbs = dbs
        self.work = work
        self.synced: dict[int, Sync] = {}  # fully synced tables by size, for reuse
        self._names: dict[str, int] = {}

    def path(self, stem: str) -> Path:
        """A fresh file name in the work directory (``stem``, ``stem-2``, ...)."""
        count = self._names[stem] = self._names.get(stem, 0) + 1
        return self.work / (stem if count == 1 else f"{stem}-{count}")

    def sync(self, rows: int, api_url: str, **overrides: Mapping[str, Any]) -> Sync:
        """Load ``rows`` users, make and migrate a tracking database, write a config."""
        return self.sync_on(self.dbs.users(rows), rows, api_url, **overrides)

    def pushing(
        self,
        rows: int,
        api_url: str,
        rate_limit: float | None = None,
        **overrides: Mapping[str, Any],
    ) -> Sync:
        """:meth:`sync` with the run's ``--batch-size`` and ``--concurrency``, and ``rate_limit``
        (None: unpaced)."""
        o = self.options
        return self.sync(
            rows,
            api_url,
            source={"batch_size": o.batch_size},
            engagelab={"concurrency": o.concurrency, "rate_limit": rate_limit},
            **overrides,
        )

    def sync_on(
        self, source_url: str, rows: int, api_url: str, **overrides: Mapping[str, Any]
    ) -> Sync:
        """Make and migrate a tracking database for ``source_url``; write a config."""
        state_url = self.dbs.state()
        config = write_config(
            self.path("config").with_suffix(".yaml"),
            source_url=source_url,
            state_url=state_url,
            api_url=api_url,
            **overrides,
        )
        cli(config, "migrate", self.path("migrate"))
        return Sync(rows, source_url, state_url, config)

    def once(self, sync: Sync, stem: str = "once", **kwargs: Any) -> ProcessRun:
        return cli(sync.config, "once", self.path(stem), **kwargs)
