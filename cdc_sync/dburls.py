"""Database URLs as the config gives them: checked, normalised, compared and shown (pure).

Failures are ValueErrors whose text never quotes the URL, which may carry a password.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

# Query parameters libpq (and so psycopg) reads as secrets: postgresql://h/db?password=...
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})
_URL_HINT = "write e.g. postgresql+psycopg://user@host:5432/db"
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


def mask_password(url: str | URL) -> str:
    """A database URL as shown to an operator: its password, in userinfo or query, as ``***``.

    Built from the URL's parts, not by searching its text; a text that is no URL is all ``***``.
    """
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return "***"
    hidden = sorted(key for key in parsed.query if key.lower() in SECRET_QUERY_KEYS)
    shown = parsed.difference_update_query(hidden).render_as_string(hide_password=True)
    extra = "&".join(f"{key}=***" for key in hidden)
    return f"{shown}{'&' if '?' in shown else '?'}{extra}" if extra else shown


def holds_password(text: str) -> bool:
    """Whether a URL's text carries a password, in its userinfo or its query."""
    try:
        split = urlsplit(text)
        return bool(split.password) or any(
            key.lower() in SECRET_QUERY_KEYS and value for key, value in parse_qsl(split.query)
        )
    except ValueError:  # e.g. an invalid port or IPv6 literal: no URL, so no password in one
        return False


def is_memory(url: URL) -> bool:
    """Whether a SQLite URL names an in-memory database rather than a file."""
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def normalise(text: str, config_dir: Path) -> str:
    """Check a SQLAlchemy URL and put it in the form the rest of cdc-sync relies on.

    ``postgres://`` and driverless ``postgresql://`` name psycopg 3 (the driver we ship), and a
    relative SQLite path is anchored at the config file's directory, so the daemon's working
    directory (systemd's is ``/``) does not decide which file is used.
    """
    text = re.sub(r"^(postgres|postgresql)://", "postgresql+psycopg://", text.strip())
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        # SQLAlchemy's own message quotes the whole URL, password included.
        raise ValueError(f"not a database URL; {_URL_HINT}") from None
    try:
        url.get_dialect().import_dbapi()  # the dialect alone imports no driver
    except (NoSuchModuleError, ArgumentError):
        raise ValueError(
            f"unknown database dialect or driver {url.drivername!r}; {_URL_HINT}"
        ) from None
    except ImportError as exc:
        raise ValueError(
            f"the driver for {url.drivername!r} is not installed ({exc.name}); {_URL_HINT}"
        ) from None
    if url.get_backend_name() != "sqlite" or is_memory(url):
        return text
    database = str(url.database)
    if database.startswith("file:") or os.path.isabs(database):
        return text
    absolute = os.path.normpath(config_dir / database)
    return url.set(database=absolute).render_as_string(hide_password=False)


def same_database(left: str, right: str) -> bool:
    """Whether two URLs reach one database, whatever user, driver or password they use."""

    def identity(text: str) -> tuple[object, ...]:
        url = make_url(text)
        backend = url.get_backend_name()
        if backend == "sqlite":
            return (backend, url.database)
        port = url.port or _DEFAULT_PORTS.get(backend)
        return (backend, (url.host or "").lower(), port, url.database)

    return identity(left) == identity(right)
