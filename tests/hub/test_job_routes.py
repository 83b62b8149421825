"""The job routes over HTTP: the SDK for companies, signed requests for nodes (issue 7)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rapha import crypto
from rapha.client import AuthenticationError, ConflictError, NodeClient, RaphaClient
from rapha.errors import UsageError
from rapha.hub.db import Role, open_database
from rapha.hub.jobs import JobService
from rapha.hub.services import SYSTEM, Hub
from support.hub import PEPPER, served

WALLET = "0x" + "ab" * 20
JOB: dict[str, Any] = {
    "kind": "train",
    "bundle_sha256": "11" * 32,
    "bundle_digest": "22" * 32,
    "requirements": {"modality": "DX", "body_part": "CHEST", "labels": [], "min_records": 10},
    "budget": 5_000_000,
    "max_price_per_record": 2_500,
    "client_job_id": "0x" + "33" * 32,
}


class Parties:
    def __init__(self, hub: Hub, base_url: str) -> None:
        for name, role in (("acme-ai", Role.COMPANY), ("other-ai", Role.COMPANY),
                           ("st-mary", Role.HOSPITAL)):  # fmt: skip
            hub.create_org(SYSTEM, name, role, wallet=WALLET if name == "acme-ai" else None)
        acme_token = hub.create_key(SYSTEM, "acme-ai", "demo").token
        self.acme_auth = {"Authorization": f"Bearer {acme_token}"}
        self.acme = RaphaClient(base_url, acme_token)
        self.other = RaphaClient(base_url, hub.create_key(SYSTEM, "other-ai", "demo").token)
        self.node_key = crypto.generate_private_key()
        hub.enroll_node(SYSTEM, node_id="st-mary-1", org_name="st-mary", environment="demo",
                        public_key_pem=crypto.public_key_pem(self.node_key.public_key()),
                        kind="dev")  # fmt: skip
        self.node = NodeClient(base_url, "st-mary-1", self.node_key)
        self.stranger = NodeClient(base_url, "st-mary-1", crypto.generate_private_key())

    def close(self) -> None:
        for client in (self.acme, self.other, self.node, self.stranger):
            client.close()


@pytest.fixture
def parties(db_url: str) -> Iterator[tuple[Parties, JobService, httpx.Client]]:
    hub = Hub(open_database(db_url), pepper=PEPPER, eligible=lambda node, _r: True)
    with served(hub) as client:
        p = Parties(hub, str(client.base_url))
        yield p, JobService(hub.db), client
        p.close()
    hub.db.close()


def _upload(p: Parties, client: httpx.Client, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    response = client.put(f"/v1/artifacts/{digest}", content=data, headers=p.acme_auth)
    assert response.status_code == 201, response.text
    return digest


def test_a_company_uploads_a_bundle_then_submits_lists_and_cancels(
    parties: tuple[Parties, JobService, httpx.Client],
) -> None:
    p, _, client = parties
    with pytest.raises(UsageError, match="upload the bundle first"):
        p.acme.submit(**JOB)
    bundle = _upload(p, client, b"a bundle .tar" * 1000)
    wrong = client.put(f"/v1/artifacts/{'0' * 64}", content=b"other bytes", headers=p.acme_auth)
    assert wrong.status_code == 400
    assert "digest" in wrong.json()["detail"].lower()

    job = p.acme.submit(**{**JOB, "bundle_sha256": bundle})

    assert job["state"] == "submitted"
    assert [j["id"] for j in p.acme.jobs()] == [job["id"]]
    assert p.other.jobs() == []
    with pytest.raises(UsageError, match="no job"):
        p.other.job(job["id"])
    with pytest.raises(UsageError, match="no job"):
        p.other.cancel(job["id"])
    assert p.acme.cancel(job["id"])["state"] == "cancelled"
    with pytest.raises(UsageError):
        p.acme.submit(**{**JOB, "budget": 0})


def test_a_node_leases_heartbeats_and_a_stale_token_is_a_conflict(
    parties: tuple[Parties, JobService, httpx.Client],
) -> None:
    p, jobs, client = parties
    job = p.acme.submit(**{**JOB, "bundle_sha256": _upload(p, client, b"bundle")})
    jobs.mark_funded(job["id"], chain_job_id="0x" + "44" * 32, payer=WALLET,
                     budget=JOB["budget"], max_price_per_record=JOB["max_price_per_record"],
                     wallet=WALLET)  # fmt: skip

    lease = p.node.claim()
    assert lease is not None
    assert lease["job_id"] == job["id"]
    assert p.node.claim() is None  # nothing else to lease
    beat = p.node.heartbeat(job["id"], lease["fencing_token"], audit_head="ab" * 32)

    assert beat["fencing_token"] == lease["fencing_token"]
    assert p.acme.job(job["id"])["state"] == "running"
    with pytest.raises(ConflictError, match="stale"):
        p.node.heartbeat(job["id"], lease["fencing_token"] - 1)
    assert (
        p.node.fail(job["id"], lease["fencing_token"], "guard_denied: extra tensor")["state"]
        == "failed"
    )


def test_node_routes_refuse_unsigned_forged_and_replayed_requests(
    parties: tuple[Parties, JobService, httpx.Client],
) -> None:
    p, _, client = parties
    from rapha.hub.auth import sign_node_request

    with pytest.raises(AuthenticationError):
        p.stranger.claim()  # signed, but not by the enrolled key
    assert client.post("/v1/node/claim").status_code == 401  # not signed at all
    headers = sign_node_request(p.node_key, node_id="st-mary-1", method="POST",
                                path="/v1/node/claim")  # fmt: skip
    assert client.post("/v1/node/claim", headers=headers).status_code == 200
    replayed = client.post("/v1/node/claim", headers=headers)
    assert replayed.status_code == 401
    assert "replayed" in replayed.json()["detail"]
    # A company key cannot act as a node, and a node signature is no API key.
    assert client.post("/v1/node/claim", headers={"Authorization": "Bearer x"}).status_code == 401
    assert client.get("/v1/jobs", headers=headers).status_code == 401
