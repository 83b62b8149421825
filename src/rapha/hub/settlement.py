"""Delivery, chain watching and settlement: how a job becomes funded, delivered, settled.

:class:`SettlementService` is the hub's side of the escrow (DESIGN.md, "The flow of one
job"):

* :meth:`~SettlementService.observe_deposits` funds each ``submitted`` job whose deposit
  the vault holds under ``job_id_of(company wallet, client job id)``;
* :meth:`~SettlementService.deliver` verifies a node's delivery, in this order, and
  records it only when every check passes (a refused delivery changes nothing):

  1. the fencing token is the job's current one (:class:`~rapha.hub.jobs.StaleLeaseError`);
  2. the receipt parses, its hash and figures agree, the node signature verifies under the
     node's *enrolled* key and the settlement signature recovers to the signer the vault
     registered for the receipt's hospital (:class:`~rapha.errors.IntegrityError`);
  3. the receipt names this job, bundle, node, chain, vault, token and deposit
     (:class:`~rapha.errors.IntegrityError`);
  4. the delivery quote verifies over ``SHA-256(hub delivery nonce ‖ receipt body)``
     (:class:`~rapha.attest.AttestationError`; the nonce is spent even when a later check
     fails: ask for a new one);
  5. the uploaded outbox files are the ones the receipt lists, by name, size and SHA-256
     (:class:`~rapha.errors.IntegrityError`);

  then the hub countersigns, stores the receipt, the delivery evidence and the outbox (a
  deterministic tar of the listed files) as artifacts and moves the job to ``delivered``;
* :meth:`~SettlementService.settle` settles a delivered job on chain (the chain client
  waits for the configured depth), :meth:`~SettlementService.fail_on_chain` marks a failed
  or cancelled job failed in the vault so its payer can refund;
* :meth:`~SettlementService.release` gives the owning company the countersigned receipt
  and the outbox, once the job is ``settled`` and not before.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from rapha import crypto
from rapha.attest.evidence import AttestationError, Environment, Reason
from rapha.attest.verifier import DELIVERY, Verifier
from rapha.errors import IntegrityError, PolicyError, RaphaError, SettlementError, UsageError
from rapha.hub.artifacts import Artifact, ArtifactStore
from rapha.hub.db import Database, Node, Org, Role
from rapha.hub.jobs import Job, JobEvent, JobService, JobState, JobView, TransitionError
from rapha.hub.services import ForbiddenError, Principal
from rapha.receipt import (
    countersign,
    receipt_hash,
    settlement_signature,
    verify_result,
    write_receipt,
)

if TYPE_CHECKING:  # the ledger extra is imported only where a chain is configured
    from eth_account.signers.local import LocalAccount

    from rapha.ledger import Chain, ClearingVault, JobStatus

__all__ = [
    "MAX_OUTBOX_BYTES",
    "NotConfiguredError",
    "ResultRelease",
    "SettlementService",
]

#: Largest outbox a node delivers in one request (weights and metrics; the receipt aside).
MAX_OUTBOX_BYTES: Final = 256 << 20
#: Largest receipt or delivery-evidence document the hub stores.
_MAX_DOCUMENT_BYTES: Final = 4 << 20
#: The checks of :func:`rapha.receipt.verify_result` a delivery must pass before the hub
#: countersigns (the outbox files are compared separately, the chain is checked later).
_RECEIPT_CHECKS: Final = (
    "receipt format",
    "receipt figures",
    "receipt hash",
    "node signature",
    "settlement signature",
)


class NotConfiguredError(RaphaError):
    """The hub runs without a chain, so it cannot deliver or settle (HTTP 503)."""


class ResultRelease(BaseModel):
    """What a company receives for a settled job (also the API schema)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    receipt: dict[str, Any]
    outbox_sha256: str
    outbox_size: int


def _hex32(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


def _chunks(file: IO[bytes]) -> Iterator[bytes]:
    while chunk := file.read(1 << 20):
        yield chunk


def _tar(files: Mapping[str, bytes], into: IO[bytes]) -> None:
    """A deterministic tar of ``files``: sorted, no owners, no times, mode 0644."""
    with tarfile.open(fileobj=into, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[name]))


class SettlementService:
    """The hub's escrow and delivery operations over its database, chain and vault."""

    def __init__(
        self,
        db: Database,
        jobs: JobService,
        chain: Chain,
        vault: ClearingVault,
        *,
        verifier: Verifier,
        hub_key: Ed25519PrivateKey,
        operator: LocalAccount,
        artifacts: ArtifactStore,
    ) -> None:
        self.db = db
        self.jobs = jobs
        self.chain = chain
        self.vault = vault
        self.verifier = verifier
        self.hub_key = hub_key
        self.operator = operator
        self.artifacts = artifacts

    # --- funding ---------------------------------------------------------------------------

    def observe_deposits(self) -> list[JobView]:
        """Fund every ``submitted`` job whose deposit the vault holds; returns those funded.

        A job whose deposit is missing or wrong stays ``submitted`` with an explanation.
        Idempotent: call it from a loop.
        """
        from rapha.ledger import JobStatus, job_id_of

        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.client_job_id, Org.wallet)
                .join(Org, Org.id == Job.org_id)
                .where(Job.state == JobState.SUBMITTED.value)
                .order_by(Job.created_at)
            ).all()
        funded = []
        for job_id, client_job_id, wallet in rows:
            if wallet is None:
                self.jobs.note(job_id, "the company has no registered wallet: ask the hub "
                                       "operator to register it, then deposit from it")  # fmt: skip
                continue
            chain_job_id = job_id_of(wallet, _hex32(client_job_id))
            deposit = self.vault.job(chain_job_id)
            if deposit.status is not JobStatus.OPEN:
                seen = deposit.status.name.lower()
                self.jobs.note(
                    job_id,
                    f"no open escrow deposit from the company's registered wallet {wallet} "
                    f"for client job id {client_job_id} (the vault shows {seen}); deposit "
                    "from that wallet",
                )
                continue
            view = self.jobs.mark_funded(
                job_id,
                chain_job_id="0x" + chain_job_id.hex(),
                payer=deposit.payer,
                budget=deposit.budget,
                max_price_per_record=deposit.max_price_per_record,
                wallet=wallet,
            )
            if view.state is JobState.FUNDED:
                funded.append(view)
        return funded

    # --- delivery --------------------------------------------------------------------------

    def delivery_nonce(self, job_id: str, node_id: str, token: int) -> bytes:
        """A single-use nonce the node quotes over, with its receipt body, at delivery."""
        job = self.jobs.check_lease(job_id, node_id, token)
        if JobState(job.state) is not JobState.RUNNING:
            raise TransitionError(f"job {job_id} is {job.state}; only a running job delivers")
        return self.verifier.challenge(node_id, purpose=DELIVERY)

    def deliver(
        self,
        job_id: str,
        node_id: str,
        token: int,
        *,
        outbox: Mapping[str, bytes],
        receipt: Mapping[str, Any],
        delivery_evidence: Mapping[str, Any],
        delivery_nonce: bytes,
    ) -> JobView:
        """Verify a delivery (module docstring), countersign it and record it.

        ``outbox`` maps each outbox file name (``receipt.json`` aside) to its bytes.

        Raises:
            StaleLeaseError: the fencing token is not the job's current one.
            TransitionError: the job is not running.
            IntegrityError: the receipt or the outbox does not verify or does not match.
            AttestationError: the delivery quote does not verify.
            PolicyError: the outbox is larger than :data:`MAX_OUTBOX_BYTES`.
        """
        job = self.jobs.check_lease(job_id, node_id, token)
        state = JobState(job.state)
        if state is JobState.DELIVERED and job.receipt_hash == receipt.get("receipt_hash"):
            return self.jobs.deliver(job_id, node_id, token, receipt_hash=str(job.receipt_hash),
                                     outbox_sha256=job.outbox_sha256 or "")  # fmt: skip
        if state is not JobState.RUNNING:
            raise TransitionError(f"job {job_id} is {state.value}; only a running job delivers "
                                  "(send a heartbeat first)")  # fmt: skip
        if sum(len(data) for data in outbox.values()) > MAX_OUTBOX_BYTES:
            raise PolicyError(f"the outbox is larger than {MAX_OUTBOX_BYTES} bytes")
        node_key, hospital_wallet = self._node(node_id)
        body = self._check_receipt(receipt, node_key)
        self._check_terms(job, node_id, hospital_wallet, receipt)
        verdict = self.verifier.verify(
            delivery_evidence, environment=self._environment(job), delivery=(delivery_nonce, body)
        )
        if verdict.node_id != node_id:
            raise AttestationError(Reason.NODE_UNKNOWN, "the delivery quote is another node's")
        self._check_outbox(body, outbox)

        signed = countersign(receipt, hub_key=self.hub_key)
        with tempfile.TemporaryDirectory(prefix="rapha-delivery-") as tmp:
            stored_receipt = self._store_bytes(write_receipt(Path(tmp), signed).read_bytes())
        evidence = crypto.canonical_json(
            {"evidence": dict(delivery_evidence), "verdict": verdict.to_json()}
        )
        stored_evidence = self._store_bytes(evidence)
        with tempfile.TemporaryFile() as tar:
            _tar(outbox, tar)
            stored_outbox = self._store_file(tar)
        return self.jobs.deliver(
            job_id,
            node_id,
            token,
            receipt_hash=str(receipt["receipt_hash"]),
            outbox_sha256=stored_outbox.sha256,
            detail={
                "receipt_sha256": stored_receipt.sha256,
                "delivery_sha256": stored_evidence.sha256,
                "measurement": verdict.measurement,
            },
        )

    def _node(self, node_id: str) -> tuple[crypto.Ed25519PublicKey, str | None]:
        """The node's enrolled key and its hospital's registered payout wallet."""
        with self.db.session() as session:
            row = session.execute(
                select(Node.public_key, Org.wallet)
                .join(Org, Org.id == Node.org_id)
                .where(Node.id == node_id, Org.role == Role.HOSPITAL.value)
            ).one_or_none()
        if row is None:
            raise UsageError(f"node {node_id} is not enrolled: enrol it with rapha hub admin")
        return crypto.public_key_from_bytes(row[0]), row[1]

    @staticmethod
    def _environment(job: Job) -> Environment:
        return "demo" if job.environment == "demo" else "production"

    @staticmethod
    def _check_receipt(
        receipt: Mapping[str, Any], node_key: crypto.Ed25519PublicKey
    ) -> dict[str, Any]:
        """Check 2: the receipt's shape, hash, figures and signatures; returns its body."""
        with tempfile.TemporaryDirectory(prefix="rapha-receipt-") as tmp:
            path = write_receipt(Path(tmp), receipt)
            if path.stat().st_size > _MAX_DOCUMENT_BYTES:
                raise PolicyError(f"the receipt is larger than {_MAX_DOCUMENT_BYTES} bytes")
            checks = verify_result(Path(tmp), node_key=node_key, hub_key=None, chain=None)
        bad = [c for c in checks if c.name in _RECEIPT_CHECKS and c.ok is False]
        if bad:
            raise IntegrityError(
                "the receipt does not verify ("
                + "; ".join(f"{c.name}: {c.detail}" for c in bad)
                + "): sign it on the node with the enrolled node key and the hospital's "
                "registered settlement key"
            )
        body: dict[str, Any] = dict(receipt["body"])
        return body

    def _check_terms(
        self, job: Job, node_id: str, hospital_wallet: str | None, receipt: Mapping[str, Any]
    ) -> None:
        """Check 3: the receipt is for this job, node and deposit, on this chain and vault."""
        from rapha.ledger import JobStatus

        body = receipt["body"]
        terms = body["settlement"]
        deposit = self.vault.job(_hex32(job.chain_job_id or "0x" + "00" * 32))
        payout, signer = self.vault.hospital(_hex32(terms["hospital_id"]))
        token = str(self.chain.call(self.vault.contract.functions.token()))
        stated_signer = str(receipt["signatures"]["settlement"]["address"])
        expected: dict[str, tuple[object, object]] = {
            "job id": (body["job"]["id"], job.id),
            "job kind": (body["job"]["kind"], job.kind),
            "vault job id": (body["job"]["chain_job_id"], (job.chain_job_id or "").lower()),
            "bundle digest": (body["bundle_digest"], job.bundle_digest),
            "node id": (body["node_id"], node_id),
            "chain id": (terms["chain_id"], self.chain.chain_id),
            "vault": (terms["vault"].lower(), self.vault.address.lower()),
            "token": (terms["token"].lower(), token.lower()),
            "budget": (int(terms["budget"]), deposit.budget),
            "payout address": (terms["payout"].lower(), payout.lower()),
            "hospital wallet": (terms["payout"].lower(), (hospital_wallet or "none").lower()),
            "settlement signer": (stated_signer.lower(), signer.lower()),
        }
        wrong = [name for name, (stated, held) in expected.items() if stated != held]
        if deposit.status is not JobStatus.OPEN:
            wrong.append(f"deposit (the vault shows {deposit.status.name.lower()})")
        if int(terms["price_per_record"]) > deposit.max_price_per_record:
            wrong.append("price per record (above the deposit's maximum)")
        if wrong:
            raise IntegrityError(
                f"the receipt does not match job {job.id} and its deposit: wrong "
                + ", ".join(wrong)
                + "; build the receipt from the job's lease and the vault's terms"
            )

    @staticmethod
    def _check_outbox(body: Mapping[str, Any], outbox: Mapping[str, bytes]) -> None:
        """Check 5: the uploaded files are exactly the listed ones."""
        listed = {entry["name"]: entry for entry in body["outbox"]}
        problems = [f"{name} is not in the receipt" for name in sorted(set(outbox) - set(listed))]
        for name, entry in listed.items():
            data = outbox.get(name)
            if data is None:
                problems.append(f"{name} was not uploaded")
            elif len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append(f"{name} differs from the receipt's size and SHA-256")
        if problems:
            raise IntegrityError(
                "the uploaded outbox does not match the receipt: " + "; ".join(problems)
                + "; upload the outbox the receipt was built over"
            )  # fmt: skip

    def _store_bytes(self, data: bytes) -> Artifact:
        digest = hashlib.sha256(data).hexdigest()
        return self.artifacts.put_stream([data], expected_sha256=digest, max_bytes=len(data))

    def _store_file(self, file: IO[bytes]) -> Artifact:
        file.seek(0)
        digest = hashlib.sha256()
        for chunk in _chunks(file):
            digest.update(chunk)
        size = file.tell()
        file.seek(0)
        return self.artifacts.put_stream(
            _chunks(file), expected_sha256=digest.hexdigest(), max_bytes=size
        )

    # --- settlement ------------------------------------------------------------------------

    def settle(self, job_id: str) -> JobView:
        """Settle a ``delivered`` job on chain and mark it ``settled``.

        Raises:
            SettlementError: the vault reverted; the job stays ``delivered`` with the reason
                as its explanation, and the next call tries again.
            TransitionError: the job is not delivered.
        """
        job = self._job(job_id)
        if JobState(job.state) is JobState.SETTLED:
            return self.jobs.settle(job_id, tx_hash="")
        if JobState(job.state) is not JobState.DELIVERED or job.chain_job_id is None:
            raise TransitionError(f"job {job_id} is {job.state}; only a delivered job settles")
        receipt = self._delivered_receipt(job_id)
        body = receipt["body"]
        chain_job_id = _hex32(job.chain_job_id)
        digest = receipt_hash(body)
        held = self.vault.job(chain_job_id)
        tx_hash = self.vault.settlement_tx(chain_job_id) if held.receipt_hash == digest else None
        if tx_hash is None:  # not settled yet (a settled vault job is found by its receipt)
            try:
                result = self.vault.settle(
                    self.operator,
                    chain_job_id,
                    hospital_id=_hex32(body["settlement"]["hospital_id"]),
                    records=body["records"],
                    price_per_record=int(body["settlement"]["price_per_record"]),
                    receipt_hash=digest,
                    node_signature=settlement_signature(receipt),
                )
            except SettlementError as exc:
                self.jobs.note(job_id, f"settlement reverted ({exc.reason}); it is retried")
                raise
            tx_hash = result.tx_hash
        return self.jobs.settle(job_id, tx_hash="0x" + tx_hash.hex())

    def fail_on_chain(self, job_id: str) -> JobStatus:
        """Mark a ``failed`` or ``cancelled`` job failed in the vault, so its payer can
        refund; returns the vault's status for the job afterwards.

        Idempotent: a vault job already failed or refunded, or never deposited, is left as
        it is.
        """
        from rapha.ledger import JobStatus

        job = self._job(job_id)
        if JobState(job.state) not in (JobState.FAILED, JobState.CANCELLED):
            raise TransitionError(f"job {job_id} is {job.state}; only a failed or cancelled "
                                  "job is marked failed on chain")  # fmt: skip
        chain_job_id = self._chain_job_id(job)
        if chain_job_id is None:
            return JobStatus.NONE
        status = self.vault.job(chain_job_id).status
        if status is JobStatus.OPEN:
            self.vault.mark_failed(self.operator, chain_job_id)
            return JobStatus.FAILED
        return status

    def _chain_job_id(self, job: Job) -> bytes | None:
        from rapha.ledger import job_id_of

        if job.chain_job_id is not None:
            return _hex32(job.chain_job_id)
        with self.db.session() as session:
            org = session.get(Org, job.org_id)
            wallet = org.wallet if org is not None else None
        return None if wallet is None else job_id_of(wallet, _hex32(job.client_job_id))

    def _job(self, job_id: str) -> Job:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise UsageError(f"no job {job_id}")
            return job

    def _delivery(self, job_id: str) -> dict[str, Any]:
        """The detail of the job's last ``delivered`` event (where its artifacts are)."""
        with self.db.session() as session:
            detail = session.execute(
                select(JobEvent.detail)
                .where(JobEvent.job_id == job_id, JobEvent.state == JobState.DELIVERED.value)
                .order_by(JobEvent.id.desc())
                .limit(1)
            ).scalar_one_or_none()
        if detail is None or "receipt_sha256" not in detail:
            raise UsageError(f"job {job_id} has no verified delivery")
        return dict(detail)

    def _delivered_receipt(self, job_id: str) -> dict[str, Any]:
        with self.artifacts.open(self._delivery(job_id)["receipt_sha256"]) as file:
            receipt: dict[str, Any] = json.loads(file.read(_MAX_DOCUMENT_BYTES + 1))
        return receipt

    # --- release ---------------------------------------------------------------------------

    def release(self, principal: Principal, job_id: str) -> ResultRelease:
        """The countersigned receipt and the outbox artifact, for the owning company, once
        the job is ``settled``.

        Raises:
            ForbiddenError: the caller is not a company.
            UsageError: the company does not own such a job.
            TransitionError: the job is not settled yet.
        """
        if principal.role is not Role.COMPANY:
            raise ForbiddenError("results are released only to the company that owns the job")
        view = self.jobs.get(principal, job_id)  # "no job" for anyone else's
        if view.state is not JobState.SETTLED:
            raise TransitionError(
                f"results are released once the job is settled; job {job_id} is "
                f"{view.state.value}: wait for settlement"
            )
        job = self._job(job_id)
        outbox = job.outbox_sha256 or ""
        return ResultRelease(
            job_id=job_id,
            receipt=self._delivered_receipt(job_id),
            outbox_sha256=outbox,
            outbox_size=self.artifacts.size(outbox),
        )
