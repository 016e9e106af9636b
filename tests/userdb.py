"""A user table like an application's, and config files pointing cdc-sync at it (test helpers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    MetaData,
    Table,
    Text,
    create_engine,
    func,
    select,
    update,
)

CONTACT_COLUMNS = {
    "email": "email",
    "mobile_phone": "mobile",
    "landline_phone": "landline",
    "whatsapp_phone": "whatsapp",
}


# The SQL the README gives operators for cursor_mode xid8, minus the batched backfill.
XID8_SETUP = """
ALTER TABLE users ADD COLUMN cdc_xid xid8;
CREATE FUNCTION users_stamp_xid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.cdc_xid := pg_current_xact_id(); RETURN NEW; END $$;
CREATE TRIGGER users_stamp_xid BEFORE INSERT OR UPDATE ON users
  FOR EACH ROW EXECUTE FUNCTION users_stamp_xid();
CREATE INDEX users_cdc_xid_id_idx ON users (cdc_xid, id);
"""


class UserDb:
    """The application's ``users`` table in a source database, written as the app would."""

    def __init__(self, url: str, *, index: bool = True, xid8: bool = False) -> None:
        self.url = url
        self.engine: Engine = create_engine(url)
        self.metadata = MetaData()
        self.table = Table(
            "users",
            self.metadata,
            Column("id", BigInteger, primary_key=True, autoincrement=False),
            Column("name", Text),
            Column("email", Text),
            Column("mobile", Text),
            Column("landline", Text),
            Column("whatsapp", Text),
            Column("engagelab_euid", BigInteger),
            Column(
                "updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()
            ),
        )
        if index:
            Index("users_updated_at_id_idx", self.table.c.updated_at, self.table.c.id)
        self.metadata.create_all(self.engine)
        if xid8:
            with self.engine.begin() as connection:
                connection.exec_driver_sql(XID8_SETUP)

    def insert(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = [dict(r) for r in rows]
        if rows:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert(), rows)

    def add_users(self, ids: Iterable[int], **values: Any) -> None:
        """Users with an email (and euid 1000+id) unless ``values`` says otherwise."""
        self.insert(
            {
                "id": i,
                "name": f"user {i}",
                "email": f"user{i}@example.com",
                "engagelab_euid": 1000 + i,
                **values,
            }
            for i in ids
        )

    def change(self, user_id: int, *, touch: bool = True, **values: Any) -> None:
        """Update a user as the app would: ``updated_at = now()`` unless ``touch`` is off."""
        if touch:
            values.setdefault("updated_at", func.now())
        with self.engine.begin() as connection:
            connection.execute(
                update(self.table).where(self.table.c.id == user_id).values(**values)
            )

    def expected_contacts(self) -> dict[int, dict[str, str]]:
        """What EngageLab should hold: contacts per valid euid (NULL/blank values left out)."""
        with self.engine.connect() as connection:
            # Not updated_at: psycopg cannot read an infinite timestamp into a datetime.
            wanted = ["engagelab_euid", *CONTACT_COLUMNS.values()]
            rows = connection.execute(select(*(self.table.c[c] for c in wanted))).all()
        expected = {}
        for row in rows:
            contacts = {
                k: getattr(row, col).strip()
                for k, col in CONTACT_COLUMNS.items()
                if getattr(row, col) and getattr(row, col).strip()
            }
            if row.engagelab_euid and row.engagelab_euid > 0 and contacts:
                expected[row.engagelab_euid] = contacts
        return expected

    def dispose(self) -> None:
        self.engine.dispose()


def write_config(
    path: Path,
    *,
    source_url: str,
    state_url: str,
    api_url: str,
    secret: str = "secret",
    **overrides: Any,
) -> Path:
    """A config file for the users table; ``overrides`` are merged per section (source=..., ...)."""
    config: dict[str, Any] = {
        "name": "users",
        "source": {
            "url": source_url,
            "table": "users",
            "key": "id",
            "cursor": "updated_at",
            "euid": "engagelab_euid",
            "batch_size": 50,
            "lookback": "5m",
        },
        "contacts": dict(CONTACT_COLUMNS),
        "state": {"url": state_url},
        "engagelab": {
            "base_url": api_url,
            "api_key": "key",
            "api_secret": secret,
            "concurrency": 4,
            "rate_limit": None,
            "timeout": "5s",
        },
        "retry": {"base": "30s", "max": "10m", "max_attempts": 5},
        "schedule": {"interval": "1s"},
        "logging": {"level": "WARNING", "format": "console"},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
