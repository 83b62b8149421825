"""The hub's migrations on SQLite and on a real PostgreSQL: a fresh database reaches the
newest revision, twice is harmless, and the migrated schema is exactly what the models say.

The last check guards every migration: it compares the models of every module of
``rapha.hub`` with the schema Alembic built, so a model changed without a migration (or a
migration that differs from its model) fails here.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import resources

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text

import rapha.hub
from rapha.hub.db import Base, open_database


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(resources.files("rapha.hub").joinpath("migrations")))


def _every_model() -> MetaData:
    """``Base.metadata`` with the tables of every hub module registered on it."""
    for module in pkgutil.iter_modules(rapha.hub.__path__):
        if module.name != "migrations":
            importlib.import_module(f"rapha.hub.{module.name}")
    return Base.metadata


def test_a_fresh_database_reaches_the_newest_revision_idempotently(db_url: str) -> None:
    first = open_database(db_url)
    second = open_database(db_url)  # a second hub process starting on the same database
    tables = set(inspect(second.engine).get_table_names())
    with second.engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    first.close()
    second.close()
    applied = {script.revision for script in _scripts().walk_revisions()}

    assert {"orgs", "api_keys", "operator_actions", "nodes", "attestation_nonces"} <= tables
    assert {"node_profiles", "node_label_counts"} <= tables
    assert version == _scripts().get_current_head()
    assert {"0001", "0002"} <= applied


def test_the_migrated_schema_is_what_the_models_say(db_url: str) -> None:
    db = open_database(db_url)
    metadata = _every_model()

    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    db.close()

    assert differences == []
