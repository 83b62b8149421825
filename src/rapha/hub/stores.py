"""The attestation verifier's stores on the hub's database.

:class:`DatabaseEnrollmentStore` implements :class:`rapha.attest.store.EnrollmentStore`
and :class:`DatabaseAllowlist` implements :class:`rapha.attest.store.MeasurementAllowlist`,
so the verifier the hub runs keeps its enrolments, challenges, nonces and golden
measurements in the same database as everything else. Consuming a nonce is one
conditional ``UPDATE``, atomic across hub processes.
"""

from __future__ import annotations

from sqlalchemy import select, update

from rapha.attest.evidence import Environment, EvidenceKind
from rapha.attest.store import Enrollment, NonceRecord
from rapha.hub.db import CredentialChallenge, Database, GoldenMeasurement, Node, Nonce

__all__ = ["DatabaseAllowlist", "DatabaseEnrollmentStore"]


class DatabaseEnrollmentStore:
    """Enrolments live in ``nodes``: the service layer creates a node's row (with its
    hospital) before the verifier enrols it, so :meth:`put` only ever updates."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, node_id: str) -> Enrollment | None:
        with self.db.session() as session:
            node = session.get(Node, node_id)
            if node is None:
                return None
            environment: Environment = "demo" if node.environment == "demo" else "production"
            kind: EvidenceKind = (
                "tpm2" if node.kind == "tpm2" else "sgx-dcap" if node.kind == "sgx-dcap" else "dev"
            )
            return Enrollment(
                node_id=node.id,
                node_public_key=node.public_key,
                environment=environment,
                kind=kind,
                ak_public=node.ak_public,
                ak_name=node.ak_name,
                ek_certificate=node.ek_certificate,
                activated=node.activated,
            )

    def put(self, enrollment: Enrollment) -> None:
        with self.db.session() as session:
            node = session.get(Node, enrollment.node_id)
            if node is None:
                raise LookupError(f"node {enrollment.node_id} has no row: create it first")
            node.public_key = enrollment.node_public_key
            node.environment = enrollment.environment
            node.kind = enrollment.kind
            node.ak_public = enrollment.ak_public
            node.ak_name = enrollment.ak_name
            node.ek_certificate = enrollment.ek_certificate
            node.activated = enrollment.activated

    def put_challenge(self, node_id: str, secret_sha256: bytes, expires_at: float) -> None:
        with self.db.session() as session:
            session.merge(
                CredentialChallenge(
                    node_id=node_id, secret_sha256=secret_sha256, expires_at=expires_at
                )
            )

    def take_challenge(self, node_id: str) -> tuple[bytes, float] | None:
        with self.db.session() as session:
            row = session.get(CredentialChallenge, node_id, with_for_update=True)
            if row is None:
                return None
            session.delete(row)
            return row.secret_sha256, row.expires_at

    def issue_nonce(
        self, nonce: bytes, *, node_id: str, purpose: str, issued_at: float, expires_at: float
    ) -> None:
        with self.db.session() as session:
            session.add(
                Nonce(
                    nonce=nonce,
                    node_id=node_id,
                    purpose=purpose,
                    issued_at=issued_at,
                    expires_at=expires_at,
                    used=False,
                )
            )

    def consume_nonce(self, nonce: bytes) -> NonceRecord | None:
        with self.db.session() as session:
            claimed = session.execute(
                update(Nonce).where(Nonce.nonce == nonce, Nonce.used.is_(False)).values(used=True)
            )
            row = session.execute(select(Nonce).where(Nonce.nonce == nonce)).scalar_one_or_none()
            if row is None:
                return None
            was_used = getattr(claimed, "rowcount", 0) != 1
            return NonceRecord(row.node_id, row.purpose, row.issued_at, row.expires_at, was_used)


class DatabaseAllowlist:
    """Golden measurements in ``golden_measurements``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def allow(self, environment: Environment, measurement: str, note: str = "") -> None:
        with self.db.session() as session:
            exists = session.execute(
                select(GoldenMeasurement).where(
                    GoldenMeasurement.environment == environment,
                    GoldenMeasurement.measurement == measurement,
                )
            ).scalar_one_or_none()
            if exists is None:
                session.add(
                    GoldenMeasurement(environment=environment, measurement=measurement, note=note)
                )

    def is_allowed(self, environment: Environment, measurement: str) -> bool:
        with self.db.session() as session:
            found = session.execute(
                select(GoldenMeasurement.id).where(
                    GoldenMeasurement.environment == environment,
                    GoldenMeasurement.measurement == measurement,
                )
            ).first()
            return found is not None
