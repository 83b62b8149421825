"""The hub's verifier on ``dev`` evidence: every refusal has its own reason (issue 6).

The TPM path is in ``test_tpm_verifier.py`` (a real swtpm); these tests cover what the
verifier itself decides: kinds per environment, enrolment, nonces, the event log, the
allowlist and delivery binding.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapha import crypto
from rapha.attest.dev import DevProvider
from rapha.attest.evidence import AttestationError, Event, Evidence, Reason
from rapha.attest.measure import digest_of
from rapha.attest.store import MemoryAllowlist, MemoryEnrollmentStore
from rapha.attest.verifier import Verifier

EVENTS = (
    Event("rapha", "11" * 32),
    Event("distributions", "22" * 32),
    Event("sandbox_profile", "33" * 32),
)
MEASUREMENT = digest_of([e.to_json() for e in EVENTS])


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Hub:
    """A verifier with one enrolled dev node, and the node's provider."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.store = MemoryEnrollmentStore()
        self.allowlist = MemoryAllowlist([("demo", MEASUREMENT)])
        self.verifier = Verifier(self.store, self.allowlist, clock=self.clock)
        self.key = crypto.generate_private_key()
        self.public = crypto.public_key_bytes(self.key.public_key())
        self.provider = DevProvider(self.key)
        self.verifier.enroll("node-a", self.public, environment="demo", kind="dev")

    def evidence(self, nonce: bytes | None = None, **changes: Any) -> Evidence:
        fields: dict[str, Any] = {
            "node_id": "node-a",
            "node_public_key": self.public,
            "nonce": nonce if nonce is not None else self.verifier.challenge("node-a"),
            "measurement": MEASUREMENT,
            "events": EVENTS,
        }
        fields.update(changes)
        return self.provider.evidence(**fields)


@pytest.fixture
def hub() -> Hub:
    return Hub()


def reason_of(hub: Hub, evidence: Any, **kwargs: Any) -> Reason:
    kwargs.setdefault("environment", "demo")
    with pytest.raises(AttestationError) as info:
        hub.verifier.verify(evidence, **kwargs)
    return info.value.reason


def test_fresh_dev_evidence_verifies_in_demo(hub: Hub) -> None:
    evidence = hub.evidence()

    verdict = hub.verifier.verify(evidence.to_json(), environment="demo")

    assert (verdict.node_id, verdict.kind, verdict.environment) == ("node-a", "dev", "demo")
    assert verdict.measurement == MEASUREMENT
    assert verdict.nonce == evidence.nonce.hex()
    assert evidence.payload["dev"] is True


def test_dev_statement_is_rejected_for_production(hub: Hub) -> None:
    assert reason_of(hub, hub.evidence(), environment="production") is Reason.DEV_IN_PRODUCTION
    with pytest.raises(AttestationError) as info:
        hub.verifier.enroll("node-p", hub.public, environment="production", kind="dev")
    assert info.value.reason is Reason.DEV_IN_PRODUCTION


def test_replayed_nonce_is_rejected(hub: Hub) -> None:
    evidence = hub.evidence()
    hub.verifier.verify(evidence, environment="demo")

    assert reason_of(hub, evidence) is Reason.NONCE_REPLAYED


def test_expired_nonce_is_rejected(hub: Hub) -> None:
    evidence = hub.evidence()
    hub.clock.now += hub.verifier.nonce_ttl + 1

    assert reason_of(hub, evidence) is Reason.NONCE_EXPIRED


def test_nonce_never_issued_or_issued_to_another_node_is_unknown(hub: Hub) -> None:
    assert reason_of(hub, hub.evidence(nonce=os.urandom(32))) is Reason.NONCE_UNKNOWN
    other = hub.verifier.challenge("node-b")
    assert reason_of(hub, hub.evidence(nonce=other)) is Reason.NONCE_UNKNOWN


def test_unenrolled_node_is_rejected(hub: Hub) -> None:
    evidence = hub.evidence(node_id="node-z", nonce=hub.verifier.challenge("node-z"))

    assert reason_of(hub, evidence) is Reason.NODE_UNKNOWN


def test_evidence_for_another_node_key_is_rejected(hub: Hub) -> None:
    stranger = crypto.generate_private_key()
    evidence = DevProvider(stranger).evidence(
        node_id="node-a",
        node_public_key=crypto.public_key_bytes(stranger.public_key()),
        nonce=hub.verifier.challenge("node-a"),
        measurement=MEASUREMENT,
        events=EVENTS,
    )

    assert reason_of(hub, evidence) is Reason.NODE_KEY_MISMATCH


def test_measurement_not_on_the_allowlist_is_rejected(hub: Hub) -> None:
    events = (*EVENTS[:2], Event("sandbox_profile", "34" * 32))
    evidence = hub.evidence(events=events, measurement=digest_of([e.to_json() for e in events]))

    assert reason_of(hub, evidence) is Reason.MEASUREMENT_NOT_ALLOWED


def test_event_log_that_does_not_hash_to_the_measurement_is_rejected(hub: Hub) -> None:
    evidence = hub.evidence(events=EVENTS[:2])

    assert reason_of(hub, evidence) is Reason.MEASUREMENT_MISMATCH


def test_tampered_dev_statement_is_rejected(hub: Hub) -> None:
    evidence = hub.evidence().to_json()
    evidence["node_id"] = "node-a"
    events = [*evidence["events"][:2], {"component": "extra", "digest": "44" * 32}]
    evidence["events"] = events
    evidence["measurement"] = digest_of(events)
    hub.allowlist.allow("demo", evidence["measurement"])

    assert reason_of(hub, evidence) is Reason.SIGNATURE_INVALID


def test_delivery_quote_binds_the_receipt_body(hub: Hub) -> None:
    from rapha.attest.evidence import delivery_nonce

    body = {"job": {"id": "job-1"}, "records": 120}
    hub_nonce = hub.verifier.challenge("node-a", purpose="delivery")
    evidence = hub.evidence(nonce=delivery_nonce(hub_nonce, body))

    other_body = {**body, "records": 121}
    assert reason_of(hub, evidence, delivery=(hub_nonce, other_body)) is Reason.BINDING_MISMATCH
    # The failed attempt did not burn the nonce: the binding is checked first.
    verdict = hub.verifier.verify(evidence, environment="demo", delivery=(hub_nonce, body))
    assert verdict.nonce == hub_nonce.hex()
    assert reason_of(hub, evidence, delivery=(hub_nonce, body)) is Reason.NONCE_REPLAYED


def test_an_assignment_nonce_cannot_serve_a_delivery(hub: Hub) -> None:
    body = {"job": {"id": "job-1"}}
    from rapha.attest.evidence import delivery_nonce

    assignment = hub.verifier.challenge("node-a")
    evidence = hub.evidence(nonce=delivery_nonce(assignment, body))

    assert reason_of(hub, evidence, delivery=(assignment, body)) is Reason.NONCE_UNKNOWN


def test_sgx_is_refused_where_not_configured(hub: Hub) -> None:
    evidence = hub.evidence().to_json()
    evidence["kind"] = "sgx-dcap"

    assert reason_of(hub, evidence, environment="production") is Reason.KIND_NOT_ALLOWED


def test_reason_codes_are_distinct() -> None:
    codes = [r.value for r in Reason]
    assert len(codes) == len(set(codes))
    assert "invalid" not in codes


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    field=st.sampled_from(
        [
            "kind",
            "node_id",
            "node_public_key",
            "nonce",
            "measurement",
            "events",
            "payload",
            "schema",
        ]
    ),
    value=_json,
)
def test_hostile_evidence_is_rejected_with_a_reason_never_a_crash(field: str, value: Any) -> None:
    hub = Hub()
    evidence = hub.evidence().to_json()
    evidence[field] = value

    reason: Reason | None = None
    try:
        hub.verifier.verify(evidence, environment="demo")
    except AttestationError as exc:  # any other exception fails the test
        reason = exc.reason
    assert reason is None or isinstance(reason, Reason)
