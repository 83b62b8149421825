"""TPM 2.0 evidence: an event log in a PCR, quoted by an attestation key the hub enrolled.

**Node side**, :class:`Tpm2Provider` (needs ``tpm2-pytss``, the ``attest`` extra, built
against Debian's ``libtss2-dev``; imported lazily, so this module imports without it):

1. *Measure.* Each event of the node's event log is extended, in order, into one SHA-256
   PCR: ``PCR = SHA-256(PCR ‖ event value)`` (TPM 2.0 Library, Part 1, "PCR Extend"),
   the value being :func:`rapha.attest.measure.event_value`, so a PCR extended from its
   reset value holds exactly the measurement digest.
   PCR 15 by default; 16 (debug) and 23 (application) can be reset by software and are
   refused, as is anything outside 0..23. A PCR is extended only from its reset value, so
   a restarted node with unchanged software does not extend twice; a PCR holding another
   history needs a TPM reset (a reboot).
2. *Enrol.* The EK is recreated from the TCG standard RSA 2048 template (EK Credential
   Profile, template L-1) and its certificate read from NV index ``0x01C00002``, where
   manufacturers (and ``swtpm_setup --create-ek-cert``) store it. The AK is a restricted
   ECDSA P-256/SHA-256 signing key, a child of the EK, made persistent at ``ak_handle``.
3. *Prove the AK is in that TPM.* The hub runs ``MakeCredential`` in software for the
   EK's public key and the AK's name (:func:`make_credential_challenge`); only the TPM
   holding both can ``ActivateCredential`` it (:meth:`Tpm2Provider.activate_credential`).
4. *Quote.* ``TPM2_Quote`` over ``sha256:[pcr]`` with ``qualifyingData`` =
   :func:`rapha.attest.evidence.binding` (32 bytes).

Transient objects (the EK, a new AK) and sessions are flushed after every operation: a
TPM without a resource manager (``swtpm`` reached directly) has three object slots.

**Hub side** is pure software on ``cryptography`` (no TPM, no ``tpm2-pytss``):
:func:`make_credential_challenge`, :func:`check_activation`, :func:`replay` and
:func:`verify_quote`, reading the TPM's own marshalling (TPM 2.0 Library, Part 2; see
:mod:`rapha.attest._tpm2_wire`): ``TPM2B_PUBLIC``, ``TPMS_ATTEST``, ``TPMT_SIGNATURE``.

The evidence payload is ``{"quote": b64(TPMS_ATTEST), "signature": b64(TPMT_SIGNATURE),
"pcr": int, "bank": "sha256", "ak_name": b64(AK name)}``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from rapha.attest._tpm2_wire import (
    AK_REQUIRED,
    ALG_RSA,
    ALG_SHA256,
    DECRYPT,
    EK_REQUIRED,
    NotGeneratedError,
    PublicArea,
    Tpm2Quote,
    WireError,
    make_credential,
    parse_public,
    parse_quote,
    verify_signature,
)
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
from rapha.attest.measure import event_value
from rapha.errors import DataError, DependencyError, RaphaError, RemoteError, UsageError

__all__ = [
    "DEFAULT_AK_HANDLE",
    "DEFAULT_PCR",
    "EK_CERTIFICATE_NV_INDEX",
    "Tpm2Enrollment",
    "Tpm2Provider",
    "Tpm2Quote",
    "check_activation",
    "make_credential_challenge",
    "replay",
    "verify_quote",
]

DEFAULT_PCR: Final = 15
DEFAULT_AK_HANDLE: Final = 0x81010002
#: Where the RSA 2048 EK certificate lives (TCG EK Credential Profile, low range).
EK_CERTIFICATE_NV_INDEX: Final = 0x01C00002
ENROLLMENT_SCHEMA: Final = "rapha.tpm2-enrollment/1"
#: PCRs 16 (debug) and 23 (application) can be reset by software (PC Client PTP).
_MEASURABLE_PCRS: Final = frozenset(range(24)) - {16, 23}
_OWNER_PERSISTENT: Final = range(0x81000000, 0x81800000)
_ZERO_PCR: Final = b"\0" * 32
_SECRET_BYTES: Final = 32


# --- hub side ----------------------------------------------------------------------------


def _check_pcr(pcr: object, error: type[RaphaError] | None = None) -> int:
    """``pcr`` as a PCR index software cannot reset; else ``error`` (default PCR_INVALID)."""
    if isinstance(pcr, int) and not isinstance(pcr, bool) and pcr in _MEASURABLE_PCRS:
        return pcr
    message = f"PCR {pcr!r} cannot hold a measurement: use 0..23 except 16 and 23 (resettable)"
    if error is None:
        raise AttestationError(Reason.PCR_INVALID, message)
    raise error(message)


@dataclass(frozen=True, slots=True)
class Tpm2Enrollment:
    """What a node sends to enrol its TPM: the EK certificate (DER), the EK's and the AK's
    marshalled ``TPM2B_PUBLIC`` and the AK's name (``nameAlg ‖ digest``)."""

    ek_certificate: bytes
    ek_public: bytes
    ak_public: bytes
    ak_name: bytes

    def to_json(self) -> dict[str, str]:
        """Plain JSON with base64 fields, for the hub to store."""
        return {
            "schema": ENROLLMENT_SCHEMA,
            "ek_certificate": b64encode(self.ek_certificate),
            "ek_public": b64encode(self.ek_public),
            "ak_public": b64encode(self.ak_public),
            "ak_name": b64encode(self.ak_name),
        }

    @classmethod
    def from_json(cls, value: Any) -> Tpm2Enrollment:
        """Parse untrusted JSON; any defect is :class:`AttestationError` ``MALFORMED``."""
        if not isinstance(value, Mapping) or value.get("schema") != ENROLLMENT_SCHEMA:
            raise AttestationError(Reason.MALFORMED, f"not a {ENROLLMENT_SCHEMA} enrolment")
        fields = ("ek_certificate", "ek_public", "ak_public", "ak_name")
        return cls(*(b64decode(value.get(name), f"the enrolment's {name}") for name in fields))


def _load_certificate(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _check_ek_certificate(
    enrollment: Tpm2Enrollment,
    ca_certificates: Sequence[bytes],
    intermediates: Sequence[bytes],
    now: datetime | None,
) -> PublicArea:
    """The EK public area, once its certificate chains to a CA and names the same key.

    The chain is checked with ``cryptography``'s path validation: CA certificates under
    the Web PKI CA profile (basic constraints, key usage), the EK certificate itself under
    no extension policy, since EK certificates carry a critical TPM ``subjectAltName`` and
    no server/client EKU (TCG EK Credential Profile). Signatures and validity windows are
    checked at every step.
    """
    if not ca_certificates:
        raise UsageError("give the TPM manufacturers' CA certificates (ek_ca_certificates)")
    try:
        anchors = [_load_certificate(c) for c in ca_certificates]
        chain = [_load_certificate(c) for c in intermediates]
    except ValueError as exc:
        raise UsageError(f"an EK CA certificate is not a PEM or DER certificate: {exc}") from exc
    try:
        certificate = _load_certificate(enrollment.ek_certificate)
    except ValueError as exc:
        raise AttestationError(Reason.EK_CHAIN_INVALID, "the EK certificate is not X.509") from exc
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(now or datetime.now(UTC))
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(certificate, chain)
    except VerificationError as exc:
        raise AttestationError(
            Reason.EK_CHAIN_INVALID, f"the EK certificate does not chain to a trusted CA: {exc}"
        ) from exc
    try:
        ek = parse_public(enrollment.ek_public)
    except WireError as exc:
        raise AttestationError(Reason.MALFORMED, f"the EK public area: {exc}") from exc
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not hmac.compare_digest(spki, ek.spki()):
        raise AttestationError(Reason.EK_CHAIN_INVALID, "the EK certificate is for another key")
    if ek.attributes & EK_REQUIRED != EK_REQUIRED or ek.type != ALG_RSA:
        raise AttestationError(
            Reason.EK_CHAIN_INVALID, "the EK is not a fixed, restricted RSA decryption key"
        )
    return ek


def _check_ak(ak_public: bytes) -> PublicArea:
    try:
        ak = parse_public(ak_public)
    except WireError as exc:
        raise AttestationError(Reason.AK_NOT_ENROLLED, f"the AK public area: {exc}") from exc
    missing = AK_REQUIRED & ~ak.attributes
    if missing or ak.attributes & DECRYPT:
        raise AttestationError(
            Reason.AK_NOT_ENROLLED,
            "the AK is not a TPM-generated restricted signing key (needs fixedTPM, "
            f"fixedParent, sensitiveDataOrigin, restricted, sign, not decrypt): "
            f"attributes 0x{ak.attributes:08x}",
        )
    return ak


def make_credential_challenge(
    enrollment: Tpm2Enrollment,
    *,
    ca_certificates: Sequence[bytes],
    intermediates: Sequence[bytes] = (),
    now: datetime | None = None,
) -> tuple[bytes, bytes, bytes]:
    """Check an enrolment and challenge the TPM to prove the AK lives beside the EK.

    ``ca_certificates`` are trusted roots (DER or PEM), ``intermediates`` untrusted CA
    certificates that may complete the path. Checks, in order: the EK certificate chains to
    a root at ``now`` (``EK_CHAIN_INVALID``), names the key of ``ek_public``
    (``EK_CHAIN_INVALID``); the AK is a restricted TPM signing key whose name is
    ``ak_name`` (``AK_NOT_ENROLLED``). Returns ``(secret, credential_blob,
    encrypted_secret)``: keep the 32-byte secret, send the other two to the node's
    :meth:`Tpm2Provider.activate_credential`, then :func:`check_activation`.
    """
    ek = _check_ek_certificate(enrollment, ca_certificates, intermediates, now)
    ak = _check_ak(enrollment.ak_public)
    if not hmac.compare_digest(ak.name, enrollment.ak_name):
        raise AttestationError(Reason.AK_NOT_ENROLLED, "the AK name does not match its public area")
    secret = secrets.token_bytes(_SECRET_BYTES)
    try:
        blob, encrypted = make_credential(ek, ak.name, secret)
    except WireError as exc:
        raise AttestationError(Reason.EK_CHAIN_INVALID, str(exc)) from exc
    return secret, blob, encrypted


def check_activation(expected_secret: bytes, returned_secret: bytes) -> None:
    """Accept the AK only if the TPM recovered the challenge secret (constant time)."""
    if not hmac.compare_digest(expected_secret, returned_secret):
        raise AttestationError(
            Reason.AK_NOT_ACTIVATED,
            "the TPM did not recover the credential secret: the AK is not in the TPM whose EK "
            "was certified; enrol again",
        )


def replay(events: Sequence[Event], *, initial: bytes = _ZERO_PCR) -> bytes:
    """The SHA-256 PCR value after extending ``events`` in order from ``initial``."""
    value = initial
    for event in events:
        value = hashlib.sha256(value + _event_value(event)).digest()
    return value


def _event_value(event: Event) -> bytes:
    """What one event extends into the PCR (:func:`rapha.attest.measure.event_value`)."""
    try:
        return event_value(event.to_json())
    except DataError as exc:
        raise AttestationError(Reason.MALFORMED, str(exc)) from exc


def verify_quote(evidence: Evidence, *, ak_public: bytes, pcr: int = DEFAULT_PCR) -> Tpm2Quote:
    """Verify ``tpm2`` evidence against the enrolled AK; return the parsed quote.

    Order and reasons: payload structure and base64 (``MALFORMED``); payload PCR and bank
    (``PCR_INVALID``); the AK public area (``AK_NOT_ENROLLED``); the signature over the
    raw ``TPMS_ATTEST`` bytes, checked before they are parsed, so any changed byte is
    ``SIGNATURE_INVALID``, as is a signed structure that is not ``TPM_GENERATED``; a
    signed attestation that is not a quote is ``MALFORMED``; the PCR selection must be
    exactly ``sha256:[pcr]`` (``PCR_INVALID``); ``extraData`` must equal the evidence's
    binding (``BINDING_MISMATCH``); ``pcrDigest`` must be SHA-256 of :func:`replay` of the
    event log (``EVENT_LOG_MISMATCH``). Nonce freshness, and matching the payload's
    ``ak_name`` to the enrolled AK, are the caller's.
    """
    pcr = _check_pcr(pcr)
    payload = evidence.payload
    if evidence.kind != "tpm2" or not isinstance(payload, Mapping):
        raise AttestationError(Reason.MALFORMED, "not tpm2 evidence")
    quote = b64decode(payload.get("quote"), "the tpm2 quote")
    signature = b64decode(payload.get("signature"), "the tpm2 quote signature")
    if payload.get("bank") != "sha256" or payload.get("pcr") != pcr:
        raise AttestationError(Reason.PCR_INVALID, f"the quote is not over sha256 PCR {pcr}")
    ak = _check_ak(ak_public)
    try:
        verify_signature(ak.key, signature, quote)
    except (InvalidSignature, WireError) as exc:
        raise AttestationError(
            Reason.SIGNATURE_INVALID, "the quote's signature does not verify under the AK"
        ) from exc
    try:
        info = parse_quote(quote)
    except NotGeneratedError as exc:
        # A restricted key signs only what the TPM generated: this key is no real AK.
        raise AttestationError(Reason.SIGNATURE_INVALID, f"the signed quote: {exc}") from exc
    except WireError as exc:
        raise AttestationError(Reason.MALFORMED, f"the signed quote: {exc}") from exc
    if info.pcr_selection != ((ALG_SHA256, (pcr,)),):
        raise AttestationError(
            Reason.PCR_INVALID, f"the quote selects other PCRs than sha256:{pcr}"
        )
    if not hmac.compare_digest(info.extra_data, evidence.binding):
        raise AttestationError(
            Reason.BINDING_MISMATCH, "the quote is bound to another nonce or node key"
        )
    if not hmac.compare_digest(info.pcr_digest, hashlib.sha256(replay(evidence.events)).digest()):
        raise AttestationError(
            Reason.EVENT_LOG_MISMATCH, f"the event log does not replay to the quoted PCR {pcr}"
        )
    return info


# --- node side ----------------------------------------------------------------------------


def _tss() -> Any:
    """The ``tpm2_pytss`` package, imported on first use."""
    try:
        import tpm2_pytss
        import tpm2_pytss.utils
    except (ImportError, OSError) as exc:
        raise DependencyError(
            "tpm2-pytss is not installed: install rapha[attest] (it builds against Debian's "
            f"libtss2-dev; scripts/install-system-deps installs it): {exc}"
        ) from exc
    return tpm2_pytss


def _der_only(data: bytes) -> bytes:
    """The DER certificate at the start of an NV index (some TPMs pad the index after it)."""
    if len(data) < 4 or data[:2] != b"\x30\x82":  # SEQUENCE, two length bytes
        return data
    return data[: 4 + int.from_bytes(data[2:4], "big")]


def _is_tpm_response(exc: Any) -> bool:
    """Whether a TSS2_Exception is the TPM's own answer (layer 0), not the stack's."""
    return int(exc.rc) >> 16 == 0


class Tpm2Provider:
    """Evidence from a TPM 2.0 reached through a TCTI (``swtpm:host=…,port=…``, ``device:…``).

    Every operation opens its own ESAPI connection and flushes what it loaded before
    closing it. TPM failures become :class:`RemoteError`; a missing ``tpm2-pytss`` is
    :class:`DependencyError`.
    """

    kind: EvidenceKind = "tpm2"

    def __init__(
        self, tcti: str, *, pcr: int = DEFAULT_PCR, ak_handle: int = DEFAULT_AK_HANDLE
    ) -> None:
        if not isinstance(tcti, str) or not tcti:
            raise UsageError("tcti must name a TPM, for example 'device:/dev/tpmrm0'")
        self.pcr = _check_pcr(pcr, UsageError)
        if not isinstance(ak_handle, int) or ak_handle not in _OWNER_PERSISTENT:
            raise UsageError(
                f"ak_handle {ak_handle!r} is not an owner persistent handle "
                "(0x81000000..0x817fffff)"
            )
        self.tcti = tcti
        self.ak_handle = ak_handle

    @contextmanager
    def _tpm(self, action: str) -> Iterator[tuple[Any, Any]]:
        tss = _tss()
        try:
            ectx = tss.ESAPI(self.tcti)
        except tss.TSS2_Exception as exc:
            raise RemoteError(
                f"cannot reach the TPM through {self.tcti!r} to {action} ({exc}): check that "
                "the TPM (or swtpm) is running and the tcti setting names it"
            ) from exc
        try:
            yield tss, ectx
        except tss.TSS2_Exception as exc:
            raise RemoteError(f"the TPM failed to {action}: {exc}") from exc
        finally:
            ectx.close()

    @staticmethod
    def _handles(tss: Any, ectx: Any, first: int) -> set[int]:
        found: set[int] = set()
        more, start = True, first
        while more:
            more, data = ectx.get_capability(tss.TPM2_CAP.HANDLES, start, 64)
            handles = [int(h) for h in data.data.handles]
            found.update(h for h in handles if h >> 24 == first >> 24)
            start = max(handles, default=start) + 1
        return found

    def _create_ek(self, tss: Any, ectx: Any) -> tuple[Any, Any, bytes | None]:
        """The EK from the standard template (and any template/nonce the TPM holds in NV)."""
        defined = self._handles(tss, ectx, tss.TPM2_HC.NV_INDEX_FIRST)
        read_nv = tss.utils.NVReadEK(ectx)

        def read(index: int) -> bytes:
            if int(index) not in defined:
                raise tss.utils.NoSuchIndex(index)
            return bytes(read_nv(index))

        certificate, template = tss.utils.create_ek_template("EK-RSA2048", read)
        handle, public, *_ = ectx.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)
        return handle, public, certificate

    @contextmanager
    def _ek_policy(self, tss: Any, ectx: Any) -> Iterator[Any]:
        """A policy session meeting the standard EK policy, PolicySecret(TPM_RH_ENDORSEMENT)."""
        session = ectx.start_auth_session(
            tss.ESYS_TR.NONE, tss.ESYS_TR.NONE, tss.TPM2_SE.POLICY, None, tss.TPM2_ALG.SHA256
        )
        try:
            ectx.policy_secret(tss.ESYS_TR.ENDORSEMENT, session, expiration=0)
            yield session
        finally:
            ectx.flush_context(session)

    def _ak(self, tss: Any, ectx: Any) -> Any:
        if self.ak_handle not in self._handles(tss, ectx, tss.TPM2_HC.PERSISTENT_FIRST):
            raise UsageError(f"no attestation key at 0x{self.ak_handle:08x}: enrol the node first")
        return ectx.tr_from_tpmpublic(self.ak_handle)

    def _create_ak(self, tss: Any, ectx: Any, ek: Any) -> None:
        attributes = (
            tss.TPMA_OBJECT.FIXEDTPM
            | tss.TPMA_OBJECT.FIXEDPARENT
            | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
            | tss.TPMA_OBJECT.USERWITHAUTH
            | tss.TPMA_OBJECT.RESTRICTED
            | tss.TPMA_OBJECT.SIGN_ENCRYPT
        )
        template = tss.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attributes)
        with self._ek_policy(tss, ectx) as session:
            private, public, *_ = ectx.create(ek, None, template, session1=session)
        with self._ek_policy(tss, ectx) as session:
            transient = ectx.load(ek, private, public, session1=session)
        try:
            ectx.tr_close(ectx.evict_control(tss.ESYS_TR.OWNER, transient, self.ak_handle))
        finally:
            ectx.flush_context(transient)

    def enrollment(self) -> Tpm2Enrollment:
        """The EK certificate, EK and AK public areas and AK name, for the hub.

        Creates the AK and makes it persistent at ``ak_handle`` unless an AK is there.
        """
        with self._tpm("enrol the attestation key") as (tss, ectx):
            ek, ek_public, certificate = self._create_ek(tss, ectx)
            try:
                if certificate is None:
                    raise DependencyError(
                        f"the TPM holds no EK certificate at NV 0x{EK_CERTIFICATE_NV_INDEX:08x}: "
                        "provision one (swtpm_setup --create-ek-cert) or ask the TPM vendor"
                    )
                if self.ak_handle not in self._handles(tss, ectx, tss.TPM2_HC.PERSISTENT_FIRST):
                    self._create_ak(tss, ectx, ek)
            finally:
                ectx.flush_context(ek)
            ak = self._ak(tss, ectx)
            try:
                ak_public, ak_name, _ = ectx.read_public(ak)
            finally:
                ectx.tr_close(ak)
        enrollment = Tpm2Enrollment(
            _der_only(bytes(certificate)), ek_public.marshal(), ak_public.marshal(), bytes(ak_name)
        )
        try:
            _check_ak(enrollment.ak_public)
        except AttestationError as exc:
            raise UsageError(
                f"0x{self.ak_handle:08x} holds another key than an attestation key: evict it "
                f"(tpm2_evictcontrol -C o -c 0x{self.ak_handle:08x}) or choose another ak_handle"
            ) from exc
        return enrollment

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """``TPM2_ActivateCredential`` of the hub's challenge with the AK and the EK.

        Returns the recovered secret; a credential made for another TPM or AK is
        :class:`AttestationError` ``AK_NOT_ACTIVATED``.
        """
        with self._tpm("activate the hub's credential") as (tss, ectx):
            ek, _, _ = self._create_ek(tss, ectx)
            try:
                ak = self._ak(tss, ectx)
                try:
                    with self._ek_policy(tss, ectx) as session:
                        recovered = ectx.activate_credential(
                            ak,
                            ek,
                            tss.TPM2B_ID_OBJECT(credential=credential_blob),
                            tss.TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret),
                            session2=session,
                        )
                except tss.TSS2_Exception as exc:
                    if not _is_tpm_response(exc):
                        raise
                    raise AttestationError(
                        Reason.AK_NOT_ACTIVATED,
                        f"the TPM refused the credential ({exc}): it was made for another EK or "
                        "AK; enrol again",
                    ) from exc
                finally:
                    ectx.tr_close(ak)
            finally:
                ectx.flush_context(ek)
        return bytes(recovered)

    def _read_pcr(self, tss: Any, ectx: Any) -> bytes:
        _, _, values = ectx.pcr_read(tss.TPML_PCR_SELECTION.parse(f"sha256:{self.pcr}"))
        return bytes(values[0])

    def _extend(self, tss: Any, ectx: Any, events: Sequence[Event]) -> None:
        target = replay(events)
        current = self._read_pcr(tss, ectx)
        if current == target:
            return
        if current != _ZERO_PCR:
            raise AttestationError(
                Reason.EVENT_LOG_MISMATCH,
                f"PCR {self.pcr} holds another measurement history than this event log: reboot "
                f"(a TPM reset clears PCR {self.pcr}) to attest this software",
            )
        handle = getattr(tss.ESYS_TR, f"PCR{self.pcr}")
        for event in events:
            value = tss.TPMT_HA(
                hashAlg=tss.TPM2_ALG.SHA256, digest=tss.TPMU_HA(sha256=_event_value(event))
            )
            ectx.pcr_extend(handle, tss.TPML_DIGEST_VALUES([value]))
        if self._read_pcr(tss, ectx) != target:
            raise AttestationError(
                Reason.EVENT_LOG_MISMATCH,
                f"PCR {self.pcr} was extended by someone else meanwhile: reboot and start again",
            )

    def extend(self, events: Sequence[Event]) -> None:
        """Extend ``events`` into the PCR unless it already holds exactly them (idempotent).

        A PCR holding another history raises :class:`AttestationError`
        ``EVENT_LOG_MISMATCH``: only a TPM reset (reboot) clears it.
        """
        with self._tpm(f"extend PCR {self.pcr}") as (tss, ectx):
            self._extend(tss, ectx, events)

    def read_pcr(self) -> bytes:
        """The current SHA-256 value of the PCR."""
        with self._tpm(f"read PCR {self.pcr}") as (tss, ectx):
            return self._read_pcr(tss, ectx)

    def evidence(
        self,
        *,
        node_id: str,
        node_public_key: bytes,
        nonce: bytes,
        measurement: str,
        events: Sequence[Event],
    ) -> Evidence:
        """Extend ``events`` (if not yet) and quote the PCR over the node-key binding."""
        qualifying = binding(nonce, node_public_key)
        with self._tpm("quote the PCR") as (tss, ectx):
            self._extend(tss, ectx, events)
            ak = self._ak(tss, ectx)
            try:
                _, ak_name, _ = ectx.read_public(ak)
                selection = tss.TPML_PCR_SELECTION.parse(f"sha256:{self.pcr}")
                quoted, signature = ectx.quote(ak, selection, qualifying)
            finally:
                ectx.tr_close(ak)
        payload = {
            "quote": b64encode(bytes(quoted)),
            "signature": b64encode(signature.marshal()),
            "pcr": self.pcr,
            "bank": "sha256",
            "ak_name": b64encode(bytes(ak_name)),
        }
        return Evidence(
            kind="tpm2",
            node_id=node_id,
            node_public_key=node_public_key,
            nonce=nonce,
            measurement=measurement,
            events=tuple(events),
            payload=payload,
        )
