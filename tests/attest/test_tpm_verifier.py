"""Issue 6 acceptance against a real swtpm: the hub's verifier on TPM 2.0 evidence.

A node enrols its AK through the verifier (EK certificate from swtpm's local CA,
MakeCredential / ActivateCredential), then answers nonces with quotes of its real
measurement. Each refusal is asserted by its own reason code.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import rapha
from rapha import crypto
from rapha.attest import tpm2
from rapha.attest.evidence import (
    AttestationError,
    Event,
    Evidence,
    Reason,
    b64decode,
    b64encode,
    delivery_nonce,
)
from rapha.attest.measure import Measurement, measure
from rapha.attest.store import MemoryAllowlist, MemoryEnrollmentStore
from rapha.attest.verifier import Verifier
from rapha.runtime.sandbox import Sandbox
from support.swtpm import SwtpmServer, swtpm_or_skip

NODE = "hospital-a-node"


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmServer]:
    with swtpm_or_skip(Path(tmp_path_factory.mktemp("swtpm"))) as server:
        yield server


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of Rapha's package and an empty site directory: a small real installation."""
    root = Path(tmp_path_factory.mktemp("install"))
    package = root / "rapha"
    shutil.copytree(
        Path(rapha.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "site").mkdir()
    return package, root / "site"


def _measure(installed: tuple[Path, Path]) -> Measurement:
    package, site = installed
    return measure(Sandbox(), site_dirs=[site], package_dir=package)


def _events(measurement: Measurement) -> tuple[Event, ...]:
    return tuple(Event(e["component"], e["digest"]) for e in measurement.events())


class Node:
    """A hospital node with a TPM provider on one PCR, enrolled at a fresh verifier."""

    def __init__(self, swtpm: SwtpmServer, measurement: Measurement, *, pcr: int) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = crypto.public_key_bytes(self.key.public_key())
        self.provider = tpm2.Tpm2Provider(swtpm.tcti, pcr=pcr)
        self.measurement = measurement
        self.allowlist = MemoryAllowlist([("production", measurement.digest)])
        self.verifier = Verifier(
            MemoryEnrollmentStore(),
            self.allowlist,
            ek_ca_certificates=[swtpm.root_ca.read_bytes()],
            ek_intermediates=[swtpm.issuer_ca.read_bytes()],
            pcr=pcr,
        )
        self.tpm = self.provider.enrollment()

    def enroll(self, *, activate: bool = True) -> None:
        blob, encrypted = self.verifier.begin_tpm2_enrollment(
            NODE, self.public, environment="production", tpm=self.tpm
        )
        if activate:
            secret = self.provider.activate_credential(blob, encrypted)
            self.verifier.complete_tpm2_enrollment(NODE, secret)

    def evidence(self, nonce: bytes | None = None, **overrides: Any) -> Evidence:
        fields: dict[str, Any] = {
            "node_id": NODE,
            "node_public_key": self.public,
            "nonce": nonce if nonce is not None else self.verifier.challenge(NODE),
            "measurement": self.measurement.digest,
            "events": _events(self.measurement),
        }
        fields.update(overrides)
        return self.provider.evidence(**fields)

    def answer_with(self, provider: Any) -> Evidence:
        """Another provider's answer to a fresh nonce, for this node's key and measurement."""
        return provider.evidence(  # type: ignore[no-any-return]
            node_id=NODE,
            node_public_key=self.public,
            nonce=self.verifier.challenge(NODE),
            measurement=self.measurement.digest,
            events=_events(self.measurement),
        )

    def reason(self, evidence: Evidence | dict[str, Any], **kwargs: Any) -> Reason:
        kwargs.setdefault("environment", "production")
        with pytest.raises(AttestationError) as info:
            self.verifier.verify(evidence, **kwargs)
        return info.value.reason


@pytest.fixture(scope="module")
def measurement(installed: tuple[Path, Path]) -> Measurement:
    return _measure(installed)


@pytest.fixture(scope="module")
def node(swtpm: SwtpmServer, measurement: Measurement) -> Node:
    enrolled = Node(swtpm, measurement, pcr=15)
    enrolled.enroll()
    return enrolled


def test_fresh_quote_of_the_real_measurement_verifies_for_production(node: Node) -> None:
    evidence = node.evidence()

    verdict = node.verifier.verify(evidence.to_json(), environment="production")

    assert (verdict.kind, verdict.environment) == ("tpm2", "production")
    assert verdict.measurement == node.measurement.digest
    # The quoted PCR, extended from its reset value, holds the measurement itself.
    assert node.provider.read_pcr().hex() == node.measurement.digest


def test_delivery_quote_binds_the_receipt(node: Node) -> None:
    body = {"job": {"id": "job-7"}, "records": 1200, "metrics_sha256": "ab" * 32}
    hub_nonce = node.verifier.challenge(NODE, purpose="delivery")
    evidence = node.evidence(nonce=delivery_nonce(hub_nonce, body))

    changed = {**body, "records": 1201}
    assert node.reason(evidence, delivery=(hub_nonce, changed)) is Reason.BINDING_MISMATCH
    verdict = node.verifier.verify(evidence, environment="production", delivery=(hub_nonce, body))
    assert verdict.nonce == hub_nonce.hex()


def test_replayed_nonce_is_rejected(node: Node) -> None:
    evidence = node.evidence()
    node.verifier.verify(evidence, environment="production")

    assert node.reason(evidence) is Reason.NONCE_REPLAYED


def test_expired_nonce_is_rejected(swtpm: SwtpmServer, measurement: Measurement) -> None:
    now = [1_000_000.0]
    late = Node(swtpm, measurement, pcr=15)
    late.verifier = Verifier(
        late.verifier.store,
        late.allowlist,
        ek_ca_certificates=late.verifier.ek_ca_certificates,
        ek_intermediates=late.verifier.ek_intermediates,
        clock=lambda: now[0],
    )
    late.enroll()
    evidence = late.evidence()
    now[0] += late.verifier.nonce_ttl + 1

    assert late.reason(evidence) is Reason.NONCE_EXPIRED


def test_ak_that_is_not_enrolled_is_rejected(swtpm: SwtpmServer, node: Node) -> None:
    # The same TPM, another AK: it quotes validly, but it is not the AK the hub enrolled.
    other = tpm2.Tpm2Provider(swtpm.tcti, ak_handle=0x81010005)
    other.enrollment()  # creates that AK in the TPM; the hub never sees it
    assert node.reason(node.answer_with(other)) is Reason.AK_NOT_ENROLLED


def test_ak_without_activate_credential_proof_is_rejected(
    swtpm: SwtpmServer, measurement: Measurement
) -> None:
    unproven = Node(swtpm, measurement, pcr=15)
    unproven.enroll(activate=False)

    assert unproven.reason(unproven.evidence()) is Reason.AK_NOT_ACTIVATED
    with pytest.raises(AttestationError) as info:
        unproven.verifier.complete_tpm2_enrollment(NODE, b"\x00" * 32)
    assert info.value.reason is Reason.AK_NOT_ACTIVATED


def test_event_log_that_does_not_replay_to_the_quoted_pcr_is_rejected(node: Node) -> None:
    # A log that hashes to an allowed measurement, but not what the TPM's PCR holds.
    claimed = (*_events(node.measurement)[:-1], Event("sandbox_profile", "00" * 32))
    from rapha.attest.measure import digest_of

    digest = digest_of([e.to_json() for e in claimed])
    node.allowlist.allow("production", digest)
    evidence = node.evidence()
    forged = dataclasses.replace(evidence, events=claimed, measurement=digest)

    assert node.reason(forged) is Reason.EVENT_LOG_MISMATCH


def test_measurement_off_the_allowlist_after_one_byte_changes_is_rejected(
    swtpm: SwtpmServer, installed: tuple[Path, Path], tmp_path: Path
) -> None:
    package, site = installed
    changed = tmp_path / "rapha"
    shutil.copytree(package, changed)
    audit = changed / "audit.py"
    data = bytearray(audit.read_bytes())
    data[-2] ^= 0x01  # one byte of the installed package
    audit.write_bytes(bytes(data))
    golden = measure(Sandbox(), site_dirs=[site], package_dir=package)
    tampered = measure(Sandbox(), site_dirs=[site], package_dir=changed)
    assert tampered.digest != golden.digest

    node = Node(swtpm, tampered, pcr=13)  # its own PCR: a fresh history
    node.allowlist = MemoryAllowlist([("production", golden.digest)])
    node.verifier.allowlist = node.allowlist
    node.enroll()

    assert node.reason(node.evidence()) is Reason.MEASUREMENT_NOT_ALLOWED


def test_quote_bound_to_a_different_node_key_is_rejected(node: Node) -> None:
    thief = crypto.public_key_bytes(Ed25519PrivateKey.generate().public_key())
    nonce = node.verifier.challenge(NODE)
    quoted_for_thief = node.evidence(nonce=nonce, node_public_key=thief)
    presented = dataclasses.replace(quoted_for_thief, node_public_key=node.public)

    assert node.reason(presented) is Reason.BINDING_MISMATCH


def test_tampered_quote_byte_is_rejected(node: Node) -> None:
    evidence = node.evidence()
    quote = bytearray(b64decode(evidence.payload["quote"], "quote"))
    quote[len(quote) // 2] ^= 0x01
    tampered = dataclasses.replace(
        evidence, payload={**evidence.payload, "quote": b64encode(bytes(quote))}
    )

    assert node.reason(tampered) is Reason.SIGNATURE_INVALID


def test_dev_statement_is_rejected_for_production(node: Node) -> None:
    from rapha.attest.dev import DevProvider

    statement = node.answer_with(DevProvider(node.key))

    assert node.reason(statement) is Reason.DEV_IN_PRODUCTION


def test_node_enrolled_for_production_is_refused_in_demo(node: Node) -> None:
    assert node.reason(node.evidence(), environment="demo") is Reason.ENVIRONMENT_MISMATCH
