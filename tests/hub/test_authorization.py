"""The authorization matrix: every route by every role, over HTTP (issue 7).

Roles: company A (owns the job), company B, node X (holds the job's lease), node Y, the
operator, a hospital's API key, no key, a revoked key, and a replayed node signature. Each
cell names the status it must get; a route the matrix does not list fails the test, so a
new route cannot ship without its row. After the sweep, nothing any refused caller sent
may have changed the job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from rapha import crypto
from rapha.hub.app import create_app
from rapha.hub.artifacts import FilesystemArtifactStore
from rapha.hub.auth import sign_node_request
from rapha.hub.db import Role, open_database
from rapha.hub.jobs import JobService
from rapha.hub.services import SYSTEM, Hub
from support.hub import PEPPER, served

WALLET = "0x" + "ab" * 20
BUNDLE = b"bundle bytes"
BUNDLE_SHA = hashlib.sha256(BUNDLE).hexdigest()
ROLES = ("company_a", "company_b", "node_x", "node_y", "operator", "hospital", "nobody",
         "revoked", "replayed")  # fmt: skip


class World:
    def __init__(self, hub: Hub, client: httpx.Client) -> None:
        self.hub, self.client = hub, client
        for name, role in (("acme-ai", Role.COMPANY), ("other-ai", Role.COMPANY),
                           ("st-mary", Role.HOSPITAL), ("ops", Role.OPERATOR)):  # fmt: skip
            hub.create_org(SYSTEM, name, role, wallet=WALLET)
        self.tokens = {
            "company_a": hub.create_key(SYSTEM, "acme-ai", "demo").token,
            "company_b": hub.create_key(SYSTEM, "other-ai", "demo").token,
            "operator": hub.create_key(SYSTEM, "ops", "production").token,
            "hospital": hub.create_key(SYSTEM, "st-mary", "demo").token,
        }
        revoked = hub.create_key(SYSTEM, "acme-ai", "demo")
        hub.revoke_key(SYSTEM, revoked.key_id)
        self.tokens["revoked"] = revoked.token
        self.node_keys = {}
        for node in ("node_x", "node_y"):
            key = crypto.generate_private_key()
            self.node_keys[node] = key
            hub.enroll_node(SYSTEM, node_id=node, org_name="st-mary", environment="demo",
                            public_key_pem=crypto.public_key_pem(key.public_key()),
                            kind="dev")  # fmt: skip
        auth = {"Authorization": f"Bearer {self.tokens['company_a']}"}
        assert client.put(f"/v1/artifacts/{BUNDLE_SHA}", content=BUNDLE, headers=auth).is_success
        job = client.post("/v1/jobs", headers=auth, json={
            "kind": "train", "bundle_sha256": BUNDLE_SHA, "bundle_digest": "22" * 32,
            "requirements": {"modality": "DX", "body_part": "CHEST", "min_records": 10},
            "budget": 1000, "max_price_per_record": 1, "client_job_id": "0x" + "33" * 32,
        }).json()  # fmt: skip
        self.job_id: str = job["id"]
        jobs = JobService(hub.db)
        jobs.mark_funded(self.job_id, chain_job_id="0x" + "44" * 32, payer=WALLET, budget=1000,
                         max_price_per_record=1, wallet=WALLET)  # fmt: skip
        lease = jobs.claim("node_x", "demo", lambda _n, _r: True, now=0.0)
        assert lease is not None
        self.token = lease.fencing_token
        self.replayable: dict[str, dict[str, str]] = {}

    def send(self, who: str, method: str, path: str, body: Any = None) -> httpx.Response:
        content = b"" if body is None else httpx.Request("POST", "/", json=body).content
        headers: dict[str, str] = {"Content-Type": "application/json"}
        if who in self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        elif who in self.node_keys or who == "replayed":
            node = "node_x" if who == "replayed" else who
            parts = urlsplit(path)
            signed = sign_node_request(self.node_keys[node], node_id=node, method=method,
                                       path=parts.path, query=parts.query,
                                       body=content)  # fmt: skip
            if who == "replayed":  # the first use goes through; the matrix sends the copy
                self.client.request(method, path, content=content, headers={**headers, **signed})
            headers.update(signed)
        return self.client.request(method, path, content=content, headers=headers)


@pytest.fixture(scope="module")
def chain() -> Any:
    from rapha.ledger import EmbeddedChain

    return EmbeddedChain.start(accounts=1)


@pytest.fixture
def world(db_url: str, chain: Any, tmp_path: Path) -> Iterator[World]:
    from rapha.hub.artifacts import FilesystemArtifactStore
    from rapha.hub.settlement import SettlementService
    from rapha.ledger import ClearingVault

    hub = Hub(open_database(db_url), pepper=PEPPER, eligible=lambda _n, _r: False)
    artifacts = FilesystemArtifactStore(tmp_path / "artifacts")
    settlement = SettlementService(
        hub.db, JobService(hub.db), chain, ClearingVault(chain, chain.vault),
        verifier=hub.verifier, hub_key=crypto.generate_private_key(),
        operator=chain.operator, artifacts=artifacts,
    )  # fmt: skip
    with served(hub, artifacts=artifacts, settlement=settlement) as client:
        yield World(hub, client)
    hub.db.close()


OK = {200, 201, 204}
DENY_KEY = {401}
FORBIDDEN = {403}
HIDDEN = {400}  # "no job …": the same answer as for a job that does not exist
NODE_ONLY = {r: DENY_KEY for r in ROLES}
ANY_KEY = {"company_a": OK, "company_b": OK, "operator": OK, "hospital": OK}


def _row(**cells: set[int]) -> dict[str, set[int]]:
    """A row: roles not named need credentials they do not have (401)."""
    return {role: cells.get(role, DENY_KEY) for role in ROLES}


Route = tuple[str, str, Callable[[World], Any]]
MATRIX: list[tuple[Route, dict[str, set[int]]]] = [
    (("GET", "/healthz", lambda w: None), {r: OK for r in ROLES}),
    (("GET", "/metrics", lambda w: None), {r: OK for r in ROLES}),
    (("GET", "/v1/whoami", lambda w: None), _row(**ANY_KEY)),
    (("POST", "/v1/admin/orgs", lambda w: {"name": "x-org", "role": "company"}),
     _row(operator=OK, company_a=FORBIDDEN, company_b=FORBIDDEN, hospital=FORBIDDEN)),
    (("POST", "/v1/admin/keys", lambda w: {"org": "acme-ai", "environment": "demo"}),
     _row(operator=OK, company_a=FORBIDDEN, company_b=FORBIDDEN, hospital=FORBIDDEN)),
    (("DELETE", "/v1/admin/keys/{key}", lambda w: None),
     _row(operator=OK, company_a=FORBIDDEN, company_b=FORBIDDEN, hospital=FORBIDDEN)),
    (("POST", "/v1/admin/measurements",
      lambda w: {"environment": "demo", "measurement": "c" * 64}),
     _row(operator=OK, company_a=FORBIDDEN, company_b=FORBIDDEN, hospital=FORBIDDEN)),
    (("GET", "/v1/admin/nodes", lambda w: None),
     _row(operator=OK, company_a=FORBIDDEN, company_b=FORBIDDEN, hospital=FORBIDDEN)),
    (("POST", "/v1/node/profile", lambda w: {"node_id": "node_x", "profile": {
        "format": "rapha.profile/1", "k": 10, "modality": "DX", "body_part": "CHEST",
        "records": 100, "price_per_record": 1, "labels": {}}}),
     _row(hospital=OK, company_a=FORBIDDEN, company_b=FORBIDDEN, operator=FORBIDDEN)),
    (("PUT", f"/v1/artifacts/{BUNDLE_SHA}", lambda w: None),
     _row(company_a={201, 400}, company_b={201, 400}, operator=FORBIDDEN, hospital=FORBIDDEN)),
    (("POST", "/v1/jobs", lambda w: {
        "kind": "train", "bundle_sha256": BUNDLE_SHA, "bundle_digest": "22" * 32,
        "requirements": {"modality": "DX", "body_part": "CHEST", "min_records": 10},
        "budget": 5, "max_price_per_record": 1, "client_job_id": "0x" + "55" * 32}),
     _row(company_a=OK, company_b=OK, operator=FORBIDDEN, hospital=FORBIDDEN)),
    (("GET", "/v1/jobs", lambda w: None), _row(**ANY_KEY)),
    (("GET", "/v1/jobs/{job}", lambda w: None),
     _row(company_a=OK, operator=OK, company_b=HIDDEN, hospital=HIDDEN)),
    (("POST", "/v1/jobs/{job}/cancel", lambda w: None),
     # the owner may ask, but the job is already leased: a conflict, not a cancel
     _row(company_a={409}, operator={409}, company_b=HIDDEN, hospital=HIDDEN)),
    (("POST", "/v1/node/claim", lambda w: None), _row(node_x=OK, node_y=OK)),
    (("POST", "/v1/node/jobs/{job}/heartbeat", lambda w: {"fencing_token": w.token}),
     _row(node_x=OK, node_y={400})),
    (("POST", "/v1/node/jobs/{job}/delivery-nonce", lambda w: {"fencing_token": w.token}),
     _row(node_x=OK, node_y={400})),
    # a delivery without receipt or outbox: refused as malformed, whoever signs it
    (("POST", "/v1/node/jobs/{job}/deliver", lambda w: {"fencing_token": w.token}),
     _row(node_x={400}, node_y={400})),
    # results are released to the owner once settled, to nobody else ever
    (("GET", "/v1/jobs/{job}/result", lambda w: None),
     _row(company_a={409}, company_b=HIDDEN, operator=FORBIDDEN, hospital=FORBIDDEN)),
    (("GET", "/v1/jobs/{job}/outbox", lambda w: None),
     _row(company_a={409}, company_b=HIDDEN, operator=FORBIDDEN, hospital=FORBIDDEN)),
    (("GET", "/v1/chain", lambda w: None), {r: OK for r in ROLES}),  # public terms
    (("POST", "/v1/node/attestation/challenge", lambda w: None), _row(node_x=OK, node_y=OK)),
    # evidence naming node_x: malformed for node_x, another node's for node_y
    (("POST", "/v1/node/attestation", lambda w: {"evidence": {"node_id": "node_x"}}),
     _row(node_x={400}, node_y={400})),
    (("PUT", "/v1/node/me/profile", lambda w: {
        "format": "rapha.profile/1", "k": 10, "modality": "DX", "body_part": "CHEST",
        "records": 100, "price_per_record": 1, "labels": {}}),
     _row(node_x=OK, node_y=OK)),
    # a job's details and bundle: the lease holder only, under its current token
    (("GET", "/v1/node/jobs/{job}?fencing_token={token}", lambda w: None),
     _row(node_x=OK, node_y={400})),
    (("GET", "/v1/node/jobs/{job}/bundle?fencing_token={token}", lambda w: None),
     _row(node_x=OK, node_y={400})),
    (("POST", "/v1/node/jobs/{job}/fail",
      lambda w: {"fencing_token": w.token, "reason": "sandbox_failed"}),
     _row(node_y={400}, node_x={200})),
]  # fmt: skip


def test_the_matrix_covers_every_route(tmp_path: Path) -> None:
    app = create_app(
        Hub(open_database("sqlite://"), pepper=PEPPER),
        artifacts=FilesystemArtifactStore(tmp_path),
    )
    served_routes = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    listed = {
        (method, path.replace("{key}", "{key_id}").replace("{job}", "{job_id}").split("?")[0])
        for (method, path, _), _ in MATRIX
    }
    listed = {(m, "/v1/artifacts/{sha256}" if p.startswith("/v1/artifacts/") else p)
              for m, p in listed}  # fmt: skip
    assert served_routes == listed


@pytest.mark.parametrize("who", ROLES)
def test_every_route_answers_every_role_as_the_matrix_says(world: World, who: str) -> None:
    before = world.hub.operator_actions()
    job_before = JobService(world.hub.db).get(SYSTEM, world.job_id)
    for (method, template, body), row in MATRIX:
        if template.endswith("/fail"):
            continue  # ends the job: checked last, below
        key = world.hub.create_key(SYSTEM, "acme-ai", "demo").key_id
        path = template.replace("{job}", world.job_id).replace("{key}", key)
        path = path.replace("{token}", str(world.token))
        response = world.send(who, method, path, body(world))
        assert response.status_code in row[who], (who, method, path, response.text)
        if response.status_code not in OK:
            assert "error" in response.json()
        elif who not in ("company_a", "operator", "node_x"):
            # No cross-tenant read: only the owner, the operator and the lease holder see it.
            assert world.job_id not in response.text, (who, method, path)
    job_after = JobService(world.hub.db).get(SYSTEM, world.job_id)
    if who not in ("node_x", "replayed"):
        # Nobody but the lease holder changed the job (heartbeats move it to running; a
        # replayed request's original was the lease holder's own).
        assert (job_after.state, job_after.node_id) == (job_before.state, job_before.node_id)
    fail = next(row for (m, t, _), row in MATRIX if t.endswith("/fail"))
    response = world.send(who, "POST", f"/v1/node/jobs/{world.job_id}/fail",
                          {"fencing_token": world.token, "reason": "sandbox_failed"})  # fmt: skip
    assert response.status_code in fail[who], response.text
    final = JobService(world.hub.db).get(SYSTEM, world.job_id)
    assert (final.state.value == "failed") == (who in ("node_x", "replayed"))
    if who != "operator":
        # Only the operator's own admin calls reach the audit trail (plus key creation here).
        actions = world.hub.operator_actions()[len(before) :]
        assert {a["actor"] for a in actions} <= {"system/cli"}
