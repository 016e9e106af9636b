"""Database URLs as the config gives them: checked, normalised, compared and shown (pure).

Failures are ValueErrors whose text never quotes the URL, which may carry a password.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_URL_HINT = "write e.g. postgresql+psycopg://user@host:5432/db"
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


def mask_password(text: str) -> str:
    """Replace the password of every ``scheme://user:password@host`` URL in ``text`` with ***."""
    return _URL_PASSWORD.sub(r"\1***@", text)


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
