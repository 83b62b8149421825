"""TPM 2.0 evidence against a real swtpm on loopback: enrolment, activation, quotes, PCRs.

One swtpm serves the module (manufactured with an EK certificate from its own local CA);
tests that change PCR state use PCR 14, so the quotes over PCR 15 stay reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rapha.attest import tpm2
from rapha.attest.evidence import (
    AttestationError,
    Event,
    Evidence,
    Provider,
    Reason,
    b64decode,
    b64encode,
    delivery_nonce,
)
from rapha.attest.measure import digest_of, event_value
from rapha.errors import RemoteError, UsageError
from support.orthanc import free_port
from support.swtpm import SwtpmServer, swtpm_or_skip
from support.tls import make_pki

EVENTS = tuple(
    Event(name, hashlib.sha256(name.encode()).hexdigest())
    for name in ("rapha-node 0.1.0", "policies", "runtime")
)
MEASUREMENT = hashlib.sha256(b"measurement").hexdigest()
OTHER_AK_HANDLE = 0x81010003


def _node_key() -> bytes:
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw()


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmServer]:
    with swtpm_or_skip(Path(tmp_path_factory.mktemp("swtpm"))) as server:
        yield server


@pytest.fixture(scope="module")
def provider(swtpm: SwtpmServer) -> tpm2.Tpm2Provider:
    return tpm2.Tpm2Provider(swtpm.tcti)


@pytest.fixture(scope="module")
def enrollment(provider: tpm2.Tpm2Provider) -> tpm2.Tpm2Enrollment:
    return provider.enrollment()


@pytest.fixture(scope="module")
def other_enrollment(swtpm: SwtpmServer) -> tpm2.Tpm2Enrollment:
    return tpm2.Tpm2Provider(swtpm.tcti, ak_handle=OTHER_AK_HANDLE).enrollment()


@pytest.fixture(scope="module")
def root_ca(swtpm: SwtpmServer) -> bytes:
    return swtpm.root_ca.read_bytes()


@pytest.fixture(scope="module")
def issuer_ca(swtpm: SwtpmServer) -> bytes:
    return swtpm.issuer_ca.read_bytes()


def _challenge(
    enrollment: tpm2.Tpm2Enrollment, root_ca: bytes, issuer_ca: bytes
) -> tuple[bytes, bytes, bytes]:
    return tpm2.make_credential_challenge(
        enrollment, ca_certificates=[root_ca], intermediates=[issuer_ca]
    )


def _quote(provider: tpm2.Tpm2Provider, node_key: bytes, nonce: bytes | None = None) -> Evidence:
    return provider.evidence(
        node_id="node-1",
        node_public_key=node_key,
        nonce=nonce if nonce is not None else os.urandom(32),
        measurement=MEASUREMENT,
        events=EVENTS,
    )


def _rejected(reason: Reason, excinfo: pytest.ExceptionInfo[AttestationError]) -> None:
    assert excinfo.value.reason is reason, excinfo.value


def _unrestricted_signing_key(tcti: str) -> tuple[bytes, bytes]:
    """A TPM-made ECDSA key that can sign anything (not an AK): its public area and name."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_PUBLIC, TPMA_OBJECT

    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.SIGN_ENCRYPT
    )
    template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attributes)
    with ESAPI(tcti) as ectx:
        handle, public, *_ = ectx.create_primary(None, template, ESYS_TR.OWNER)
        try:
            _, name, _ = ectx.read_public(handle)
        finally:
            ectx.flush_context(handle)
    return public.marshal(), bytes(name)


def _loaded_handles(tcti: str) -> list[int]:
    """Transient objects and loaded sessions the TPM holds right now."""
    from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HC

    found: list[int] = []
    with ESAPI(tcti) as ectx:
        for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.HMAC_SESSION_FIRST):
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
            found += [int(h) for h in data.data.handles if int(h) >> 24 == first >> 24]
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HC.POLICY_SESSION_FIRST, 64)
        found += [int(h) for h in data.data.handles if int(h) >> 24 == 0x03]
    return found


def _with_payload(evidence: Evidence, **changes: Any) -> Evidence:
    return dataclasses.replace(evidence, payload={**evidence.payload, **changes})


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("pcr", [16, 23, 24, -1, True, "15"])
def test_a_pcr_software_can_reset_or_that_does_not_exist_is_refused(pcr: Any) -> None:
    with pytest.raises(UsageError, match="16 and 23"):
        tpm2.Tpm2Provider("swtpm:host=127.0.0.1,port=2321", pcr=pcr)


@pytest.mark.parametrize("handle", [0x80000001, 0x81800000, 0x01C00002])
def test_an_ak_handle_outside_the_owner_persistent_range_is_refused(handle: int) -> None:
    with pytest.raises(UsageError, match="persistent"):
        tpm2.Tpm2Provider("swtpm:host=127.0.0.1,port=2321", ak_handle=handle)


def test_the_provider_is_an_evidence_provider() -> None:
    provider: Provider = tpm2.Tpm2Provider("swtpm:host=127.0.0.1,port=2321")

    assert provider.kind == "tpm2"


_WITHOUT_TSS = """
import json, sys
sys.modules["tpm2_pytss"] = None  # as if tpm2-pytss were not installed
from rapha.attest import tpm2
from rapha.attest.evidence import Evidence
from rapha.errors import DependencyError
given = json.load(sys.stdin)
tpm2.verify_quote(Evidence.from_json(given["evidence"]), ak_public=bytes.fromhex(given["ak"]))
try:
    tpm2.Tpm2Provider("swtpm:host=127.0.0.1,port=2321").read_pcr()
except DependencyError as exc:
    print("DependencyError:", exc)
"""


def test_the_hub_side_needs_no_tpm2_pytss_and_the_node_side_says_to_install_it(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment
) -> None:
    given = {"evidence": _quote(provider, _node_key()).to_json(), "ak": enrollment.ak_public.hex()}

    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", _WITHOUT_TSS],
        input=json.dumps(given),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "DependencyError: tpm2-pytss is not installed: install rapha[attest]" in result.stdout


def test_an_unreachable_tpm_is_a_remote_error() -> None:
    provider = tpm2.Tpm2Provider(f"swtpm:host=127.0.0.1,port={free_port()}")

    with pytest.raises(RemoteError, match="cannot reach the TPM"):
        provider.read_pcr()


# --- enrolment and activation ----------------------------------------------------------------


def test_enrolment_reuses_the_persistent_ak_and_round_trips_as_json(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment
) -> None:
    again = provider.enrollment()

    assert again == enrollment
    assert tpm2.Tpm2Enrollment.from_json(enrollment.to_json()) == enrollment
    assert x509.load_der_x509_certificate(enrollment.ek_certificate).issuer.rfc4514_string()


@pytest.mark.parametrize("value", [None, {"schema": "other"}, {"schema": tpm2.ENROLLMENT_SCHEMA}])
def test_a_malformed_enrolment_is_refused(value: Any) -> None:
    with pytest.raises(AttestationError) as excinfo:
        tpm2.Tpm2Enrollment.from_json(value)

    _rejected(Reason.MALFORMED, excinfo)


@pytest.mark.parametrize("anchors", ["root+issuer", "issuer"])
def test_the_tpm_activates_the_credential_and_the_hub_accepts_it(
    provider: tpm2.Tpm2Provider,
    enrollment: tpm2.Tpm2Enrollment,
    root_ca: bytes,
    issuer_ca: bytes,
    anchors: str,
) -> None:
    if anchors == "issuer":
        challenge = tpm2.make_credential_challenge(enrollment, ca_certificates=[issuer_ca])
    else:
        challenge = _challenge(enrollment, root_ca, issuer_ca)
    secret, blob, encrypted = challenge

    recovered = provider.activate_credential(blob, encrypted)

    tpm2.check_activation(secret, recovered)
    assert len(secret) == 32


def test_a_wrong_secret_is_not_an_activation(
    provider: tpm2.Tpm2Provider,
    enrollment: tpm2.Tpm2Enrollment,
    root_ca: bytes,
    issuer_ca: bytes,
) -> None:
    secret, blob, encrypted = _challenge(enrollment, root_ca, issuer_ca)
    provider.activate_credential(blob, encrypted)

    with pytest.raises(AttestationError) as excinfo:
        tpm2.check_activation(secret, os.urandom(32))

    _rejected(Reason.AK_NOT_ACTIVATED, excinfo)


def test_the_tpm_refuses_a_credential_made_for_another_ak(
    provider: tpm2.Tpm2Provider,
    other_enrollment: tpm2.Tpm2Enrollment,
    root_ca: bytes,
    issuer_ca: bytes,
) -> None:
    _, blob, encrypted = _challenge(other_enrollment, root_ca, issuer_ca)

    with pytest.raises(AttestationError) as excinfo:
        provider.activate_credential(blob, encrypted)

    _rejected(Reason.AK_NOT_ACTIVATED, excinfo)


def test_an_ek_certificate_from_another_ca_is_refused(
    enrollment: tpm2.Tpm2Enrollment, tmp_path: Path
) -> None:
    unrelated_ca = make_pki(tmp_path).ca.read_bytes()

    with pytest.raises(AttestationError) as excinfo:
        tpm2.make_credential_challenge(enrollment, ca_certificates=[unrelated_ca])

    _rejected(Reason.EK_CHAIN_INVALID, excinfo)


def test_an_ek_certificate_without_its_intermediate_does_not_chain(
    enrollment: tpm2.Tpm2Enrollment, root_ca: bytes
) -> None:
    with pytest.raises(AttestationError) as excinfo:
        tpm2.make_credential_challenge(enrollment, ca_certificates=[root_ca])

    _rejected(Reason.EK_CHAIN_INVALID, excinfo)


def test_an_ek_certificate_outside_its_validity_is_refused(
    enrollment: tpm2.Tpm2Enrollment, root_ca: bytes, issuer_ca: bytes
) -> None:
    with pytest.raises(AttestationError) as excinfo:
        tpm2.make_credential_challenge(
            enrollment,
            ca_certificates=[root_ca],
            intermediates=[issuer_ca],
            now=datetime(2001, 1, 1, tzinfo=UTC),
        )

    _rejected(Reason.EK_CHAIN_INVALID, excinfo)


def test_an_ek_certificate_for_another_key_is_refused(
    enrollment: tpm2.Tpm2Enrollment, root_ca: bytes, issuer_ca: bytes
) -> None:
    swapped = dataclasses.replace(enrollment, ek_public=enrollment.ak_public)

    with pytest.raises(AttestationError) as excinfo:
        _challenge(swapped, root_ca, issuer_ca)

    _rejected(Reason.EK_CHAIN_INVALID, excinfo)


def test_an_unrestricted_signing_key_is_not_an_ak(
    swtpm: SwtpmServer, enrollment: tpm2.Tpm2Enrollment, root_ca: bytes, issuer_ca: bytes
) -> None:
    public, name = _unrestricted_signing_key(swtpm.tcti)
    forged = dataclasses.replace(enrollment, ak_public=public, ak_name=name)

    with pytest.raises(AttestationError, match="restricted") as excinfo:
        _challenge(forged, root_ca, issuer_ca)

    _rejected(Reason.AK_NOT_ENROLLED, excinfo)


def test_an_ak_name_that_is_not_its_public_area_is_refused(
    enrollment: tpm2.Tpm2Enrollment,
    other_enrollment: tpm2.Tpm2Enrollment,
    root_ca: bytes,
    issuer_ca: bytes,
) -> None:
    mixed = dataclasses.replace(enrollment, ak_name=other_enrollment.ak_name)

    with pytest.raises(AttestationError) as excinfo:
        _challenge(mixed, root_ca, issuer_ca)

    _rejected(Reason.AK_NOT_ENROLLED, excinfo)


def test_operations_before_enrolment_say_to_enrol(swtpm: SwtpmServer) -> None:
    unenrolled = tpm2.Tpm2Provider(swtpm.tcti, ak_handle=0x81010010)

    with pytest.raises(UsageError, match="enrol the node first"):
        _quote(unenrolled, _node_key())


# --- quotes -----------------------------------------------------------------------------------


def test_a_fresh_quote_verifies(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment
) -> None:
    evidence = _quote(provider, _node_key())

    quote = tpm2.verify_quote(
        Evidence.from_json(evidence.to_json()), ak_public=enrollment.ak_public
    )

    assert quote.extra_data == evidence.binding
    assert quote.pcr_selection == ((0x000B, (15,)),)
    assert evidence.payload["ak_name"] == b64encode(enrollment.ak_name)
    assert provider.read_pcr() == tpm2.replay(EVENTS)


def test_a_quote_for_another_node_key_is_refused(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment
) -> None:
    evidence = dataclasses.replace(_quote(provider, _node_key()), node_public_key=_node_key())

    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(evidence, ak_public=enrollment.ak_public)

    _rejected(Reason.BINDING_MISMATCH, excinfo)


@pytest.mark.parametrize("field", ["quote", "signature"])
@pytest.mark.parametrize("where", [0, 7, -40, -1])
def test_a_tampered_byte_is_an_invalid_signature(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment, field: str, where: int
) -> None:
    evidence = _quote(provider, _node_key())
    data = bytearray(b64decode(evidence.payload[field], field))
    data[where] ^= 0x01

    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(
            _with_payload(evidence, **{field: b64encode(bytes(data))}),
            ak_public=enrollment.ak_public,
        )

    _rejected(Reason.SIGNATURE_INVALID, excinfo)


def test_a_quote_checked_against_another_ak_is_an_invalid_signature(
    provider: tpm2.Tpm2Provider, other_enrollment: tpm2.Tpm2Enrollment
) -> None:
    evidence = _quote(provider, _node_key())

    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(evidence, ak_public=other_enrollment.ak_public)

    _rejected(Reason.SIGNATURE_INVALID, excinfo)


@pytest.mark.parametrize(
    "events",
    [
        (EVENTS[0], Event(EVENTS[1].component, hashlib.sha256(b"changed").hexdigest()), EVENTS[2]),
        EVENTS[:2],
        EVENTS[1:],
        (*EVENTS, EVENTS[0]),
        (),
    ],
    ids=["digest-changed", "last-dropped", "first-dropped", "one-added", "empty"],
)
def test_an_event_log_that_does_not_replay_to_the_quote_is_refused(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment, events: tuple[Event, ...]
) -> None:
    evidence = dataclasses.replace(_quote(provider, _node_key()), events=events)

    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(evidence, ak_public=enrollment.ak_public)

    _rejected(Reason.EVENT_LOG_MISMATCH, excinfo)


@pytest.mark.parametrize(
    ("changes", "pcr"),
    [({}, 14), ({}, 16), ({}, 23), ({"pcr": 14}, 14), ({"bank": "sha1"}, 15)],
    ids=["other-pcr", "pcr16", "pcr23", "payload-claims-14", "sha1-bank"],
)
def test_a_pcr_other_than_the_configured_one_is_refused(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment, changes: dict[str, Any], pcr: int
) -> None:
    evidence = _with_payload(_quote(provider, _node_key()), **changes)

    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(evidence, ak_public=enrollment.ak_public, pcr=pcr)

    _rejected(Reason.PCR_INVALID, excinfo)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"quote": "not base64!"}, Reason.MALFORMED),
        ({"signature": None}, Reason.MALFORMED),
        # The signature is checked over the raw bytes before they are parsed.
        ({"quote": b64encode(b"\xff\x54")}, Reason.SIGNATURE_INVALID),
    ],
    ids=["bad-base64", "missing", "truncated"],
)
def test_a_malformed_payload_is_refused(
    provider: tpm2.Tpm2Provider,
    enrollment: tpm2.Tpm2Enrollment,
    changes: dict[str, Any],
    reason: Reason,
) -> None:
    evidence = _with_payload(_quote(provider, _node_key()), **changes)

    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(evidence, ak_public=enrollment.ak_public)

    _rejected(reason, excinfo)


def test_evidence_of_another_kind_is_malformed(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment
) -> None:
    evidence = dataclasses.replace(_quote(provider, _node_key()), kind="dev")

    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(evidence, ak_public=enrollment.ak_public)

    _rejected(Reason.MALFORMED, excinfo)


def test_the_delivery_quote_binds_the_receipt(
    provider: tpm2.Tpm2Provider, enrollment: tpm2.Tpm2Enrollment
) -> None:
    hub_nonce, node_key = os.urandom(32), _node_key()
    body = {"job_id": "job-1", "outbox": {"weights.safetensors": "ab" * 32}}
    evidence = _quote(provider, node_key, delivery_nonce(hub_nonce, body))

    tpm2.verify_quote(evidence, ak_public=enrollment.ak_public)
    other_body = dataclasses.replace(
        evidence, nonce=delivery_nonce(hub_nonce, {**body, "job_id": "job-2"})
    )
    with pytest.raises(AttestationError) as excinfo:
        tpm2.verify_quote(other_body, ak_public=enrollment.ak_public)

    _rejected(Reason.BINDING_MISMATCH, excinfo)


def test_twenty_quotes_and_activations_leave_no_object_or_session_loaded(
    swtpm: SwtpmServer,
    provider: tpm2.Tpm2Provider,
    enrollment: tpm2.Tpm2Enrollment,
    root_ca: bytes,
    issuer_ca: bytes,
) -> None:
    node_key = _node_key()

    for _ in range(20):
        secret, blob, encrypted = _challenge(enrollment, root_ca, issuer_ca)
        tpm2.check_activation(secret, provider.activate_credential(blob, encrypted))
        tpm2.verify_quote(_quote(provider, node_key), ak_public=enrollment.ak_public)

    assert _loaded_handles(swtpm.tcti) == []


# --- the PCR ----------------------------------------------------------------------------------


def test_replay_extends_from_the_reset_value() -> None:
    value = event_value(EVENTS[0].to_json())

    assert tpm2.replay([]) == b"\0" * 32
    assert tpm2.replay(EVENTS[:1]) == hashlib.sha256(b"\0" * 32 + value).digest()
    # From the reset value, the PCR holds exactly the measurement digest.
    assert tpm2.replay(EVENTS).hex() == digest_of([e.to_json() for e in EVENTS])


def test_extend_is_idempotent_and_refuses_another_history(swtpm: SwtpmServer) -> None:
    provider = tpm2.Tpm2Provider(swtpm.tcti, pcr=14)
    assert provider.read_pcr() == b"\0" * 32

    provider.extend(EVENTS)
    provider.extend(EVENTS)

    assert provider.read_pcr() == tpm2.replay(EVENTS)
    with pytest.raises(AttestationError, match="reboot") as excinfo:
        provider.extend(EVENTS[:2])
    _rejected(Reason.EVENT_LOG_MISMATCH, excinfo)
