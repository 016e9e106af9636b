"""The alembic migrations: up, down and up again on both backends, and no drift from the models."""

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from cdc_sync.cli import state_engine
from cdc_sync.errors import StateError
from cdc_sync.models import VERSION_TABLE, metadata, sync_state
from cdc_sync.rules import Position
from cdc_sync.state import REVISIONS, SCHEMA_HEAD, StateStore, alembic_config

TABLES = {"cdc_sync_state", "cdc_sync_status", "cdc_sync_runs", "cdc_sync_history"}


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
        diff = compare_metadata(
            MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "version_table": VERSION_TABLE,
                },
            ),
            metadata,
        )

    assert diff == []


def test_migrate_is_idempotent(state_url: str) -> None:
    """Running migrate on an up-to-date database changes nothing and does not fail."""
    store = StateStore(state_engine(state_url), "s")
    store.migrate()

    store.migrate()

    assert tables(store) == TABLES


# -- beside another alembic application in the same database -------------------------------------

OTHER_REVISION = "9f1c2a7b3d4e"

OTHER_ENV = """
from alembic import context
from sqlalchemy import create_engine

with create_engine(context.config.get_main_option("sqlalchemy.url")).connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
"""

OTHER_MIGRATION = f'''
import sqlalchemy as sa
from alembic import op

revision = "{OTHER_REVISION}"
down_revision = None


def upgrade():
    op.create_table("other_things", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("other_things")
'''


def other_app(directory: Path, url: str) -> Config:
    """A tiny alembic application of somebody else's, with its default version table."""
    (directory / "versions").mkdir(parents=True)
    (directory / "env.py").write_text(OTHER_ENV)
    (directory / "versions" / f"{OTHER_REVISION}_other.py").write_text(OTHER_MIGRATION)
    config = Config()
    config.set_main_option("script_location", str(directory))
    config.set_main_option("sqlalchemy.url", url)
    return config


def shared_revisions(store: StateStore) -> list[str] | None:
    """What ``alembic_version`` holds, or None when it does not exist."""
    with store.engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return list(connection.scalars(text("SELECT version_num FROM alembic_version")))


def test_migrate_beside_another_alembic_application(state_url: str, tmp_path: Path) -> None:
    """Another application's alembic_version is neither read nor written by migrate."""
    store = StateStore(state_engine(state_url), "s")
    other = other_app(tmp_path / "other", state_url)
    command.upgrade(other, "head")

    store.migrate()
    store.require_schema()
    command.upgrade(other, "head")  # the other application's next start still knows its table

    assert shared_revisions(store) == [OTHER_REVISION]
    assert store.schema_revision() == (SCHEMA_HEAD, SCHEMA_HEAD)
    assert tables(store) == TABLES


def test_another_alembic_application_after_migrate(state_url: str, tmp_path: Path) -> None:
    """An application migrating after cdc-sync finds no revision of cdc-sync's in its table."""
    store = StateStore(state_engine(state_url), "s")
    other = other_app(tmp_path / "other", state_url)
    store.migrate()

    command.upgrade(other, "head")

    assert shared_revisions(store) == [OTHER_REVISION]
    store.require_schema()


def legacy(store: StateStore, revision: str, *, also: str | None = None) -> None:
    """Make ``store`` look as an install older than the version table left it: its revision in
    alembic_version (beside ``also``, another application's)."""
    store.migrate(revision)
    with store.engine.begin() as connection:
        connection.execute(text(f"DROP TABLE {VERSION_TABLE}"))
        connection.execute(
            text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        )
        for held in filter(None, (revision, also)):
            connection.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": held})
        connection.execute(
            sync_state.insert().values(
                sync_name="s",
                cursor_value="int:7",
                key_value="int:7",
                updated_at=datetime(2026, 1, 1, tzinfo=UTC),
            )
        )


@pytest.mark.parametrize("revision", REVISIONS)
def test_an_older_install_keeps_its_data_and_moves_its_revision(
    state_url: str, revision: str
) -> None:
    """An install whose revision is in alembic_version is upgraded in place, its table dropped."""
    store = StateStore(state_engine(state_url), "s")
    legacy(store, revision)
    with pytest.raises(StateError, match=rf"keeps its revision \({revision}\) in alembic_version"):
        store.require_schema()
    assert store.schema_revision()[0] == f"{revision} in alembic_version"

    store.migrate()

    store.require_schema()
    assert shared_revisions(store) is None
    assert store.schema_revision() == (SCHEMA_HEAD, SCHEMA_HEAD)
    assert store.watermark() == Position(7, 7)


def test_an_older_install_sharing_alembic_version_leaves_the_other_row(state_url: str) -> None:
    """Only cdc-sync's row leaves a shared alembic_version; the other application's stays."""
    store = StateStore(state_engine(state_url), "s")
    legacy(store, SCHEMA_HEAD, also=OTHER_REVISION)

    store.migrate()

    store.require_schema()
    assert shared_revisions(store) == [OTHER_REVISION]
    assert store.watermark() == Position(7, 7)


def test_revisions_are_alembics() -> None:
    """state.REVISIONS, read without alembic, lists the migration scripts oldest first."""
    scripts = ScriptDirectory.from_config(alembic_config())

    walked = [script.revision for script in scripts.walk_revisions()]

    assert tuple(reversed(walked)) == REVISIONS


def test_a_revision_from_a_newer_release_is_a_state_error(state_url: str) -> None:
    """A version table naming a revision this release does not ship says so, with the fix."""
    store = StateStore(state_engine(state_url), "s")
    store.migrate()
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE cdc_sync_alembic_version SET version_num = '0099'"))

    with pytest.raises(StateError, match="cannot be migrated: Can't locate revision") as refused:
        store.migrate()

    assert "run the cdc-sync release that migrated it" in str(refused.value)
