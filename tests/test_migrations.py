"""The alembic migrations: up, down and up again on both backends, and no drift from the models."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from cdc_sync.cli import state_engine
from cdc_sync.models import metadata
from cdc_sync.state import SCHEMA_HEAD, StateStore

TABLES = {"cdc_sync_state", "cdc_sync_status", "cdc_sync_runs"}


def tables(store: StateStore) -> set[str]:
    return set(inspect(store.engine).get_table_names()) & TABLES


def test_upgrade_downgrade_upgrade(state_url: str) -> None:
    """The migrations create every table, remove them all, and create them again."""
    store = StateStore(state_engine(state_url), "s")

    store.migrate()
    created = tables(store)
    store.downgrade("base")
    removed = tables(store)
    store.migrate()

    assert created == TABLES
    assert removed == set()
    assert tables(store) == TABLES
    assert store.schema_revision() == (SCHEMA_HEAD, SCHEMA_HEAD)
    store.require_schema()  # reads the revision without alembic: agrees with it


def test_models_match_the_migrations(state_url: str) -> None:
    """Autogenerate finds no difference between the migrated schema and models.py."""
    store = StateStore(state_engine(state_url), "s")
    store.migrate()

    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={
            "compare_type": True, "compare_server_default": True}), metadata)

    assert diff == []


def test_migrate_is_idempotent(state_url: str) -> None:
    """Running migrate on an up-to-date database changes nothing and does not fail."""
    store = StateStore(state_engine(state_url), "s")
    store.migrate()

    store.migrate()

    assert tables(store) == TABLES
