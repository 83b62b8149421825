"""Fixtures for the hub's tests: a real PostgreSQL per test session (per xdist worker).

``postgres_server`` starts one throwaway cluster (:mod:`support.postgres`) the first time a
test asks for it and stops it at the end of the session; ``postgres_url`` is the SQLAlchemy
URL of its default database. ``pg_database`` gives each test a fresh, uniquely named
database and drops it afterwards, so tests never see each other's rows or tables.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

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
