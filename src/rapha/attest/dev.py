"""The ``dev`` provider: an Ed25519-signed statement of the attestation fields, for demos.

The node signs, with its own key, a canonical statement of what a TPM quote would carry:
the binding (nonce and node key), the measurement and its event log. It proves only that
the holder of the node key said so: nothing about the machine. Evidence of this kind is
always marked ``dev``, and a production verifier always rejects it
(:class:`~rapha.attest.evidence.Reason` ``DEV_IN_PRODUCTION``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rapha import crypto
from rapha.attest.evidence import (
    AttestationError,
    Event,
    Evidence,
    EvidenceKind,
    Reason,
    b64decode,
    b64encode,
    binding,
)
from rapha.errors import KeyFileError

__all__ = ["DEV_TAG", "DevProvider", "verify_dev"]

DEV_TAG: Final = "rapha.attest.dev.v1"


def _statement(evidence: Evidence) -> bytes:
    """The canonical bytes a dev statement signs."""
    body: dict[str, Any] = {
        "tag": DEV_TAG,
        "kind": "dev",
        "node_id": evidence.node_id,
        "binding": evidence.binding.hex(),
        "measurement": evidence.measurement,
        "events": [e.to_json() for e in evidence.events],
    }
    return crypto.canonical_json(body)


class DevProvider:
    """Evidence signed by the node key itself (demo environment only)."""

    kind: EvidenceKind = "dev"

    def __init__(self, node_key: Ed25519PrivateKey) -> None:
        self._key = node_key

    def evidence(
        self,
        *,
        node_id: str,
        node_public_key: bytes,
        nonce: bytes,
        measurement: str,
        events: Sequence[Event],
    ) -> Evidence:
        if node_public_key != crypto.public_key_bytes(self._key.public_key()):
            raise AttestationError(Reason.NODE_KEY_MISMATCH, "dev evidence signs with the node key")
        binding(nonce, node_public_key)  # validates the key length
        unsigned = Evidence("dev", node_id, node_public_key, nonce, measurement, tuple(events))
        signature = crypto.sign(self._key, _statement(unsigned))
        return Evidence(
            "dev",
            node_id,
            node_public_key,
            nonce,
            measurement,
            tuple(events),
            {"dev": True, "signature": b64encode(signature)},
        )


def verify_dev(evidence: Evidence) -> None:
    """Check a dev statement's signature by the node key it names.

    Raises:
        AttestationError: ``MALFORMED`` or ``SIGNATURE_INVALID``.
    """
    if evidence.kind != "dev" or evidence.payload.get("dev") is not True:
        raise AttestationError(Reason.MALFORMED, "a dev statement must be marked dev")
    signature = b64decode(evidence.payload.get("signature"), "the dev signature")
    try:
        key = crypto.public_key_from_bytes(evidence.node_public_key)
        key.verify(signature, _statement(evidence))
    except (InvalidSignature, KeyFileError) as exc:
        raise AttestationError(
            Reason.SIGNATURE_INVALID, "the dev statement is not signed by the node key"
        ) from exc
