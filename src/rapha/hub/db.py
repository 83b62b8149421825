"""The hub's database: SQLAlchemy 2 models, the engine, and Alembic migrations.

SQLite by default, PostgreSQL in production; the same models and migrations serve both
(``rapha.hub.migrations``). The schema is only ever changed by a migration:
:func:`open_database` upgrades to the newest one before the hub serves anything.

Tables (one per concern):

* ``orgs``, ``api_keys``: identities; a key is stored only as an HMAC of its secret;
* ``operator_actions``: the hub's audit trail of every operator action;
* ``nodes``: enrolled hospital nodes, with their attestation enrolment;
* ``golden_measurements``, ``attestation_nonces``, ``credential_challenges``: what the
  attestation verifier keeps (:class:`rapha.hub.stores.DatabaseEnrollmentStore`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from rapha.errors import ConfigError, RemoteError

__all__ = [
    "ApiKey",
    "Base",
    "Database",
    "GoldenMeasurement",
    "Node",
    "Nonce",
    "OperatorAction",
    "Org",
    "Role",
    "open_database",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Role(enum.StrEnum):
    """What an organisation is to the hub."""

    COMPANY = "company"
    HOSPITAL = "hospital"
    OPERATOR = "operator"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    #: The company's wallet (deposits must come from it) or the hospital's payout address.
    wallet: Mapped[str | None] = mapped_column(String(42), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key: ``rk_<environment>_<id>_<secret>``; only HMAC(pepper, secret) is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    environment: Mapped[str] = mapped_column(String(16))
    secret_hmac: Mapped[bytes] = mapped_column(LargeBinary(32))
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class OperatorAction(Base):
    """The hub's audit trail: every operator action, who did it, to what."""

    __tablename__ = "operator_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Node(Base):
    """An enrolled hospital node and its attestation enrolment."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    environment: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    ak_public: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    ak_name: Mapped[bytes | None] = mapped_column(LargeBinary(64), default=None)
    ek_certificate: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    activated: Mapped[bool] = mapped_column(Boolean, default=False)
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attested_at: Mapped[datetime | None] = mapped_column(default=None)
    last_measurement: Mapped[str | None] = mapped_column(String(64), default=None)


class GoldenMeasurement(Base):
    """A measurement the operator allowlisted for an environment."""

    __tablename__ = "golden_measurements"
    __table_args__ = (UniqueConstraint("environment", "measurement"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment: Mapped[str] = mapped_column(String(16))
    measurement: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(String(256), default="")
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class Nonce(Base):
    """An attestation nonce: single use, with an expiry (times are epoch seconds)."""

    __tablename__ = "attestation_nonces"
    __table_args__ = (Index("ix_nonce_expiry", "expires_at"),)

    nonce: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used: Mapped[bool] = mapped_column(Boolean, default=False)


class CredentialChallenge(Base):
    """A pending TPM credential challenge: only the SHA-256 of the secret is kept."""

    __tablename__ = "credential_challenges"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    secret_sha256: Mapped[bytes] = mapped_column(LargeBinary(32))
    expires_at: Mapped[float] = mapped_column(Float)


class Database:
    """An engine and a session factory; :meth:`session` commits or rolls back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise RemoteError(f"the hub database failed: {type(exc).__name__}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_database(url: str, *, migrate: bool = True) -> Database:
    """Connect to ``url`` and, unless told otherwise, upgrade the schema to the newest.

    Raises:
        ConfigError: the URL cannot be used.
        RemoteError: the database cannot be reached or migrated.
    """
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise ConfigError(f"the hub database URL cannot be used: {type(exc).__name__}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if migrate:
        upgrade(engine)
    return Database(engine)


def upgrade(engine: Engine) -> None:
    """Run every Alembic migration not yet applied (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("rapha.hub").joinpath("migrations"))
    )
    config.attributes["connection"] = None
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise RemoteError(
            f"the hub database cannot be migrated ({type(exc).__name__}); check the URL "
            "and that the database user may create tables"
        ) from exc
