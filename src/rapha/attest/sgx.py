"""``sgx-dcap``: parse and verify an Intel SGX ECDSA (DCAP) quote, version 3 or 4.

The layout follows Intel's *SGX ECDSA Quote Library Reference* (DCAP API), appendix
"Quote Format" (v3) and its v4 revision. All integers are little-endian::

    header (48)          version u16 · att_key_type u16 (2 = ECDSA-256-with-P-256)
                         tee_type u32 (v3: reserved, 0; v4: 0 = SGX, 0x81 = TDX)
                         qe_svn u16 · pce_svn u16 · qe_vendor_id (16) · user_data (20)
    report body (384)    the enclave's REPORT body: attributes @48, mr_enclave @64,
                         mr_signer @128, isv_prod_id @256, isv_svn @258, report_data @320
    signature data       size u32, then: quote signature (64, r‖s) ·
                         attestation key (64, x‖y) · QE fields (v3) or, in v4, the QE
                         fields wrapped in certification data of type 6
    QE fields            QE report body (384) · QE report signature (64) ·
                         QE auth data (u16 size, bytes) · certification data
    certification data   type u16 · size u32 · data (type 5 = PCK certificate chain, PEM)

:func:`parse_quote` bounds-checks every field and refuses trailing bytes; anything it
cannot read is ``MALFORMED`` with the field named. :func:`verify_quote` then proves, in
this order, each failure with its own :class:`~rapha.attest.evidence.Reason`:

1. the PCK certificate chain runs, by signature, issuer name, CA constraints and validity
   window at ``now``, from the PCK leaf to the configured Intel SGX Root CA
   (``SGX_CHAIN_INVALID``);
2. the QE report is signed by the PCK leaf key; its report data is
   ``SHA-256(attestation key ‖ QE auth data)`` followed by 32 zero bytes; and it comes from
   Intel's quoting enclave (``INTEL_QE_MRSIGNER``, ISVPRODID 1, not debug)
   (``SGX_QUOTE_INVALID``);
3. the quote signature over header ‖ report body verifies under the attestation key
   (``SGX_QUOTE_INVALID``);
4. report data bytes 0..31 are the binding and bytes 32..63 are zero
   (``SGX_REPORT_DATA``);
5. the enclave is not a debug enclave (unless ``allow_debug``), and its MRENCLAVE is
   allowed **or** its MRSIGNER is allowed (``SGX_ENCLAVE_NOT_ALLOWED``).

Not checked (a production verifier must add them from Intel PCS collateral): TCB Info
(is the platform's TCB, from the PCK certificate's SGX extensions, up to date?), the QE
Identity (the QE's ISVSVN against Intel's signed TCB levels; only its MRSIGNER and
ISVPRODID are pinned here), the PCK and root CRLs, and a TCB-status policy.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from rapha.attest.evidence import AttestationError, Reason, b64decode, b64encode
from rapha.errors import ConfigError

__all__ = [
    "INTEL_QE_MRSIGNER",
    "DcapQuote",
    "ReportBody",
    "evidence_payload",
    "parse_quote",
    "quote_from_payload",
    "verify_quote",
]

HEADER_BYTES: Final = 48
REPORT_BYTES: Final = 384
#: A real quote is about 5 KB; anything past this is refused before parsing.
MAX_QUOTE_BYTES: Final = 64 * 1024
ATT_KEY_ECDSA_P256: Final = 2
TEE_SGX: Final = 0x00
TEE_TDX: Final = 0x81
CERT_PCK_CHAIN: Final = 5
CERT_QE_REPORT: Final = 6
#: MRSIGNER of Intel's SGX quoting enclave (QE3), whose ISVPRODID is 1; Intel's QE Identity
#: collateral names the same values (and, beyond them, the TCB levels not checked here).
INTEL_QE_MRSIGNER: Final = bytes.fromhex(
    "8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"
)
INTEL_QE_PROD_ID: Final = 1
#: ATTRIBUTES.FLAGS bit 1 (Intel SDM Vol. 3D, "SGX Attributes"): the enclave's memory is
#: readable by the host, so what its quote says about it proves nothing.
_FLAG_DEBUG: Final = 0x02
_MAX_CHAIN: Final = 4

_T = TypeVar("_T", bound=x509.ExtensionType)


def _malformed(detail: str) -> AttestationError:
    return AttestationError(Reason.MALFORMED, detail)


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


@dataclass(frozen=True, slots=True)
class ReportBody:
    """An SGX REPORT body (384 bytes): the identity of an enclave, or of the quoting enclave."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != REPORT_BYTES:
            raise _malformed(f"an SGX report body is {REPORT_BYTES} bytes")

    @property
    def attributes(self) -> bytes:
        return self.raw[48:64]

    @property
    def debug(self) -> bool:
        return bool(self.raw[48] & _FLAG_DEBUG)

    @property
    def mr_enclave(self) -> bytes:
        return self.raw[64:96]

    @property
    def mr_signer(self) -> bytes:
        return self.raw[128:160]

    @property
    def isv_prod_id(self) -> int:
        return _u16(self.raw, 256)

    @property
    def isv_svn(self) -> int:
        return _u16(self.raw, 258)

    @property
    def report_data(self) -> bytes:
        return self.raw[320:384]


@dataclass(frozen=True, slots=True)
class DcapQuote:
    """A parsed SGX ECDSA quote (v3 or v4, P-256 attestation key, SGX TEE), not yet verified.

    ``signed_bytes`` is what the quote signature covers: the header and report body.
    ``pck_chain`` is the certification data's PEM chain in quote order, leaf first.
    """

    version: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    report: ReportBody
    signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: tuple[x509.Certificate, ...]
    signed_bytes: bytes


class _Reader:
    """Reads fields off ``data`` in order; running short is ``MALFORMED``, naming the field."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def take(self, size: int, field: str) -> bytes:
        left = len(self._data) - self._at
        if size > left:
            raise _malformed(f"{self._what} ends inside {field} ({size} bytes, {left} left)")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def certification_data(self, what: str) -> tuple[int, bytes]:
        kind = self.u16(f"the {what} type")
        return kind, self.take(self.u32(f"the {what} size"), f"the {what}")

    def end(self) -> None:
        if self._at != len(self._data):
            raise _malformed(f"{self._what} has {len(self._data) - self._at} bytes past its end")


def parse_quote(data: bytes) -> DcapQuote:
    """Parse an SGX ECDSA quote, v3 or v4; any defect is ``AttestationError`` ``MALFORMED``.

    Refuses other versions, attestation keys other than ECDSA P-256, TDX quotes (v4
    ``tee_type`` 0x81), certification data other than a PEM PCK chain (type 5, in v4
    wrapped in type 6), and bytes after the signature data. Checks no signature.
    """
    if not isinstance(data, bytes):
        raise _malformed("an SGX quote is bytes")
    if len(data) > MAX_QUOTE_BYTES:
        raise _malformed(f"the quote is larger than {MAX_QUOTE_BYTES} bytes")
    quote = _Reader(data, "the quote")
    version = quote.u16("the header version")
    if version not in (3, 4):
        raise _malformed(f"quote version {version} is not supported (3 or 4)")
    key_type = quote.u16("the header attestation key type")
    if key_type != ATT_KEY_ECDSA_P256:
        raise _malformed(f"attestation key type {key_type} is not supported (2, ECDSA P-256)")
    tee_type = quote.u32("the header TEE type")
    if tee_type == TEE_TDX:
        raise _malformed("a TDX quote (tee_type 0x81) is not supported: sgx-dcap is SGX only")
    if tee_type != TEE_SGX:
        raise _malformed(f"TEE type {tee_type:#x} is not SGX (0)")
    qe_svn = quote.u16("the header QE SVN")
    pce_svn = quote.u16("the header PCE SVN")
    qe_vendor_id = quote.take(16, "the header QE vendor id")
    user_data = quote.take(20, "the header user data")
    report = ReportBody(quote.take(REPORT_BYTES, "the report body"))
    sig_data = _Reader(
        quote.take(quote.u32("the signature data size"), "the signature data"),
        "the signature data",
    )
    quote.end()
    signature = sig_data.take(64, "the quote signature")
    attestation_key = sig_data.take(64, "the attestation key")
    if version == 3:
        qe_fields = sig_data
    else:
        kind, wrapped = sig_data.certification_data("certification data")
        if kind != CERT_QE_REPORT:
            raise _malformed(f"v4 certification data is type 6 (QE report), not {kind}")
        qe_fields = _Reader(wrapped, "the QE report certification data")
    qe_report = ReportBody(qe_fields.take(REPORT_BYTES, "the QE report"))
    qe_report_signature = qe_fields.take(64, "the QE report signature")
    qe_auth_data = qe_fields.take(qe_fields.u16("the QE auth data size"), "the QE auth data")
    kind, pem = qe_fields.certification_data("PCK certification data")
    if kind != CERT_PCK_CHAIN:
        raise _malformed(f"certification data type {kind} is not supported (5, PCK chain)")
    qe_fields.end()
    sig_data.end()
    return DcapQuote(
        version=version,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=qe_vendor_id,
        user_data=user_data,
        report=report,
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain=_pem_chain(pem),
        signed_bytes=data[: HEADER_BYTES + REPORT_BYTES],
    )


def _pem_chain(pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        # Intel's certificates conform to RFC 5280, so anything cryptography warns about
        # (a non-positive serial, say) is refused rather than logged.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # The quoting library NUL-terminates the PEM text.
            chain = x509.load_pem_x509_certificates(pem.rstrip(b"\x00"))
    except (ValueError, x509.InvalidVersion) as exc:
        raise _malformed("the PCK certification data is not a PEM certificate chain") from exc
    if caught:
        raise _malformed("the PCK certification data holds a non-conforming certificate")
    if len(chain) > _MAX_CHAIN:
        raise _malformed(f"the PCK chain holds more than {_MAX_CHAIN} certificates")
    return tuple(chain)


def verify_quote(
    quote: DcapQuote | bytes,
    *,
    binding: bytes,
    allowed_mrenclave: Collection[bytes],
    allowed_mrsigner: Collection[bytes],
    intel_root: x509.Certificate | bytes,
    now: datetime | None = None,
    allow_debug: bool = False,
) -> None:
    """Verify an SGX DCAP quote; raise :class:`AttestationError` on the first failed check.

    ``binding`` is the 32-byte :func:`rapha.attest.evidence.binding`; the enclave must put it
    in report data bytes 0..31 and zeros in bytes 32..63. The enclave is allowed when its
    MRENCLAVE is in ``allowed_mrenclave`` **or** its MRSIGNER is in ``allowed_mrsigner``
    (MRSIGNER admits every enclave, and every version, that key signs). ``intel_root`` is the
    Intel SGX Root CA (a certificate or its PEM); a root that is not a self-signed P-256
    certificate is a :class:`~rapha.errors.ConfigError`. ``now`` (timezone-aware, default
    the current time) is when every certificate must be valid. The module docstring lists
    the checks in order, and what is not checked (TCB Info, QE Identity, CRLs).
    """
    if len(binding) != 32:
        raise ValueError("binding is the 32-byte attestation binding")
    parsed = quote if isinstance(quote, DcapQuote) else parse_quote(quote)
    pck_key = _verify_chain(parsed.pck_chain, _root(intel_root), _instant(now))
    _verify_qe_report(parsed, pck_key)
    try:
        attestation_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + parsed.attestation_key
        )
    except ValueError as exc:
        raise AttestationError(
            Reason.SGX_QUOTE_INVALID, "the attestation key is not a P-256 point"
        ) from exc
    if not _ecdsa_valid(attestation_key, parsed.signature, parsed.signed_bytes):
        raise AttestationError(
            Reason.SGX_QUOTE_INVALID,
            "the quote signature does not verify under its attestation key",
        )
    report = parsed.report
    if report.report_data[:32] != binding:
        raise AttestationError(
            Reason.SGX_REPORT_DATA, "report data bytes 0..31 are not this nonce's binding"
        )
    if any(report.report_data[32:]):
        raise AttestationError(Reason.SGX_REPORT_DATA, "report data bytes 32..63 are not zero")
    if report.debug and not allow_debug:
        raise AttestationError(Reason.SGX_ENCLAVE_NOT_ALLOWED, "the enclave is a debug enclave")
    if report.mr_enclave not in allowed_mrenclave and report.mr_signer not in allowed_mrsigner:
        raise AttestationError(
            Reason.SGX_ENCLAVE_NOT_ALLOWED, "neither the MRENCLAVE nor the MRSIGNER is allowed"
        )


def _instant(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _root(intel_root: x509.Certificate | bytes) -> x509.Certificate:
    try:
        root = (
            intel_root
            if isinstance(intel_root, x509.Certificate)
            else x509.load_pem_x509_certificate(intel_root)
        )
        key = root.public_key()
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            "the configured Intel SGX root is not a self-signed certificate; "
            "configure the Intel SGX Root CA PEM"
        ) from exc
    if not _is_p256(key):
        raise ConfigError("the configured Intel SGX root does not have a P-256 key")
    return root


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def _extension(cert: x509.Certificate, kind: type[_T]) -> _T | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _verify_chain(
    chain: tuple[x509.Certificate, ...], root: x509.Certificate, now: datetime
) -> ec.EllipticCurvePublicKey:
    """Check leaf → … → root; return the PCK leaf's key. The quote may omit the root."""

    def refuse(detail: str) -> AttestationError:
        return AttestationError(Reason.SGX_CHAIN_INVALID, detail)

    certs = list(chain)
    if certs and certs[-1] == root:
        certs.pop()
    if not certs:
        raise refuse("the PCK chain holds no PCK certificate")
    path = [*certs, root]
    try:
        for depth, cert in enumerate(path):
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise refuse(f"certificate {depth} of the PCK chain is not valid at {now:%F %T%z}")
            if depth == 0:
                continue
            constraints = _extension(cert, x509.BasicConstraints)
            if constraints is None or not constraints.ca:
                raise refuse(f"certificate {depth} of the PCK chain is not a CA")
            if constraints.path_length is not None and depth - 1 > constraints.path_length:
                raise refuse(f"certificate {depth} of the PCK chain exceeds its path length")
            usage = _extension(cert, x509.KeyUsage)
            if usage is not None and not usage.key_cert_sign:
                raise refuse(f"certificate {depth} of the PCK chain may not sign certificates")
            path[depth - 1].verify_directly_issued_by(cert)
        pck_key = path[0].public_key()
    except InvalidSignature as exc:
        raise refuse("a PCK chain signature does not verify up to the Intel root") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise refuse("the PCK chain does not run to the configured Intel root") from exc
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or not _is_p256(pck_key):
        raise refuse("the PCK certificate does not have a P-256 key")
    return pck_key


def _verify_qe_report(quote: DcapQuote, pck_key: ec.EllipticCurvePublicKey) -> None:
    qe = quote.qe_report
    if not _ecdsa_valid(pck_key, quote.qe_report_signature, qe.raw):
        raise AttestationError(
            Reason.SGX_QUOTE_INVALID, "the QE report signature does not verify under the PCK key"
        )
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    if qe.report_data != expected + bytes(32):
        raise AttestationError(
            Reason.SGX_QUOTE_INVALID,
            "the QE report data is not SHA-256(attestation key ‖ QE auth data) and zeros",
        )
    if qe.mr_signer != INTEL_QE_MRSIGNER or qe.isv_prod_id != INTEL_QE_PROD_ID or qe.debug:
        raise AttestationError(
            Reason.SGX_QUOTE_INVALID, "the QE report is not from Intel's SGX quoting enclave"
        )


def _ecdsa_valid(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """ECDSA P-256 / SHA-256 with the signature as 32-byte big-endian r ‖ s."""
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def evidence_payload(quote: bytes) -> dict[str, str]:
    """The ``payload`` of ``sgx-dcap`` :class:`~rapha.attest.evidence.Evidence`: the quote."""
    return {"quote": b64encode(quote)}


def quote_from_payload(payload: Mapping[str, Any]) -> bytes:
    """The quote bytes of an ``sgx-dcap`` payload; a bad payload is ``MALFORMED``."""
    if not isinstance(payload, Mapping) or set(payload) != {"quote"}:
        raise _malformed("an sgx-dcap payload is {quote}")
    text = payload["quote"]
    if isinstance(text, str) and len(text) > (MAX_QUOTE_BYTES // 3 + 1) * 4:
        raise _malformed(f"the quote is larger than {MAX_QUOTE_BYTES} bytes")
    return b64decode(text, "the sgx-dcap quote")
