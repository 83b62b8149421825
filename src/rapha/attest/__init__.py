"""Attestation: what software a node runs, proven freshly to the hub (issue 6).

* :mod:`rapha.attest.measure`: the node's measurement, an event log of component digests;
* :mod:`rapha.attest.evidence`: evidence, the binding to the node key, reason codes;
* providers: :mod:`rapha.attest.tpm2` (TPM 2.0 quote), :mod:`rapha.attest.sgx` (SGX DCAP
  quote verification), :mod:`rapha.attest.dev` (demo only);
* :mod:`rapha.attest.verifier` and :mod:`rapha.attest.store`: what the hub runs.

``docs/attestation.md`` says what each provider proves and what it does not.
"""

from rapha.attest.dev import DevProvider
from rapha.attest.evidence import (
    AttestationError,
    Event,
    Evidence,
    Reason,
    Verdict,
    binding,
    delivery_nonce,
)
from rapha.attest.measure import Measurement, digest_of, measure
from rapha.attest.store import (
    Enrollment,
    EnrollmentStore,
    MeasurementAllowlist,
    MemoryAllowlist,
    MemoryEnrollmentStore,
)
from rapha.attest.verifier import SgxPolicy, Verifier

__all__ = [
    "AttestationError",
    "DevProvider",
    "Enrollment",
    "EnrollmentStore",
    "Event",
    "Evidence",
    "Measurement",
    "MeasurementAllowlist",
    "MemoryAllowlist",
    "MemoryEnrollmentStore",
    "Reason",
    "SgxPolicy",
    "Verdict",
    "Verifier",
    "binding",
    "delivery_nonce",
    "digest_of",
    "measure",
]
