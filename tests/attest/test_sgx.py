"""``sgx-dcap`` quote parsing and verification.

Real vectors (``data/sgx/README.md`` says where each came from): an SGX v3 quote made by
Intel's quoting enclave on real hardware, with its genuine PCK chain to the Intel SGX Root
CA, and a TDX v4 quote, whose signature data proves the v4 certification-data layout (type
6 wrapping type 5) on real bytes. No real SGX v4 quote was found, so SGX v4 end to end and
every rejection path also run on synthetic quotes, signed by a throwaway CA built here.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from rapha.attest import sgx
from rapha.attest.evidence import AttestationError, Evidence, Reason
from rapha.errors import ConfigError

DATA = Path(__file__).parent / "data" / "sgx"
REAL_V3 = bytes.fromhex((DATA / "quote_v3.hex").read_text())
REAL_TDX_V4 = bytes.fromhex((DATA / "tdx_quote_v4.hex").read_text())
INTEL_ROOT_PEM = (DATA / "intel_sgx_root_ca.pem").read_bytes()
#: SHA-256 of the Intel SGX Root CA's DER, as Intel publishes it.
INTEL_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
REAL_MRENCLAVE = bytes.fromhex("a4f45c39dac622cb1dd32ddb35a52ec92db41d0fa88a1c911c49e59c534f61cd")
REAL_MRSIGNER = bytes.fromhex("8f2dbc0f9c5d3378d596974b2deed1f93223cc49242899f83809bcc92546132c")
#: The real quote's report data is all zero, so its "binding" is 32 zero bytes.
REAL_BINDING = bytes(32)
#: Inside every real certificate's validity window (the PCK leaf: 2024-03-07 to 2031-03-07).
IN_WINDOW = datetime(2026, 12, 1, tzinfo=UTC)

ENCLAVE = hashlib.sha256(b"enclave").digest()
SIGNER = hashlib.sha256(b"signer").digest()
BINDING = hashlib.sha256(b"nonce and node key").digest()
NOT_BEFORE = datetime(2025, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2030, 1, 1, tzinfo=UTC)
SIGNATURE_DATA_AT = sgx.HEADER_BYTES + sgx.REPORT_BYTES + 4


def verify(quote: sgx.DcapQuote | bytes, **overrides: Any) -> None:
    """:func:`sgx.verify_quote` with the synthetic defaults, any of them overridden."""
    arguments: dict[str, Any] = {
        "binding": BINDING,
        "allowed_mrenclave": {ENCLAVE},
        "allowed_mrsigner": set(),
        "intel_root": SYNTHETIC.root,
        "now": IN_WINDOW,
        **overrides,
    }
    sgx.verify_quote(quote, **arguments)


def verify_real(quote: sgx.DcapQuote | bytes, **overrides: Any) -> None:
    verify(
        quote,
        **{
            "binding": REAL_BINDING,
            "allowed_mrenclave": {REAL_MRENCLAVE},
            "intel_root": INTEL_ROOT_PEM,
            **overrides,
        },
    )


def refused(
    reason: Reason, quote: sgx.DcapQuote | bytes, *, real: bool = False, **overrides: Any
) -> str:
    """Assert verification (of a real vector, with ``real``) fails for ``reason``; return why."""
    with pytest.raises(AttestationError) as caught:
        (verify_real if real else verify)(quote, **overrides)
    assert caught.value.reason is reason, caught.value.detail
    return caught.value.detail


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# -- A synthetic Intel: root, platform CA and PCK leaf, all P-256 -----------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePublicKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_after: datetime = NOT_AFTER,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    pck_key: ec.EllipticCurvePrivateKey


def make_pki(*, leaf_not_after: datetime = NOT_AFTER, platform_ca_is_ca: bool = True) -> Pki:
    root_key, ca_key, pck_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _certificate(
        "Test SGX Root CA", root_key.public_key(), "Test SGX Root CA", root_key, ca=True
    )
    platform = _certificate(
        "Test SGX PCK Platform CA",
        ca_key.public_key(),
        "Test SGX Root CA",
        root_key,
        ca=platform_ca_is_ca,
    )
    leaf = _certificate(
        "Test SGX PCK Certificate",
        pck_key.public_key(),
        "Test SGX PCK Platform CA",
        ca_key,
        ca=False,
        not_after=leaf_not_after,
    )
    return Pki(root, (leaf, platform, root), pck_key)


SYNTHETIC = make_pki()


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _report_body(
    *, mr_enclave: bytes, mr_signer: bytes, flags: int, prod_id: int, report_data: bytes
) -> bytes:
    body = bytearray(sgx.REPORT_BYTES)
    body[48] = flags
    body[64:96] = mr_enclave
    body[128:160] = mr_signer
    body[256:258] = prod_id.to_bytes(2, "little")
    body[320:384] = report_data
    return bytes(body)


def build_quote(
    pki: Pki = SYNTHETIC,
    *,
    version: int = 3,
    report_data: bytes = BINDING + bytes(32),
    flags: int = 0x05,
    qe_report_data: bytes | None = None,
    qe_mrsigner: bytes = sgx.INTEL_QE_MRSIGNER,
) -> bytes:
    """A correctly signed SGX quote of ``version``, laid out as the module docstring says."""
    header = (
        struct.pack("<HHIHH", version, 2, 0, 9, 14)
        + bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
        + bytes(20)
    )
    body = _report_body(
        mr_enclave=ENCLAVE, mr_signer=SIGNER, flags=flags, prod_id=0, report_data=report_data
    )
    attestation_key = ec.generate_private_key(ec.SECP256R1())
    point = attestation_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    auth_data = bytes(range(32))
    if qe_report_data is None:
        qe_report_data = hashlib.sha256(point + auth_data).digest() + bytes(32)
    qe_report = _report_body(
        mr_enclave=bytes(32),
        mr_signer=qe_mrsigner,
        flags=0x15,
        prod_id=1,
        report_data=qe_report_data,
    )
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in pki.chain) + b"\x00"
    qe_fields = (
        qe_report
        + _sign(pki.pck_key, qe_report)
        + struct.pack("<H", len(auth_data))
        + auth_data
        + struct.pack("<HI", 5, len(pem))
        + pem
    )
    if version == 4:
        qe_fields = struct.pack("<HI", 6, len(qe_fields)) + qe_fields
    signature_data = _sign(attestation_key, header + body) + point + qe_fields
    return header + body + struct.pack("<I", len(signature_data)) + signature_data


def qe_report_at(version: int) -> int:
    """Where the QE report starts: after signature and key (and, in v4, the type-6 header)."""
    return SIGNATURE_DATA_AT + 128 + (6 if version == 4 else 0)


# -- Real vectors -------------------------------------------------------------------------


def test_real_v3_quote_parses_into_its_fields() -> None:
    quote = sgx.parse_quote(REAL_V3)

    assert (quote.version, quote.qe_svn, quote.pce_svn) == (3, 9, 14)
    assert quote.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert quote.report.mr_enclave == REAL_MRENCLAVE
    assert quote.report.mr_signer == REAL_MRSIGNER
    assert quote.report.report_data == bytes(64)
    assert not quote.report.debug
    assert quote.qe_report.mr_signer == sgx.INTEL_QE_MRSIGNER
    assert quote.qe_report.isv_prod_id == sgx.INTEL_QE_PROD_ID
    assert len(quote.qe_auth_data) == 32
    assert [c.subject.rfc4514_string().split(",CN=")[-1] for c in quote.pck_chain] == [
        "Intel SGX PCK Certificate",
        "Intel SGX PCK Platform CA",
        "Intel SGX Root CA",
    ]


def test_the_root_file_is_the_intel_root_the_real_quote_chains_to() -> None:
    root = x509.load_pem_x509_certificate(INTEL_ROOT_PEM)

    assert root.fingerprint(hashes.SHA256()).hex() == INTEL_ROOT_SHA256
    assert sgx.parse_quote(REAL_V3).pck_chain[-1] == root


@pytest.mark.parametrize(
    "allowed",
    [
        {"allowed_mrenclave": {REAL_MRENCLAVE}, "allowed_mrsigner": set()},
        {"allowed_mrenclave": set(), "allowed_mrsigner": {REAL_MRSIGNER}},
    ],
    ids=["by-mrenclave", "by-mrsigner"],
)
def test_real_v3_quote_verifies_against_the_intel_root(allowed: dict[str, set[bytes]]) -> None:
    verify_real(REAL_V3, **allowed)
    verify_real(sgx.parse_quote(REAL_V3), **allowed)


@pytest.mark.parametrize(
    "now",
    [datetime(2024, 3, 7, tzinfo=UTC), datetime(2031, 3, 8, tzinfo=UTC)],
    ids=["before-pck-issued", "after-pck-expired"],
)
def test_real_v3_quote_is_refused_outside_the_pck_validity_window(now: datetime) -> None:
    assert "not valid at" in refused(Reason.SGX_CHAIN_INVALID, REAL_V3, real=True, now=now)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"intel_root": SYNTHETIC.root}, Reason.SGX_CHAIN_INVALID),
        ({"binding": BINDING}, Reason.SGX_REPORT_DATA),
        (
            {"allowed_mrenclave": {ENCLAVE}, "allowed_mrsigner": {SIGNER}},
            Reason.SGX_ENCLAVE_NOT_ALLOWED,
        ),
    ],
    ids=["another-root", "another-binding", "enclave-not-allowed"],
)
def test_real_v3_quote_is_refused_on_policy(overrides: dict[str, Any], reason: Reason) -> None:
    refused(reason, REAL_V3, real=True, **overrides)


@pytest.mark.parametrize(
    "at",
    [8, sgx.HEADER_BYTES + 64, sgx.HEADER_BYTES + 320, qe_report_at(3) + 20, qe_report_at(3) + 400],
    ids=["header", "mrenclave", "report-data", "qe-report", "qe-report-signature"],
)
def test_real_v3_quote_with_a_flipped_signed_byte_is_refused(at: int) -> None:
    refused(Reason.SGX_QUOTE_INVALID, flip(REAL_V3, at), real=True)


@pytest.mark.parametrize(
    ("at", "value", "detail"),
    [(1096, 0x4F, "not a PEM certificate chain"), (3833, 0x68, "non-conforming certificate")],
    ids=["x509-version-out-of-range", "non-positive-serial"],
)
def test_real_v3_quote_with_a_broken_pck_certificate_is_malformed(
    at: int, value: int, detail: str
) -> None:
    # Found by fuzzing: cryptography raises InvalidVersion (not a ValueError) for the
    # first and only warns about the second.
    quote = REAL_V3[:at] + bytes([value]) + REAL_V3[at + 1 :]

    with pytest.raises(AttestationError) as caught:
        sgx.parse_quote(quote)
    assert caught.value.reason is Reason.MALFORMED
    assert detail in caught.value.detail


def test_real_tdx_quote_is_refused_as_unsupported() -> None:
    with pytest.raises(AttestationError) as caught:
        sgx.parse_quote(REAL_TDX_V4)
    assert caught.value.reason is Reason.MALFORMED
    assert "TDX" in caught.value.detail


def test_real_v4_certification_data_parses_and_its_intel_signatures_verify() -> None:
    # Prepare: the real v3 SGX header (as v4) and body, then the TDX quote's signature data,
    # which starts after its 48-byte header and 584-byte TD report.
    spliced = struct.pack("<H", 4) + REAL_V3[2 : SIGNATURE_DATA_AT - 4] + REAL_TDX_V4[632:]

    quote = sgx.parse_quote(spliced)

    assert quote.version == 4
    assert len(quote.pck_chain) == 3
    assert quote.qe_report.isv_prod_id == 2  # Intel's TD quoting enclave
    # Its PCK chain, QE report signature and QE report data all verify (they are checked
    # first); only then is the TD quoting enclave refused as not Intel's SGX one.
    detail = refused(Reason.SGX_QUOTE_INVALID, quote, intel_root=INTEL_ROOT_PEM)
    assert "Intel's SGX quoting enclave" in detail


# -- Synthetic quotes: v3 and v4 accepted, each rejection path -----------------------------

versions = pytest.mark.parametrize("version", [3, 4])


@versions
def test_synthetic_quote_verifies(version: int) -> None:
    quote = build_quote(version=version)

    assert sgx.parse_quote(quote).version == version
    verify(quote)
    verify(quote, allowed_mrenclave=set(), allowed_mrsigner={SIGNER})


@versions
def test_a_quote_without_the_root_in_its_chain_still_chains(version: int) -> None:
    pki = make_pki()
    short = Pki(pki.root, pki.chain[:2], pki.pck_key)

    verify(build_quote(short, version=version), intel_root=pki.root)


@versions
@pytest.mark.parametrize(
    "report_data",
    [bytes(32) + bytes(32), BINDING + b"\x01" + bytes(31)],
    ids=["another-binding", "upper-half-not-zero"],
)
def test_report_data_without_the_binding_is_refused(version: int, report_data: bytes) -> None:
    refused(Reason.SGX_REPORT_DATA, build_quote(version=version, report_data=report_data))


@versions
def test_an_enclave_in_neither_allowlist_is_refused(version: int) -> None:
    quote = build_quote(version=version)

    refused(Reason.SGX_ENCLAVE_NOT_ALLOWED, quote, allowed_mrenclave={SIGNER})
    refused(
        Reason.SGX_ENCLAVE_NOT_ALLOWED, quote, allowed_mrenclave=set(), allowed_mrsigner={ENCLAVE}
    )


@versions
def test_a_debug_enclave_is_refused_unless_allowed(version: int) -> None:
    quote = build_quote(version=version, flags=0x07)

    assert "debug" in refused(Reason.SGX_ENCLAVE_NOT_ALLOWED, quote)
    verify(quote, allow_debug=True)


@versions
def test_a_chain_to_another_root_is_refused(version: int) -> None:
    other = make_pki()

    refused(Reason.SGX_CHAIN_INVALID, build_quote(other, version=version))
    refused(Reason.SGX_CHAIN_INVALID, build_quote(version=version), intel_root=other.root)


@versions
def test_an_expired_pck_certificate_is_refused(version: int) -> None:
    pki = make_pki(leaf_not_after=IN_WINDOW - timedelta(days=1))

    detail = refused(
        Reason.SGX_CHAIN_INVALID, build_quote(pki, version=version), intel_root=pki.root
    )
    assert "certificate 0" in detail


@versions
def test_a_pck_issued_by_a_non_ca_is_refused(version: int) -> None:
    pki = make_pki(platform_ca_is_ca=False)

    detail = refused(
        Reason.SGX_CHAIN_INVALID, build_quote(pki, version=version), intel_root=pki.root
    )
    assert "not a CA" in detail


@versions
@pytest.mark.parametrize("at", [20, sgx.HEADER_BYTES + 64, sgx.HEADER_BYTES + 330])
def test_a_tampered_quote_byte_is_refused(version: int, at: int) -> None:
    detail = refused(Reason.SGX_QUOTE_INVALID, flip(build_quote(version=version), at))
    assert "quote signature" in detail


@versions
def test_a_tampered_qe_report_is_refused(version: int) -> None:
    quote = flip(build_quote(version=version), qe_report_at(version) + 130)

    assert "QE report signature" in refused(Reason.SGX_QUOTE_INVALID, quote)


@versions
def test_a_qe_report_not_hashing_the_attestation_key_is_refused(version: int) -> None:
    quote = build_quote(version=version, qe_report_data=bytes(64))

    assert "QE report data" in refused(Reason.SGX_QUOTE_INVALID, quote)


@versions
def test_a_quoting_enclave_that_is_not_intels_is_refused(version: int) -> None:
    quote = build_quote(version=version, qe_mrsigner=SIGNER)

    assert "quoting enclave" in refused(Reason.SGX_QUOTE_INVALID, quote)


@versions
def test_a_truncated_quote_is_malformed_naming_the_field(version: int) -> None:
    quote = build_quote(version=version)
    cuts = {
        0: "header version",
        47: "header user data",
        sgx.HEADER_BYTES + 100: "report body",
        SIGNATURE_DATA_AT - 2: "signature data size",
        SIGNATURE_DATA_AT + 10: "signature data",
        len(quote) - 1: "signature data",
    }
    for length, field in cuts.items():
        with pytest.raises(AttestationError) as caught:
            sgx.parse_quote(quote[:length])
        assert caught.value.reason is Reason.MALFORMED
        assert field in caught.value.detail


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda q: q + b"\x00", "past its end"),
        (lambda q: struct.pack("<H", 5) + q[2:], "version 5"),
        (lambda q: q[:2] + struct.pack("<H", 3) + q[4:], "key type 3"),
        (lambda q: q[:4] + struct.pack("<I", 7) + q[8:], "TEE type 0x7"),
        (
            lambda q: q[: SIGNATURE_DATA_AT - 4] + struct.pack("<I", 10**6) + q[SIGNATURE_DATA_AT:],
            "signature data",
        ),
    ],
    ids=["trailing-byte", "version", "key-type", "tee-type", "signature-data-size"],
)
def test_inconsistent_quotes_are_malformed(edit: Any, detail: str) -> None:
    with pytest.raises(AttestationError) as caught:
        sgx.parse_quote(edit(build_quote(version=4)))
    assert caught.value.reason is Reason.MALFORMED
    assert detail in caught.value.detail


def test_v4_certification_data_must_be_a_qe_report() -> None:
    quote = bytearray(build_quote(version=4))
    quote[SIGNATURE_DATA_AT + 128 : SIGNATURE_DATA_AT + 130] = struct.pack("<H", 5)

    with pytest.raises(AttestationError) as caught:
        sgx.parse_quote(bytes(quote))
    assert caught.value.reason is Reason.MALFORMED
    assert "type 6" in caught.value.detail


@pytest.mark.parametrize(
    "root",
    [b"not a certificate", SYNTHETIC.chain[1].public_bytes(serialization.Encoding.PEM)],
    ids=["not-pem", "not-self-signed"],
)
def test_a_bad_configured_root_is_a_config_error(root: bytes) -> None:
    with pytest.raises(ConfigError):
        verify(build_quote(), intel_root=root)


def test_a_naive_clock_and_a_short_binding_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify(build_quote(), now=datetime(2026, 12, 1))
    with pytest.raises(ValueError, match="32-byte"):
        verify(build_quote(), binding=BINDING[:16])


# -- Evidence payload ---------------------------------------------------------------------


def test_sgx_evidence_carries_the_quote_and_its_binding_verifies() -> None:
    node_key, nonce = bytes(range(32)), hashlib.sha256(b"hub nonce").digest()
    unsigned = Evidence("sgx-dcap", "node-1", node_key, nonce, "0" * 64, ())
    quote = build_quote(version=4, report_data=unsigned.binding + bytes(32))
    evidence = Evidence(
        "sgx-dcap", "node-1", node_key, nonce, "0" * 64, (), sgx.evidence_payload(quote)
    )

    received = Evidence.from_json(evidence.to_json())

    assert sgx.quote_from_payload(received.payload) == quote
    verify(sgx.quote_from_payload(received.payload), binding=received.binding)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"quote": 5},
        {"quote": "not base64!"},
        {"quote": "AA==", "extra": 1},
        {"quote": "A" * 10**6},
    ],
    ids=["empty", "not-text", "not-base64", "extra-key", "too-large"],
)
def test_a_bad_payload_is_malformed(payload: dict[str, Any]) -> None:
    with pytest.raises(AttestationError) as caught:
        sgx.quote_from_payload(payload)
    assert caught.value.reason is Reason.MALFORMED


# -- Hostile bytes never crash the parser or the verifier ---------------------------------


HEADER_STARTS = [b"", struct.pack("<HHI", 3, 2, 0), struct.pack("<HHI", 4, 2, 0)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(HEADER_STARTS), st.binary(max_size=6000))
def test_random_bytes_only_ever_raise_attestation_error(start: bytes, data: bytes) -> None:
    with pytest.raises(AttestationError):
        sgx.parse_quote(start + data)


SYNTHETIC_V4 = build_quote(version=4)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_quotes_only_ever_raise_attestation_error(data: st.DataObject) -> None:
    real = data.draw(st.booleans(), label="real v3 (else synthetic v4)")
    quote = REAL_V3 if real else SYNTHETIC_V4
    at = data.draw(st.integers(0, len(quote) - 1), label="mutated offset")
    value = data.draw(st.integers(0, 255), label="new byte")
    cut = data.draw(st.one_of(st.just(len(quote)), st.integers(0, len(quote))), label="length")
    mutated = (quote[:at] + bytes([value]) + quote[at + 1 :])[:cut]

    with contextlib.suppress(AttestationError):
        verify_real(mutated) if real else verify(mutated)
