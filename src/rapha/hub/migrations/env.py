"""Alembic environment for the hub: runs on the connection :func:`rapha.hub.db.upgrade`
passes in (``config.attributes["connection"]``), online only."""

from __future__ import annotations

from alembic import context

import rapha.hub.jobs  # noqa: F401  (registers the jobs tables on Base.metadata)
from rapha.hub.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only rapha.hub.db.upgrade runs migrations
    raise RuntimeError("run hub migrations through rapha.hub.db.upgrade")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
