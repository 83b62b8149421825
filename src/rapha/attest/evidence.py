"""What every attestation provider produces and every verifier consumes.

A node proves, freshly, which software it runs by answering a hub **nonce** with
**evidence**: its measurement (an ordered event log of component digests, see
:mod:`rapha.attest.measure`), bound to the node's Ed25519 key, and signed by something the
hub trusts more than the node's own software: a TPM attestation key (``tpm2``), an SGX
quoting enclave (``sgx-dcap``), or, for demos only, the node key itself (``dev``).

The value every provider signs over is the **binding**::

    binding = SHA-256(nonce ‖ SHA-256(node Ed25519 public key, 32 raw bytes))

32 bytes, within every TPM's ``qualifyingData`` limit and SGX's 64-byte report data. It
ties the node key, and every receipt that key signs, to the attested state. At delivery the
nonce is :func:`delivery_nonce`, ``SHA-256(hub delivery nonce ‖ canonical receipt body)``,
so the receipt itself is bound to the state the node was in when it delivered.

Every way verification can fail has its own :class:`Reason`; the hub stores the code and
shows it to the operator.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from rapha import crypto
from rapha.errors import DataError

__all__ = [
    "ENVIRONMENTS",
    "KINDS",
    "AttestationError",
    "Environment",
    "Event",
    "Evidence",
    "EvidenceKind",
    "Provider",
    "Reason",
    "Verdict",
    "b64decode",
    "b64encode",
    "binding",
    "delivery_nonce",
]

Environment = Literal["demo", "production"]
EvidenceKind = Literal["tpm2", "sgx-dcap", "dev"]
ENVIRONMENTS: Final[tuple[Environment, ...]] = ("demo", "production")
KINDS: Final[tuple[EvidenceKind, ...]] = ("tpm2", "sgx-dcap", "dev")
#: The schema tag of :meth:`Evidence.to_json`.
EVIDENCE_SCHEMA: Final = "rapha.evidence/1"
NONCE_BYTES: Final = 32


class Reason(enum.StrEnum):
    """Why evidence was rejected: one code per failure, never a bare "invalid"."""

    MALFORMED = "evidence_malformed"  # not parseable, wrong types, unknown schema
    KIND_NOT_ALLOWED = "kind_not_allowed"  # e.g. sgx-dcap where not configured
    DEV_IN_PRODUCTION = "dev_in_production"  # a dev statement for a production verdict
    NODE_UNKNOWN = "node_unknown"  # no enrolment for this node id
    NODE_KEY_MISMATCH = "node_key_mismatch"  # evidence names another key than enrolled
    ENVIRONMENT_MISMATCH = "environment_mismatch"  # node enrolled for another environment
    NONCE_UNKNOWN = "nonce_unknown"  # never issued by this hub (or for another node)
    NONCE_REPLAYED = "nonce_replayed"  # already used once
    NONCE_EXPIRED = "nonce_expired"  # issued too long ago
    BINDING_MISMATCH = "binding_mismatch"  # signed over another nonce or node key
    SIGNATURE_INVALID = "signature_invalid"  # the quote's / statement's signature is bad
    AK_NOT_ENROLLED = "ak_not_enrolled"  # the quoting key is not the enrolled AK
    AK_NOT_ACTIVATED = "ak_not_activated"  # no ActivateCredential proof for the AK
    EK_CHAIN_INVALID = "ek_chain_invalid"  # the EK certificate does not chain to the CA
    PCR_INVALID = "pcr_invalid"  # PCR selection refused (16, 23) or not the configured one
    EVENT_LOG_MISMATCH = "event_log_mismatch"  # the event log does not replay to the quote
    MEASUREMENT_MISMATCH = "measurement_mismatch"  # event log does not hash to measurement
    MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"  # not a golden measurement
    SGX_REPORT_DATA = "sgx_report_data_mismatch"  # report data lacks the binding
    SGX_ENCLAVE_NOT_ALLOWED = "sgx_enclave_not_allowed"  # MRENCLAVE/MRSIGNER not allowed
    SGX_CHAIN_INVALID = "sgx_chain_invalid"  # PCK chain does not reach the Intel root
    SGX_QUOTE_INVALID = "sgx_quote_invalid"  # quote or QE report signature invalid


class AttestationError(DataError):
    """Evidence was rejected; ``reason`` says why (the hub stores the code)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"attestation rejected ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, what: str) -> bytes:
    """Decode standard base64, raising :class:`AttestationError` (``MALFORMED``)."""
    if not isinstance(text, str):
        raise AttestationError(Reason.MALFORMED, f"{what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise AttestationError(Reason.MALFORMED, f"{what} is not valid base64") from exc


def binding(nonce: bytes, node_public_key: bytes) -> bytes:
    """``SHA-256(nonce ‖ SHA-256(node public key))``: the 32 bytes every provider signs."""
    if len(node_public_key) != 32:
        raise AttestationError(Reason.MALFORMED, "a node public key is 32 raw Ed25519 bytes")
    return hashlib.sha256(nonce + hashlib.sha256(node_public_key).digest()).digest()


def delivery_nonce(hub_nonce: bytes, receipt_body: Mapping[str, Any]) -> bytes:
    """The nonce a node quotes at delivery: ``SHA-256(hub nonce ‖ canonical receipt body)``."""
    return hashlib.sha256(hub_nonce + crypto.canonical_json(receipt_body)).digest()


@dataclass(frozen=True, slots=True)
class Event:
    """One event-log entry: a measured component and its digest (hex SHA-256)."""

    component: str
    digest: str

    def to_json(self) -> dict[str, str]:
        return {"component": self.component, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class Evidence:
    """A provider's answer to a nonce (see the module docstring).

    ``payload`` is the provider's own part, plain JSON (bytes as base64): for ``tpm2`` the
    quote (``TPMS_ATTEST``), its signature, the PCR selection and index; for ``dev`` the
    Ed25519 signature; for ``sgx-dcap`` the quote.
    """

    kind: EvidenceKind
    node_id: str
    node_public_key: bytes
    nonce: bytes
    measurement: str
    events: tuple[Event, ...]
    payload: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": EVIDENCE_SCHEMA,
            "kind": self.kind,
            "node_id": self.node_id,
            "node_public_key": self.node_public_key.hex(),
            "nonce": self.nonce.hex(),
            "measurement": self.measurement,
            "events": [e.to_json() for e in self.events],
            "payload": dict(self.payload),
        }

    @classmethod
    def from_json(cls, value: Any) -> Evidence:
        """Parse untrusted JSON; any defect is :class:`AttestationError` ``MALFORMED``."""

        def bad(what: str) -> AttestationError:
            return AttestationError(Reason.MALFORMED, what)

        if not isinstance(value, Mapping) or value.get("schema") != EVIDENCE_SCHEMA:
            raise bad(f"not {EVIDENCE_SCHEMA} evidence")
        kind = value.get("kind")
        if kind not in KINDS:
            raise bad(f"unknown evidence kind {kind!r}")
        node_id, measurement = value.get("node_id"), value.get("measurement")
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 256:
            raise bad("node_id must be a short string")
        if not _is_hex(measurement, 64):
            raise bad("measurement must be a SHA-256 hex digest")
        for name in ("node_public_key", "nonce"):
            if not _is_hex(value.get(name), 64):
                raise bad(f"{name} must be 32 bytes of hex")
        events = value.get("events")
        if not isinstance(events, list) or len(events) > 1024:
            raise bad("events must be a list")
        parsed: list[Event] = []
        for entry in events:
            if (
                not isinstance(entry, Mapping)
                or set(entry) != {"component", "digest"}
                or not isinstance(entry["component"], str)
                or not 0 < len(entry["component"]) <= 128
                or not _is_hex(entry["digest"], 64)
            ):
                raise bad("each event is {component, digest}")
            parsed.append(Event(entry["component"], entry["digest"]))
        payload = value.get("payload")
        if not isinstance(payload, Mapping):
            raise bad("payload must be an object")
        return cls(
            kind=kind,
            node_id=node_id,
            node_public_key=bytes.fromhex(value["node_public_key"]),
            nonce=bytes.fromhex(value["nonce"]),
            measurement=str(measurement),
            events=tuple(parsed),
            payload=dict(payload),
        )

    @property
    def binding(self) -> bytes:
        return binding(self.nonce, self.node_public_key)


def _is_hex(value: Any, length: int) -> bool:
    if not isinstance(value, str) or len(value) != length:
        return False
    return all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True, slots=True)
class Verdict:
    """An accepted attestation: what the receipt carries, beside the evidence itself."""

    node_id: str
    kind: EvidenceKind
    environment: Environment
    measurement: str
    nonce: str
    verified_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "node_id": self.node_id,
            "kind": self.kind,
            "environment": self.environment,
            "measurement": self.measurement,
            "nonce": self.nonce,
            "verified_at": self.verified_at,
        }


class Provider(Protocol):
    """An evidence provider: answers a nonce for the node key over a measurement."""

    kind: EvidenceKind

    def evidence(
        self,
        *,
        node_id: str,
        node_public_key: bytes,
        nonce: bytes,
        measurement: str,
        events: Sequence[Event],
    ) -> Evidence:
        """Produce evidence binding ``node_public_key`` and ``nonce`` to ``events``."""
        ...
