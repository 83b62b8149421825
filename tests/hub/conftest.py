"""Fixtures for the hub's tests: a real PostgreSQL per test session (per xdist worker).

``postgres_server`` starts one throwaway cluster (:mod:`support.postgres`) the first time a
test asks for it and stops it at the end of the session; ``postgres_url`` is the SQLAlchemy
URL of its default database. ``pg_database`` gives each test a fresh, uniquely named
database and drops it afterwards, so tests never see each other's rows or tables.

``db_url`` runs a test twice, on a SQLite file and on a fresh PostgreSQL database, and
``hub`` opens a :class:`~rapha.hub.services.Hub` on it (pepper :data:`support.hub.PEPPER`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapha.hub.db import open_database
from rapha.hub.services import Hub
from support.hub import PEPPER
from support.postgres import PostgresServer, postgres_or_skip


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL on loopback for the session, run as a dedicated user under root."""
    with postgres_or_skip(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg://…`` URL of the session cluster's default database."""
    return postgres_server.url


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of an empty database created for this test alone, dropped after it."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty hub database: a SQLite file, then a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
def hub(db_url: str) -> Iterator[Hub]:
    """A hub on a freshly migrated ``db_url``."""
    hub = Hub(open_database(db_url), pepper=PEPPER)
    yield hub
    hub.db.close()
