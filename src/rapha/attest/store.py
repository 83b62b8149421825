"""The enrolment-store protocol the verifier needs, and its in-memory implementation.

The hub implements :class:`EnrollmentStore` on its database (hub issue); tests, the demo
and a single-process hub use :class:`MemoryEnrollmentStore`. The store holds three things:

* **enrolments**: per node, its Ed25519 key, environment, evidence kind and, for ``tpm2``,
  the enrolled attestation key (AK) and whether ``ActivateCredential`` proved it;
* **credential challenges**: the SHA-256 of the secret a TPM must recover to prove its AK
  (never the secret itself), one pending per node;
* **nonces**: issued to one node for one purpose, single use, with an expiry.
  :meth:`EnrollmentStore.consume_nonce` must be atomic (a database does it with one
  ``UPDATE … WHERE used = false``), so a nonce can verify at most once however many hub
  processes race.

And the allowlist of golden measurements, per environment (:class:`MeasurementAllowlist`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from rapha.attest.evidence import Environment, EvidenceKind

__all__ = [
    "Enrollment",
    "EnrollmentStore",
    "MeasurementAllowlist",
    "MemoryAllowlist",
    "MemoryEnrollmentStore",
    "NonceRecord",
]


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What the hub knows about one node's attestation identity."""

    node_id: str
    node_public_key: bytes
    environment: Environment
    kind: EvidenceKind
    #: ``tpm2``: the AK's marshalled ``TPM2B_PUBLIC`` and its name.
    ak_public: bytes | None = None
    ak_name: bytes | None = None
    #: ``tpm2``: the EK certificate (DER) the AK was activated against.
    ek_certificate: bytes | None = None
    #: ``tpm2``: ``ActivateCredential`` returned the challenge secret.
    activated: bool = False

    def activate(self) -> Enrollment:
        return replace(self, activated=True)


@dataclass(frozen=True, slots=True)
class NonceRecord:
    """An issued nonce; ``used`` says whether it was consumed before this call."""

    node_id: str
    purpose: str
    issued_at: float
    expires_at: float
    used: bool


class EnrollmentStore(Protocol):
    """Where the verifier keeps enrolments, credential challenges and nonces."""

    def get(self, node_id: str) -> Enrollment | None:
        """The node's enrolment, or ``None``."""
        ...

    def put(self, enrollment: Enrollment) -> None:
        """Create or replace the node's enrolment."""
        ...

    def put_challenge(self, node_id: str, secret_sha256: bytes, expires_at: float) -> None:
        """Remember the pending credential challenge of ``node_id`` (replacing any)."""
        ...

    def take_challenge(self, node_id: str) -> tuple[bytes, float] | None:
        """Remove and return the pending challenge ``(secret_sha256, expires_at)``."""
        ...

    def issue_nonce(
        self, nonce: bytes, *, node_id: str, purpose: str, issued_at: float, expires_at: float
    ) -> None:
        """Record a fresh nonce for ``node_id``."""
        ...

    def consume_nonce(self, nonce: bytes) -> NonceRecord | None:
        """Atomically mark ``nonce`` used; return it as it was before, or ``None``."""
        ...


class MemoryEnrollmentStore:
    """An :class:`EnrollmentStore` in one process's memory (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._enrollments: dict[str, Enrollment] = {}
        self._challenges: dict[str, tuple[bytes, float]] = {}
        self._nonces: dict[bytes, NonceRecord] = {}

    def get(self, node_id: str) -> Enrollment | None:
        with self._lock:
            return self._enrollments.get(node_id)

    def put(self, enrollment: Enrollment) -> None:
        with self._lock:
            self._enrollments[enrollment.node_id] = enrollment

    def put_challenge(self, node_id: str, secret_sha256: bytes, expires_at: float) -> None:
        with self._lock:
            self._challenges[node_id] = (secret_sha256, expires_at)

    def take_challenge(self, node_id: str) -> tuple[bytes, float] | None:
        with self._lock:
            return self._challenges.pop(node_id, None)

    def issue_nonce(
        self, nonce: bytes, *, node_id: str, purpose: str, issued_at: float, expires_at: float
    ) -> None:
        with self._lock:
            self._nonces[nonce] = NonceRecord(node_id, purpose, issued_at, expires_at, False)

    def consume_nonce(self, nonce: bytes) -> NonceRecord | None:
        with self._lock:
            record = self._nonces.get(nonce)
            if record is not None and not record.used:
                self._nonces[nonce] = replace(record, used=True)
            return record


class MeasurementAllowlist(Protocol):
    """The hub's golden measurements: which node software may run jobs, per environment."""

    def is_allowed(self, environment: Environment, measurement: str) -> bool:
        """Whether ``measurement`` (hex SHA-256) is golden for ``environment``."""
        ...


class MemoryAllowlist:
    """A :class:`MeasurementAllowlist` held in memory."""

    def __init__(self, entries: Iterable[tuple[Environment, str]] = ()) -> None:
        self._entries: set[tuple[Environment, str]] = set(entries)

    def allow(self, environment: Environment, measurement: str) -> None:
        self._entries.add((environment, measurement))

    def revoke(self, environment: Environment, measurement: str) -> None:
        self._entries.discard((environment, measurement))

    def is_allowed(self, environment: Environment, measurement: str) -> bool:
        return (environment, measurement) in self._entries
