"""The test PostgreSQL of :mod:`support.postgres`: a real server, driven through SQLAlchemy."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from support.postgres import SERVICE_USER, PostgresServer, postgres_or_skip


@pytest.fixture
def engine(pg_database: str) -> Iterator[Engine]:
    engine = create_engine(pg_database)
    try:
        yield engine
    finally:
        engine.dispose()


def _create_jobs(engine: Engine, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE jobs (id integer PRIMARY KEY, state text NOT NULL)"))
        for job_id in range(1, count + 1):
            conn.execute(text("INSERT INTO jobs VALUES (:id, 'queued')"), {"id": job_id})


def _running_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return False


def test_rows_round_trip_through_sqlalchemy(engine: Engine) -> None:
    _create_jobs(engine, 2)

    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, state FROM jobs ORDER BY id")).all()

    assert [tuple(row) for row in rows] == [(1, "queued"), (2, "queued")]
    assert engine.dialect.name == "postgresql"
    assert engine.dialect.driver == "psycopg"


def test_skip_locked_hands_a_locked_row_to_no_one_else(engine: Engine) -> None:
    _create_jobs(engine, 2)
    claim = text("SELECT id FROM jobs ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")

    with engine.connect() as first, engine.connect() as second:
        claimed_by_first = first.execute(claim).scalar_one()
        claimed_by_second = second.execute(claim).scalar_one()
        first.rollback()
        second.rollback()

    assert (claimed_by_first, claimed_by_second) == (1, 2)


def test_each_test_gets_an_empty_database_of_its_own(
    engine: Engine, postgres_server: PostgresServer
) -> None:
    with engine.connect() as conn:
        name = conn.execute(text("SELECT current_database()")).scalar_one()
        tables = conn.execute(
            text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        ).scalar_one()

    assert name.startswith("test_")
    assert name != postgres_server.database
    assert tables == 0


def test_server_runs_unprivileged_on_loopback_only(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    expected_uid = pwd.getpwnam(SERVICE_USER).pw_uid if os.geteuid() == 0 else os.geteuid()

    uids = {pid: os.stat(f"/proc/{pid}").st_uid for pid in postgres_server.processes()}
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            listen = conn.execute(text("SHOW listen_addresses")).scalar_one()
    finally:
        engine.dispose()

    assert len(uids) > 1  # the postmaster and its children (checkpointer, walwriter …)
    assert set(uids.values()) == {expected_uid}
    assert 0 not in uids.values()
    assert listen == "127.0.0.1"


def test_a_wrong_password_is_refused(postgres_server: PostgresServer) -> None:
    url = postgres_server.url.replace(postgres_server.password, "not-the-password")
    engine = create_engine(url)

    try:
        with pytest.raises(OperationalError, match="password authentication failed"):
            engine.connect()
    finally:
        engine.dispose()


def test_stop_leaves_no_process_and_no_cluster(tmp_path: Path) -> None:
    with postgres_or_skip(tmp_path) as server:
        engine = create_engine(server.url)
        conn = engine.connect()  # left open: a fast shutdown must still end its backend
        pids = server.processes()
        cluster = server.cluster
        postmaster_was_running = _running_postgres(server.pid)
    conn.invalidate()  # its server is gone; close the client side without a round trip
    conn.close()
    engine.dispose()

    assert postmaster_was_running
    assert len(pids) > 1
    assert not [pid for pid in pids if _running_postgres(pid)]
    assert server.processes() == []
    assert not cluster.exists()
    assert "database system is shut down" in server.log
