"""The verifier the hub runs: enrol nodes, issue nonces, judge evidence.

:meth:`Verifier.verify` accepts evidence only when every check below passes, in this order,
and otherwise raises :class:`~rapha.attest.evidence.AttestationError` with the first
failing :class:`~rapha.attest.evidence.Reason`:

1. the evidence parses (``evidence_malformed``);
2. its kind is accepted in the environment: ``production`` takes ``tpm2``, and
   ``sgx-dcap`` where configured; ``demo`` also takes ``dev`` (``dev_in_production``,
   ``kind_not_allowed``);
3. the node is enrolled, for this environment, with this kind and this Ed25519 key
   (``node_unknown``, ``environment_mismatch``, ``kind_not_allowed``, ``node_key_mismatch``);
4. the nonce was issued by this verifier to this node for this purpose, is unused and
   unexpired; it is consumed (``nonce_unknown``, ``nonce_replayed``, ``nonce_expired``);
   at delivery the evidence's nonce must be ``SHA-256(hub nonce ‖ receipt body)``
   (``binding_mismatch``);
5. the event log hashes to the claimed measurement (``measurement_mismatch``);
6. the provider's proof: for ``tpm2`` the AK is the enrolled one and was activated
   (``ak_not_enrolled``, ``ak_not_activated``), the quote is signed by it, selects the
   configured PCR, carries the binding and its PCR digest replays from the event log
   (:func:`rapha.attest.tpm2.verify_quote`); for ``dev`` the node key's signature; for
   ``sgx-dcap`` :func:`rapha.attest.sgx.verify_quote`;
7. the measurement is golden for the environment (``measurement_not_allowed``).

The accepted :class:`~rapha.attest.evidence.Verdict` names the environment; the receipt
carries it beside the evidence.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from rapha.attest.evidence import (
    ENVIRONMENTS,
    AttestationError,
    Environment,
    Evidence,
    EvidenceKind,
    Reason,
    Verdict,
    b64decode,
    delivery_nonce,
)
from rapha.attest.store import Enrollment, EnrollmentStore, MeasurementAllowlist
from rapha.errors import DataError, UsageError

__all__ = ["NONCE_TTL_SECONDS", "SgxPolicy", "Verifier"]

#: How long an issued nonce stays valid: long enough for a quote, short enough to be fresh.
NONCE_TTL_SECONDS: Final = 300.0
#: How long a TPM has to answer a credential challenge.
CHALLENGE_TTL_SECONDS: Final = 600.0
ASSIGNMENT: Final = "assignment"
DELIVERY: Final = "delivery"


@dataclass(frozen=True, slots=True)
class SgxPolicy:
    """What an ``sgx-dcap`` quote must satisfy: the Intel root and the allowed enclaves."""

    intel_root_pem: bytes
    allowed_mrenclave: Collection[bytes] = field(default_factory=frozenset)
    allowed_mrsigner: Collection[bytes] = field(default_factory=frozenset)


class Verifier:
    """Judges nodes' evidence against enrolments, nonces and golden measurements."""

    def __init__(
        self,
        store: EnrollmentStore,
        allowlist: MeasurementAllowlist,
        *,
        ek_ca_certificates: Collection[bytes] = (),
        ek_intermediates: Collection[bytes] = (),
        sgx: SgxPolicy | None = None,
        pcr: int = 15,
        nonce_ttl: float = NONCE_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.allowlist = allowlist
        self.ek_ca_certificates = tuple(ek_ca_certificates)
        self.ek_intermediates = tuple(ek_intermediates)
        self.sgx = sgx
        self.pcr = pcr
        self.nonce_ttl = nonce_ttl
        self._clock = clock

    # --- kinds ---------------------------------------------------------------------------

    def accepted_kinds(self, environment: Environment) -> tuple[EvidenceKind, ...]:
        """The evidence kinds this verifier accepts in ``environment``."""
        kinds: list[EvidenceKind] = ["tpm2"]
        if self.sgx is not None:
            kinds.append("sgx-dcap")
        if environment == "demo":
            kinds.append("dev")
        return tuple(kinds)

    def check_kind(self, kind: EvidenceKind, environment: Environment) -> None:
        """Refuse a kind of evidence the environment does not accept (``dev`` in
        production above all), before anything about the node is stored."""
        if environment not in ENVIRONMENTS:
            raise UsageError(f"unknown environment {environment!r}: demo or production")
        if kind == "dev" and environment == "production":
            raise AttestationError(
                Reason.DEV_IN_PRODUCTION, "dev evidence proves nothing and is demo-only"
            )
        if kind not in self.accepted_kinds(environment):
            raise AttestationError(
                Reason.KIND_NOT_ALLOWED, f"{kind} evidence is not accepted in {environment}"
            )

    # --- enrolment -----------------------------------------------------------------------

    def enroll(
        self, node_id: str, node_public_key: bytes, *, environment: Environment, kind: EvidenceKind
    ) -> Enrollment:
        """Enrol a ``dev`` or ``sgx-dcap`` node (their evidence is self-contained)."""
        if kind == "tpm2":
            raise UsageError("a tpm2 node enrols with begin_tpm2_enrollment (it must prove its AK)")
        self.check_kind(kind, environment)
        enrollment = Enrollment(node_id, node_public_key, environment, kind, activated=True)
        self.store.put(enrollment)
        return enrollment

    def begin_tpm2_enrollment(
        self,
        node_id: str,
        node_public_key: bytes,
        *,
        environment: Environment,
        tpm: Any,
    ) -> tuple[bytes, bytes]:
        """Check a TPM's EK certificate and AK, and challenge it to activate a credential.

        ``tpm`` is a :class:`rapha.attest.tpm2.Tpm2Enrollment`. Returns the
        ``(credential_blob, encrypted_secret)`` the node passes to ``ActivateCredential``;
        the enrolment counts only after :meth:`complete_tpm2_enrollment`.
        """
        from rapha.attest import tpm2

        self.check_kind("tpm2", environment)
        secret, blob, encrypted = tpm2.make_credential_challenge(
            tpm, ca_certificates=self.ek_ca_certificates, intermediates=self.ek_intermediates
        )
        self.store.put(
            Enrollment(
                node_id,
                node_public_key,
                environment,
                "tpm2",
                ak_public=tpm.ak_public,
                ak_name=tpm.ak_name,
                ek_certificate=tpm.ek_certificate,
            )
        )
        expires = self._clock() + CHALLENGE_TTL_SECONDS
        self.store.put_challenge(node_id, hashlib.sha256(secret).digest(), expires)
        return blob, encrypted

    def complete_tpm2_enrollment(self, node_id: str, secret: bytes) -> Enrollment:
        """Accept the AK if the TPM recovered the challenge secret."""
        enrollment = self.store.get(node_id)
        pending = self.store.take_challenge(node_id)
        if enrollment is None or enrollment.kind != "tpm2":
            raise AttestationError(Reason.NODE_UNKNOWN, f"no tpm2 enrolment begun for {node_id}")
        if pending is None or pending[1] < self._clock():
            raise AttestationError(
                Reason.AK_NOT_ACTIVATED, "no pending credential challenge: begin enrolment again"
            )
        if not hmac.compare_digest(hashlib.sha256(secret).digest(), pending[0]):
            raise AttestationError(
                Reason.AK_NOT_ACTIVATED, "the TPM did not recover the credential secret"
            )
        activated = enrollment.activate()
        self.store.put(activated)
        return activated

    # --- nonces --------------------------------------------------------------------------

    def challenge(self, node_id: str, *, purpose: str = ASSIGNMENT) -> bytes:
        """A fresh single-use nonce for ``node_id`` (expires after ``nonce_ttl`` seconds)."""
        if purpose not in (ASSIGNMENT, DELIVERY):
            raise UsageError(f"nonce purpose must be {ASSIGNMENT} or {DELIVERY}")
        nonce = os.urandom(32)
        now = self._clock()
        self.store.issue_nonce(
            nonce, node_id=node_id, purpose=purpose, issued_at=now, expires_at=now + self.nonce_ttl
        )
        return nonce

    def _consume(self, nonce: bytes, node_id: str, purpose: str) -> None:
        record = self.store.consume_nonce(nonce)
        if record is None or record.node_id != node_id or record.purpose != purpose:
            raise AttestationError(
                Reason.NONCE_UNKNOWN, f"this hub issued no such {purpose} nonce to {node_id}"
            )
        if record.used:
            raise AttestationError(Reason.NONCE_REPLAYED, "the nonce was already used once")
        if record.expires_at < self._clock():
            raise AttestationError(Reason.NONCE_EXPIRED, "the nonce expired: ask for a new one")

    # --- verification --------------------------------------------------------------------

    def verify(
        self,
        evidence: Evidence | Mapping[str, Any],
        *,
        environment: Environment,
        delivery: tuple[bytes, Mapping[str, Any]] | None = None,
    ) -> Verdict:
        """Judge ``evidence`` (module docstring); raise :class:`AttestationError` if refused.

        ``delivery`` is ``(hub delivery nonce, receipt body)`` for a quote at delivery.
        """
        if not isinstance(evidence, Evidence):
            evidence = Evidence.from_json(evidence)
        self.check_kind(evidence.kind, environment)
        enrollment = self._enrollment_of(evidence, environment)
        if delivery is None:
            self._consume(evidence.nonce, evidence.node_id, ASSIGNMENT)
            nonce_hex = evidence.nonce.hex()
        else:
            hub_nonce, body = delivery
            if evidence.nonce != delivery_nonce(hub_nonce, body):
                raise AttestationError(
                    Reason.BINDING_MISMATCH,
                    "the delivery quote is not over SHA-256(hub nonce ‖ this receipt body)",
                )
            self._consume(hub_nonce, evidence.node_id, DELIVERY)
            nonce_hex = hub_nonce.hex()
        self._check_measurement(evidence)
        self._check_proof(evidence, enrollment)
        if not self.allowlist.is_allowed(environment, evidence.measurement):
            raise AttestationError(
                Reason.MEASUREMENT_NOT_ALLOWED,
                f"measurement {evidence.measurement[:16]}… is not golden for {environment}",
            )
        return Verdict(
            node_id=evidence.node_id,
            kind=evidence.kind,
            environment=environment,
            measurement=evidence.measurement,
            nonce=nonce_hex,
            verified_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def _enrollment_of(self, evidence: Evidence, environment: Environment) -> Enrollment:
        enrollment = self.store.get(evidence.node_id)
        if enrollment is None:
            raise AttestationError(Reason.NODE_UNKNOWN, f"node {evidence.node_id} is not enrolled")
        if enrollment.environment != environment:
            raise AttestationError(
                Reason.ENVIRONMENT_MISMATCH,
                f"node {evidence.node_id} is enrolled for {enrollment.environment}",
            )
        if enrollment.kind != evidence.kind:
            raise AttestationError(
                Reason.KIND_NOT_ALLOWED,
                f"node {evidence.node_id} is enrolled for {enrollment.kind} evidence",
            )
        if not hmac.compare_digest(enrollment.node_public_key, evidence.node_public_key):
            raise AttestationError(
                Reason.NODE_KEY_MISMATCH, "the evidence names another node key than enrolled"
            )
        return enrollment

    @staticmethod
    def _check_measurement(evidence: Evidence) -> None:
        from rapha.attest.measure import digest_of

        try:
            digest = digest_of([e.to_json() for e in evidence.events])
        except DataError as exc:
            raise AttestationError(Reason.MALFORMED, str(exc)) from exc
        if digest != evidence.measurement:
            raise AttestationError(
                Reason.MEASUREMENT_MISMATCH, "the event log does not hash to the measurement"
            )

    def _check_proof(self, evidence: Evidence, enrollment: Enrollment) -> None:
        if evidence.kind == "dev":
            from rapha.attest.dev import verify_dev

            verify_dev(evidence)
        elif evidence.kind == "tpm2":
            from rapha.attest import tpm2

            if enrollment.ak_public is None:
                raise AttestationError(Reason.AK_NOT_ENROLLED, "no AK is enrolled for this node")
            if not enrollment.activated:
                raise AttestationError(
                    Reason.AK_NOT_ACTIVATED, "the AK never proved itself with ActivateCredential"
                )
            quoted_by = b64decode(evidence.payload.get("ak_name"), "the quoting AK's name")
            if enrollment.ak_name is None or not hmac.compare_digest(quoted_by, enrollment.ak_name):
                raise AttestationError(
                    Reason.AK_NOT_ENROLLED, "the quote names an AK that is not the enrolled one"
                )
            tpm2.verify_quote(evidence, ak_public=enrollment.ak_public, pcr=self.pcr)
        else:
            from rapha.attest import sgx

            if self.sgx is None:  # pragma: no cover - refused by check_kind
                raise AttestationError(Reason.KIND_NOT_ALLOWED, "sgx-dcap is not configured")
            sgx.verify_quote(
                sgx.quote_from_payload(evidence.payload),
                binding=evidence.binding,
                allowed_mrenclave=self.sgx.allowed_mrenclave,
                allowed_mrsigner=self.sgx.allowed_mrsigner,
                intel_root=self.sgx.intel_root_pem,
            )
