"""Delivery, chain watching and settlement on a real EVM and the hub's databases (issue 7).

One embedded chain (py-evm) per module, rolled back to a snapshot after every test; the hub
database is SQLite and a real PostgreSQL (``db_url``). A dev-attested demo node claims a
funded job, builds and signs a real receipt, quotes over the hub's delivery nonce and
delivers; the hub verifies, countersigns, settles and releases.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from rapha import crypto
from rapha.attest import AttestationError, DevProvider, Event, delivery_nonce
from rapha.attest.measure import digest_of
from rapha.client import ConflictError, NodeClient, RaphaClient
from rapha.errors import IntegrityError, SettlementError, UsageError
from rapha.hub.artifacts import FilesystemArtifactStore
from rapha.hub.db import Role, open_database
from rapha.hub.jobs import JobService, JobState, StaleLeaseError, TransitionError
from rapha.hub.services import SYSTEM, Hub, Principal
from rapha.hub.settlement import SettlementService
from rapha.ledger import ClearingVault, EmbeddedChain, JobStatus
from rapha.receipt import (
    SettlementTerms,
    build_receipt,
    failed,
    receipt_hash,
    settlement_signature,
    sign_receipt,
    verify_result,
    write_receipt,
)
from support.hub import PEPPER, served

REGISTRY_DELAY, REFUND_DELAY = 60, 3600
BUDGET, PRICE, RECORDS = 5_000_000, 2_500, 1_200  # 3,000,000 due, 2,000,000 back
HOSPITAL_ID = keccak(text="st-mary")
EVENTS = (Event("rapha", "11" * 32), Event("sandbox_profile", "33" * 32))
MEASUREMENT = digest_of([e.to_json() for e in EVENTS])
NODE_ID = "st-mary-1"
JOB: dict[str, Any] = {
    "kind": "train",
    "bundle_sha256": "11" * 32,
    "bundle_digest": "22" * 32,
    "requirements": {"modality": "DX", "body_part": "CHEST", "labels": [], "min_records": 10},
    "budget": BUDGET,
    "max_price_per_record": PRICE,
}


@dataclass(frozen=True)
class Ledger:
    chain: EmbeddedChain
    vault: ClearingVault
    payer: LocalAccount
    other_payer: LocalAccount
    payout: LocalAccount
    signer: LocalAccount

    def balance(self, address: str) -> int:
        return int(self.chain.call(self.chain.token.functions.balanceOf(address)))


@pytest.fixture(scope="module")
def module_ledger() -> Ledger:
    chain = EmbeddedChain.start(
        accounts=3, registry_delay=REGISTRY_DELAY, refund_delay=REFUND_DELAY
    )
    vault = ClearingVault(chain, chain.vault)
    payer, other_payer, payout = chain.accounts
    signer: LocalAccount = Account.from_key(keccak(text="st-mary settlement key"))
    vault.propose_hospital(chain.owner, HOSPITAL_ID, payout=payout.address, signer=signer.address)
    chain.time_travel(REGISTRY_DELAY + 1)
    return Ledger(chain, vault, payer, other_payer, payout, signer)


@pytest.fixture
def ledger(module_ledger: Ledger) -> Iterator[Ledger]:
    snapshot = module_ledger.chain.snapshot()
    yield module_ledger
    module_ledger.chain.revert(snapshot)


@dataclass(frozen=True)
class Delivery:
    """Everything a node sends to deliver one job (the arguments of ``deliver``)."""

    job_id: str
    token: int
    outbox: dict[str, bytes]
    receipt: dict[str, Any]
    evidence: dict[str, Any]
    nonce: bytes


class World:
    """A hub with a company (wallet: the chain's payer), a hospital and its dev node."""

    def __init__(self, db_url: str, ledger: Ledger, tmp_path: Path) -> None:
        self.ledger = ledger
        self.tmp_path = tmp_path
        self.hub = Hub(open_database(db_url), pepper=PEPPER, eligible=lambda _n, _r: True)
        self.db = self.hub.db
        self.hub.create_org(SYSTEM, "acme-ai", Role.COMPANY, wallet=ledger.payer.address)
        self.hub.create_org(SYSTEM, "other-ai", Role.COMPANY, wallet=ledger.other_payer.address)
        self.hub.create_org(SYSTEM, "st-mary", Role.HOSPITAL, wallet=ledger.payout.address)
        self.acme_token = self.hub.create_key(SYSTEM, "acme-ai", "demo").token
        self.other_token = self.hub.create_key(SYSTEM, "other-ai", "demo").token
        self.acme = self.hub.authenticate(self.acme_token)
        self.other = self.hub.authenticate(self.other_token)
        self.node_key = crypto.generate_private_key()
        self.hub.enroll_node(
            SYSTEM,
            node_id=NODE_ID,
            org_name="st-mary",
            environment="demo",
            public_key_pem=crypto.public_key_pem(self.node_key.public_key()),
            kind="dev",
        )
        self.hub.allow_measurement(SYSTEM, "demo", MEASUREMENT)
        self.hub_key = crypto.generate_private_key()
        self.artifacts = FilesystemArtifactStore(tmp_path / "artifacts")
        self.jobs = JobService(self.db)
        self.settlement = SettlementService(
            self.db,
            self.jobs,
            ledger.chain,
            ledger.vault,
            verifier=self.hub.verifier,
            hub_key=self.hub_key,
            operator=ledger.chain.operator,
            artifacts=self.artifacts,
        )

    def close(self) -> None:
        self.db.close()

    # --- the company ------------------------------------------------------------------------

    def submit(self, principal: Principal | None = None) -> tuple[str, bytes]:
        client_job_id = keccak(os.urandom(16))
        view = self.jobs.submit(
            principal or self.acme, **JOB, client_job_id="0x" + client_job_id.hex()
        )
        return view.id, client_job_id

    def deposit(
        self, client_job_id: bytes, *, payer: LocalAccount | None = None, budget: int = BUDGET
    ) -> bytes:
        chain_job_id, _, _ = self.ledger.vault.deposit(
            payer or self.ledger.payer,
            client_job_id,
            budget=budget,
            max_price_per_record=PRICE,
            token=self.ledger.chain.token,
        )
        return chain_job_id

    def funded(self) -> tuple[str, bytes]:
        job_id, client_job_id = self.submit()
        chain_job_id = self.deposit(client_job_id)
        assert [v.id for v in self.settlement.observe_deposits()] == [job_id]
        return job_id, chain_job_id

    # --- the node ---------------------------------------------------------------------------

    def running(self) -> tuple[str, bytes, int]:
        job_id, chain_job_id = self.funded()
        lease = self.jobs.claim(NODE_ID, "demo", lambda _n, _r: True, now=time.time())
        assert lease is not None
        assert lease.job_id == job_id
        self.jobs.heartbeat(job_id, NODE_ID, lease.fencing_token, now=time.time())
        return job_id, chain_job_id, lease.fencing_token

    def receipt_body(self, job_id: str, chain_job_id: bytes, outbox: Path) -> dict[str, Any]:
        provider = DevProvider(self.node_key)
        public = crypto.public_key_bytes(self.node_key.public_key())
        assignment = provider.evidence(
            node_id=NODE_ID,
            node_public_key=public,
            nonce=self.hub.verifier.challenge(NODE_ID),
            measurement=MEASUREMENT,
            events=EVENTS,
        )
        verdict = self.hub.attest(assignment, environment="demo")
        terms = SettlementTerms(
            chain_id=self.ledger.chain.chain_id,
            vault=self.ledger.vault.address,
            token=str(self.ledger.chain.token.address),
            chain_job_id=chain_job_id,
            hospital_id=HOSPITAL_ID,
            payout=self.ledger.payout.address,
            budget=BUDGET,
            price_per_record=PRICE,
        )
        started = datetime.now(UTC)
        return build_receipt(
            job_id=job_id,
            kind="train",
            bundle_digest="22" * 32,
            policy_digests={"hospital": "aa" * 32, "job": "bb" * 32},
            view_digest="cc" * 32,
            records=RECORDS,
            terms=terms,
            outbox=outbox,
            attestation={"assignment": assignment.to_json(), "verdict": verdict.to_json()},
            audit_head="dd" * 32,
            node_id=NODE_ID,
            hub_id="hub-demo",
            started=started,
            finished=started + timedelta(minutes=3),
        )

    def quote(self, hub_nonce: bytes, body: dict[str, Any]) -> dict[str, Any]:
        public = crypto.public_key_bytes(self.node_key.public_key())
        return (
            DevProvider(self.node_key)
            .evidence(
                node_id=NODE_ID,
                node_public_key=public,
                nonce=delivery_nonce(hub_nonce, body),
                measurement=MEASUREMENT,
                events=EVENTS,
            )
            .to_json()
        )

    def prepare(self, *, node_key: crypto.Ed25519PrivateKey | None = None) -> Delivery:
        """A running job and a valid delivery for it (signed with ``node_key`` if given)."""
        job_id, chain_job_id, token = self.running()
        outbox = self.tmp_path / f"outbox-{job_id}"
        outbox.mkdir()
        (outbox / "metrics.json").write_bytes(crypto.canonical_json({"auroc": 0.91}))
        (outbox / "weights.safetensors").write_bytes(os.urandom(4096))
        body = self.receipt_body(job_id, chain_job_id, outbox)
        receipt = sign_receipt(
            body, node_key=node_key or self.node_key, settlement_key=bytes(self.ledger.signer.key)
        )
        nonce = self.settlement.delivery_nonce(job_id, NODE_ID, token)
        files = {p.name: p.read_bytes() for p in sorted(outbox.iterdir())}
        return Delivery(job_id, token, files, receipt, self.quote(nonce, body), nonce)

    def deliver(self, d: Delivery) -> Any:
        return self.settlement.deliver(
            d.job_id,
            NODE_ID,
            d.token,
            outbox=d.outbox,
            receipt=d.receipt,
            delivery_evidence=d.evidence,
            delivery_nonce=d.nonce,
        )


@pytest.fixture
def world(db_url: str, ledger: Ledger, tmp_path: Path) -> Iterator[World]:
    w = World(db_url, ledger, tmp_path)
    yield w
    w.close()


def _unpack(world: World, outbox_sha256: str, receipt: dict[str, Any], into: Path) -> Path:
    into.mkdir()
    with world.artifacts.open(outbox_sha256) as file, tarfile.open(fileobj=file) as tar:
        tar.extractall(into, filter="data")
    write_receipt(into, receipt)
    return into


# --- funding -------------------------------------------------------------------------------


def test_a_deposit_from_the_company_wallet_funds_the_job_once(world: World) -> None:
    job_id, client_job_id = world.submit()
    assert world.settlement.observe_deposits() == []
    assert "no open escrow deposit" in world.jobs.get(world.acme, job_id).explanation

    chain_job_id = world.deposit(client_job_id)
    funded = world.settlement.observe_deposits()

    assert [(v.id, v.state, v.chain_job_id) for v in funded] == [
        (job_id, JobState.FUNDED, "0x" + chain_job_id.hex())
    ]
    assert world.jobs.get(world.acme, job_id).explanation == ""
    assert world.settlement.observe_deposits() == []  # idempotent


def test_a_deposit_from_another_wallet_or_too_small_does_not_fund(world: World) -> None:
    elsewhere, client_job_id = world.submit()
    world.deposit(client_job_id, payer=world.ledger.other_payer)
    short, short_client_job_id = world.submit()
    world.deposit(short_client_job_id, budget=BUDGET - 1)

    assert world.settlement.observe_deposits() == []

    wrong_wallet = world.jobs.get(world.acme, elsewhere)
    assert wrong_wallet.state is JobState.SUBMITTED
    assert f"registered wallet {world.ledger.payer.address}" in wrong_wallet.explanation
    too_small = world.jobs.get(world.acme, short)
    assert too_small.state is JobState.SUBMITTED
    assert f"the deposit holds {BUDGET - 1}, the job needs {BUDGET}" in too_small.explanation


# --- delivery, settlement, release ---------------------------------------------------------


def test_a_verified_delivery_settles_70_30_and_is_released_to_its_owner(
    world: World, tmp_path: Path
) -> None:
    d = world.prepare()
    ledger = world.ledger

    delivered = world.deliver(d)
    assert delivered.state is JobState.DELIVERED
    assert delivered.receipt_hash == d.receipt["receipt_hash"]
    with pytest.raises(TransitionError, match="released once the job is settled"):
        world.settlement.release(world.acme, d.job_id)

    settled = world.settlement.settle(d.job_id)

    assert settled.state is JobState.SETTLED
    chain_job_id = bytes.fromhex(d.receipt["body"]["job"]["chain_job_id"][2:])
    split = ledger.vault.split(chain_job_id)
    due = RECORDS * PRICE
    assert (split.hospital_amount, split.treasury_amount, split.payer_refund) == (
        due * 70 // 100,
        due * 30 // 100,
        BUDGET - due,
    )
    assert ledger.vault.credit(ledger.payout.address) == due * 70 // 100
    assert ledger.vault.credit(ledger.chain.treasury.address) == due * 30 // 100
    assert ledger.vault.credit(ledger.payer.address) == BUDGET - due
    assert world.settlement.settle(d.job_id).state is JobState.SETTLED  # idempotent
    with pytest.raises(UsageError, match="no job"):
        world.settlement.release(world.other, d.job_id)

    released = world.settlement.release(world.acme, d.job_id)
    result = _unpack(world, released.outbox_sha256, released.receipt, tmp_path / "result")
    checks = verify_result(
        result,
        node_key=world.node_key.public_key(),
        hub_key=world.hub_key.public_key(),
        chain=ledger.chain,
    )

    assert not failed(checks), [(c.name, c.detail) for c in failed(checks)]
    assert {c.name for c in checks} >= {"hub countersignature", "on-chain settlement"}


def _stranger_signed(world: World) -> Delivery:
    return world.prepare(node_key=crypto.generate_private_key())


def _tampered_outbox(world: World) -> Delivery:
    d = world.prepare()
    weights = bytearray(d.outbox["weights.safetensors"])
    weights[100] ^= 0x01
    return replace(d, outbox={**d.outbox, "weights.safetensors": bytes(weights)})


def _quote_over_another_body(world: World) -> Delivery:
    d = world.prepare()
    other = {**d.receipt["body"], "records": RECORDS - 1}
    return replace(d, evidence=world.quote(d.nonce, other))


def _stale_token(world: World) -> Delivery:
    d = world.prepare()
    return replace(d, token=d.token - 1)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (_stranger_signed, IntegrityError, "node signature: signed by a different key"),
        (_tampered_outbox, IntegrityError, "weights.safetensors differs from the receipt"),
        (_quote_over_another_body, AttestationError, "binding_mismatch"),
        (_stale_token, StaleLeaseError, "stale"),
    ],
    ids=["non-enrolled-key", "tampered-outbox", "quote-over-another-body", "stale-token"],
)
def test_a_bad_delivery_is_refused_naming_the_check_and_changes_nothing(
    world: World,
    make: Callable[[World], Delivery],
    error: type[Exception],
    message: str,
) -> None:
    d = make(world)
    before = world.jobs.events(d.job_id)

    with pytest.raises(error, match=message):
        world.deliver(d)

    job = world.jobs.get(world.acme, d.job_id)
    assert job.state is JobState.RUNNING
    assert job.receipt_hash is None
    assert world.jobs.events(d.job_id) == before


def test_a_reverted_settlement_leaves_the_job_delivered_with_the_reason(world: World) -> None:
    d = world.prepare()
    world.deliver(d)
    world.ledger.chain.time_travel(REFUND_DELAY + 1)  # the deposit's deadline passes

    with pytest.raises(SettlementError, match="past deadline"):
        world.settlement.settle(d.job_id)

    job = world.jobs.get(world.acme, d.job_id)
    assert job.state is JobState.DELIVERED
    assert "job past deadline" in job.explanation


def test_a_settlement_already_on_chain_is_recorded_with_its_transaction(world: World) -> None:
    # The hub settled on chain, then stopped before it wrote the job down.
    d = world.prepare()
    world.deliver(d)
    body = d.receipt["body"]
    sent = world.ledger.vault.settle(
        world.ledger.chain.operator,
        bytes.fromhex(body["job"]["chain_job_id"][2:]),
        hospital_id=HOSPITAL_ID,
        records=RECORDS,
        price_per_record=PRICE,
        receipt_hash=receipt_hash(body),
        node_signature=settlement_signature(d.receipt),
    )

    assert world.settlement.settle(d.job_id).state is JobState.SETTLED
    assert world.jobs.events(d.job_id)[-1]["detail"] == {"tx_hash": "0x" + sent.tx_hash.hex()}


def test_a_failed_job_is_marked_failed_on_chain_and_the_payer_refunds(world: World) -> None:
    ledger = world.ledger
    before = ledger.balance(ledger.payer.address)
    job_id, chain_job_id, token = world.running()
    with pytest.raises(TransitionError, match="only a failed or cancelled"):
        world.settlement.fail_on_chain(job_id)
    world.jobs.fail(job_id, "guard_denied: extra tensor", node_id=NODE_ID, token=token)

    assert world.settlement.fail_on_chain(job_id) is JobStatus.FAILED
    assert world.settlement.fail_on_chain(job_id) is JobStatus.FAILED  # idempotent
    ledger.vault.refund(ledger.payer, chain_job_id)
    assert world.settlement.fail_on_chain(job_id) is JobStatus.REFUNDED

    assert ledger.vault.credit(ledger.payer.address) == BUDGET
    ledger.vault.withdraw(ledger.payer)
    assert ledger.balance(ledger.payer.address) == before


# --- over HTTP -----------------------------------------------------------------------------


def test_the_routes_deliver_and_release_over_http(world: World) -> None:
    job_id, chain_job_id, token = world.running()
    with served(world.hub) as bare:
        unconfigured = bare.get(
            f"/v1/jobs/{job_id}/result", headers={"Authorization": f"Bearer {world.acme_token}"}
        )
        assert unconfigured.status_code == 503
        assert "settlement is not configured" in unconfigured.json()["detail"]
    with served(world.hub, artifacts=world.artifacts, settlement=world.settlement) as client:
        base = str(client.base_url)
        node = NodeClient(base, NODE_ID, world.node_key)
        acme, other = RaphaClient(base, world.acme_token), RaphaClient(base, world.other_token)
        outbox = world.tmp_path / "outbox"
        outbox.mkdir()
        (outbox / "metrics.json").write_bytes(crypto.canonical_json({"auroc": 0.9}))
        body = world.receipt_body(job_id, chain_job_id, outbox)
        receipt = sign_receipt(
            body, node_key=world.node_key, settlement_key=bytes(world.ledger.signer.key)
        )
        path = f"/v1/node/jobs/{job_id}"

        nonce = bytes.fromhex(
            node.request("POST", f"{path}/delivery-nonce", {"fencing_token": token})["nonce"]
        )
        files = {"metrics.json": base64.b64encode((outbox / "metrics.json").read_bytes()).decode()}
        delivered = node.request(
            "POST",
            f"{path}/deliver",
            {
                "fencing_token": token,
                "receipt": receipt,
                "files": files,
                "delivery_evidence": world.quote(nonce, body),
                "delivery_nonce": nonce.hex(),
            },
        )
        assert delivered["state"] == "delivered"
        chunked = client.post(f"{path}/deliver", content=iter([b"{}"]))  # no Content-Length
        assert chunked.status_code == 400
        assert "Content-Length" in chunked.json()["detail"]
        with pytest.raises(ConflictError, match="released once the job is settled"):
            acme.request("GET", f"/v1/jobs/{job_id}/result")
        world.settlement.settle(job_id)

        released = acme.request("GET", f"/v1/jobs/{job_id}/result")
        tar = client.get(
            f"/v1/jobs/{job_id}/outbox", headers={"Authorization": f"Bearer {world.acme_token}"}
        )
        with pytest.raises(UsageError, match="no job"):
            other.request("GET", f"/v1/jobs/{job_id}/result")
        for c in (node, acme, other):
            c.close()

    assert released["receipt"]["receipt_hash"] == receipt_hash(body).hex()
    assert "hub" in released["receipt"]["signatures"]
    assert hashlib.sha256(tar.content).hexdigest() == released["outbox_sha256"]
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        assert archive.getnames() == ["metrics.json"]
