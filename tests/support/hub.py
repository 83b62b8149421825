"""Helpers for the hub's tests: the app under a real uvicorn on loopback, and many nodes.

:data:`PEPPER` is the API-key pepper the hub fixtures (``tests/hub/conftest.py``) use, so a
test can open a second :class:`~rapha.hub.services.Hub` on the same database.
:func:`served` runs the app on a loopback port for tests that speak HTTP to it;
:func:`register_synthetic_nodes` bulk-inserts thousands of nodes with dataset profiles
(the matcher's scale test, ``bench/matching.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import insert

from rapha.hub.app import create_app
from rapha.hub.artifacts import FilesystemArtifactStore
from rapha.hub.db import Database, Node, Org, Role
from rapha.hub.profiles import NodeLabelCount, NodeProfile
from rapha.hub.services import Hub
from support.orthanc import free_port

__all__ = ["BODY_PARTS", "FINDINGS", "MODALITIES", "PEPPER", "register_synthetic_nodes", "served"]

PEPPER = "test-pepper-" + "x" * 40


@contextmanager
def served(hub: Hub, **app_options: Any) -> Iterator[httpx.Client]:
    """The hub's app under a real uvicorn on a loopback port, and a client for it.

    ``app_options`` go to :func:`rapha.hub.app.create_app` (``artifacts``, ``settlement``);
    without ``artifacts``, a temporary store removed afterwards.
    """
    with contextlib.ExitStack() as stack:
        if "artifacts" not in app_options:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hub-art-")))
            app_options["artifacts"] = FilesystemArtifactStore(scratch)
        yield stack.enter_context(_served(create_app(hub, **app_options)))


@contextmanager
def _served(app: Any) -> Iterator[httpx.Client]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- many nodes with profiles, for the matcher's scale test and bench/matching.py --------

MODALITIES = ("CR", "DX", "CT", "MR")
BODY_PARTS = ("CHEST", "ABDOMEN", "HEAD", "KNEE", "SPINE")
FINDINGS = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "emphysema",
    "fibrosis", "fracture", "hernia", "infiltration", "mass", "nodule", "pneumonia",
    "pneumothorax",
)  # fmt: skip


def register_synthetic_nodes(
    db: Database, count: int, *, seed: int = 7, now: datetime | None = None
) -> None:
    """Insert ``count`` nodes of one hospital, each with a profile and 3 to 8 labels.

    Deterministic for a ``seed``: a tenth are demo nodes, one in twenty is not activated,
    one in ten attested two days before ``now`` (the rest within the hour), a tenth of the
    label counts are suppressed (stored as 0). Bulk inserts: a few statements per table.
    """
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    org_id = f"org{seed:013d}"
    nodes: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    for i in range(count):
        node_id = f"node-{seed}-{i:06d}"
        stale = rng.random() < 0.1
        attested = now - (timedelta(days=2) if stale else timedelta(minutes=rng.randrange(60)))
        nodes.append(
            {
                "id": node_id,
                "org_id": org_id,
                "public_key": hashlib.sha256(node_id.encode()).digest(),
                "environment": "demo" if rng.random() < 0.1 else "production",
                "kind": "dev",
                "activated": rng.random() >= 0.05,
                "last_attested_at": attested,
            }
        )
        records = rng.randrange(50, 20_000)
        profiles.append(
            {
                "node_id": node_id,
                "modality": rng.choice(MODALITIES),
                "body_part": rng.choice(BODY_PARTS),
                "records": records,
                "price_per_record": rng.randrange(100, 100_000),
                "published_at": now,
                "profile": {},
            }
        )
        for finding in rng.sample(FINDINGS, rng.randrange(3, 9)):
            positives = 0 if rng.random() < 0.1 else rng.randrange(10, records // 3 + 11)
            labels.append(
                {"node_id": node_id, "label": finding, "records": records, "positives": positives}
            )
    with db.session() as session:
        session.add(Org(id=org_id, name=f"hospital-{seed}", role=Role.HOSPITAL.value))
        session.flush()
        for model, rows in ((Node, nodes), (NodeProfile, profiles), (NodeLabelCount, labels)):
            session.execute(insert(model), rows)
