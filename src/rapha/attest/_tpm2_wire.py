"""TPM 2.0 structures as the hub reads them, and ``TPM2_MakeCredential`` in software.

Private to :mod:`rapha.attest.tpm2`. Pure ``cryptography``: no TPM, no ``tpm2-pytss``. It
reads the TPM's own big-endian marshalling (TPM 2.0 Library, Part 2): ``TPM2B_PUBLIC``
(RSA and ECC keys), ``TPMS_ATTEST`` holding a ``TPMS_QUOTE_INFO``, and ``TPMT_SIGNATURE``
(ECDSA, RSASSA, RSAPSS). Any defect is a :class:`WireError`; the caller picks the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

__all__ = [
    "AK_REQUIRED",
    "ALG_RSA",
    "ALG_SHA256",
    "DECRYPT",
    "EK_REQUIRED",
    "NotGeneratedError",
    "PublicArea",
    "Tpm2Quote",
    "WireError",
    "make_credential",
    "parse_public",
    "parse_quote",
    "verify_signature",
]

# TPM_ALG_ID and TPM_ECC_CURVE values (Part 2).
ALG_RSA: Final = 0x0001
ALG_SHA256: Final = 0x000B
_ECC, _NULL, _AES, _CFB = 0x0023, 0x0010, 0x0006, 0x0043
_ECDSA, _ECDAA, _RSASSA, _RSAPSS = 0x0018, 0x001A, 0x0014, 0x0016
_HASHES: Final[Mapping[int, type[hashes.HashAlgorithm]]] = {
    0x000B: hashes.SHA256,
    0x000C: hashes.SHA384,
    0x000D: hashes.SHA512,
}
_CURVES: Final[Mapping[int, type[ec.EllipticCurve]]] = {0x0003: ec.SECP256R1, 0x0004: ec.SECP384R1}
# TPMA_OBJECT bits.
_FIXED_TPM, _FIXED_PARENT, _SENSITIVE_ORIGIN = 1 << 1, 1 << 4, 1 << 5
_RESTRICTED, DECRYPT, _SIGN = 1 << 16, 1 << 17, 1 << 18
#: An AK: made in and bound to its TPM, signing only what the TPM generated.
AK_REQUIRED: Final = _FIXED_TPM | _FIXED_PARENT | _SENSITIVE_ORIGIN | _RESTRICTED | _SIGN
#: An EK: bound to its TPM, decrypting only TPM-formatted secrets.
EK_REQUIRED: Final = _FIXED_TPM | _FIXED_PARENT | _RESTRICTED | DECRYPT
_TPM_GENERATED: Final = 0xFF544347
_ST_ATTEST_QUOTE: Final = 0x8018


class WireError(ValueError):
    """A TPM structure is truncated, has trailing bytes or uses what we do not support."""


class _Reader:
    """Big-endian reads over one marshalled TPM structure."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._data):
            raise WireError("truncated")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def sized(self) -> bytes:
        """A ``TPM2B``: a 16-bit size, then that many bytes."""
        return self.take(self.uint(2))

    def end(self) -> None:
        if self._at != len(self._data):
            raise WireError("trailing bytes")


def _hash(alg: int) -> hashes.HashAlgorithm:
    found = _HASHES.get(alg)
    if found is None:
        raise WireError(f"hash algorithm 0x{alg:04x} is not supported")
    return found()


@dataclass(frozen=True, slots=True)
class PublicArea:
    """The parts of a ``TPMT_PUBLIC`` (RSA or ECC) the hub checks; ``area`` is its bytes."""

    area: bytes
    type: int
    name_alg: int
    attributes: int
    symmetric: tuple[int, int, int]
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def name(self) -> bytes:
        """The object's name: ``nameAlg ‖ H_nameAlg(TPMT_PUBLIC)`` (Part 1, "Names")."""
        digest = hashlib.new(_hash(self.name_alg).name, self.area).digest()
        return self.name_alg.to_bytes(2, "big") + digest

    def spki(self) -> bytes:
        """The key as DER ``SubjectPublicKeyInfo``, to compare with a certificate's."""
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def parse_public(blob: bytes) -> PublicArea:
    """Parse a marshalled ``TPM2B_PUBLIC`` holding an RSA or ECC key."""
    outer = _Reader(blob)
    area = outer.sized()
    outer.end()
    r = _Reader(area)
    kind, name_alg, attributes = r.uint(2), r.uint(2), r.uint(4)
    _hash(name_alg)
    r.sized()  # authPolicy
    sym_alg = r.uint(2)
    symmetric = (sym_alg, r.uint(2), r.uint(2)) if sym_alg != _NULL else (_NULL, 0, 0)
    scheme = r.uint(2)
    if scheme == _ECDAA:
        raise WireError("ECDAA keys are not supported")
    if scheme != _NULL:
        r.uint(2)  # the scheme's hash
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    try:
        if kind == ALG_RSA:
            r.uint(2)  # keyBits
            exponent = r.uint(4) or 65537
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(r.sized(), "big")).public_key()
        elif kind == _ECC:
            curve = _CURVES.get(r.uint(2))
            if curve is None:
                raise WireError("the ECC curve is not supported")
            if r.uint(2) != _NULL:  # kdf scheme
                r.uint(2)
            x, y = int.from_bytes(r.sized(), "big"), int.from_bytes(r.sized(), "big")
            key = ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
        else:
            raise WireError(f"key type 0x{kind:04x} is not RSA or ECC")
    except ValueError as exc:
        raise WireError(f"not a valid public key: {exc}") from exc
    r.end()
    return PublicArea(area, kind, name_alg, attributes, symmetric, key)


@dataclass(frozen=True, slots=True)
class Tpm2Quote:
    """A quote's ``TPMS_ATTEST`` with its ``TPMS_QUOTE_INFO`` (Part 2).

    ``reset_count`` grows at every TPM reset (reboot), ``restart_count`` at every resume;
    ``pcr_selection`` is ``((hash alg id, (pcr, ...)), ...)``; ``pcr_digest`` is the hash
    of the selected PCR values, concatenated.
    """

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selection: tuple[tuple[int, tuple[int, ...]], ...]
    pcr_digest: bytes


class NotGeneratedError(WireError):
    """The structure does not start with ``TPM_GENERATED_VALUE``: the TPM did not make it."""


def parse_quote(data: bytes) -> Tpm2Quote:
    """Parse a marshalled ``TPMS_ATTEST`` that must hold a quote."""
    r = _Reader(data)
    if r.uint(4) != _TPM_GENERATED:
        raise NotGeneratedError("the attestation is not TPM-generated")
    if r.uint(2) != _ST_ATTEST_QUOTE:
        raise WireError("the attestation is not a TPM2_Quote")
    signer, extra = r.sized(), r.sized()
    clock, resets, restarts, safe, firmware = r.uint(8), r.uint(4), r.uint(4), r.uint(1), r.uint(8)
    selection: list[tuple[int, tuple[int, ...]]] = []
    for _ in range(r.uint(4)):
        alg, size = r.uint(2), r.uint(1)
        bits = r.take(size)
        selection.append((alg, tuple(i for i in range(size * 8) if bits[i // 8] >> (i % 8) & 1)))
    digest = r.sized()
    r.end()
    return Tpm2Quote(
        signer, extra, clock, resets, restarts, safe == 1, firmware, tuple(selection), digest
    )


def verify_signature(
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, sig: bytes, data: bytes
) -> None:
    """Verify a marshalled ``TPMT_SIGNATURE`` over ``data``.

    Raises ``cryptography``'s ``InvalidSignature``, or :class:`WireError` for a signature
    that cannot be read or whose scheme does not fit the key.
    """
    r = _Reader(sig)
    alg, digest = r.uint(2), _hash(r.uint(2))
    if alg == _ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
        sig_r, sig_s = int.from_bytes(r.sized(), "big"), int.from_bytes(r.sized(), "big")
        r.end()
        key.verify(encode_dss_signature(sig_r, sig_s), data, ec.ECDSA(digest))
    elif alg in (_RSASSA, _RSAPSS) and isinstance(key, rsa.RSAPublicKey):
        raw = r.sized()
        r.end()
        pad: padding.AsymmetricPadding = padding.PKCS1v15()
        if alg == _RSAPSS:
            pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
        key.verify(raw, data, pad, digest)
    else:
        raise WireError(f"signature scheme 0x{alg:04x} does not fit the key")


def _kdfa(name_alg: int, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """KDFa (Part 1): SP 800-108 counter-mode HMAC over ``label ‖ 0 ‖ context ‖ bits``."""
    return KBKDFHMAC(
        algorithm=_hash(name_alg),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    ).derive(key)


def make_credential(ek: PublicArea, name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """``TPM2_MakeCredential`` in software for an RSA EK (Part 1, "Credential Protection").

    The seed is RSA-OAEP encrypted to the EK with label ``IDENTITY``; ``secret`` is
    AES-CFB encrypted under ``KDFa(seed, "STORAGE", name)`` and HMACed under
    ``KDFa(seed, "INTEGRITY")`` together with ``name``, so only the TPM holding the EK
    *and* an object of that name can recover it. Returns the ``TPM2B_ID_OBJECT`` and
    ``TPM2B_ENCRYPTED_SECRET`` contents (without their size fields).
    """
    sym_alg, sym_bits, sym_mode = ek.symmetric
    if not isinstance(ek.key, rsa.RSAPublicKey) or (sym_alg, sym_mode) != (_AES, _CFB):
        raise WireError("the EK is not an RSA key with AES-CFB")
    digest = _hash(ek.name_alg)
    seed = secrets.token_bytes(digest.digest_size)
    oaep = padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=b"IDENTITY\0")
    encrypted_seed = ek.key.encrypt(seed, oaep)
    key = _kdfa(ek.name_alg, seed, b"STORAGE", name, sym_bits)
    encryptor = Cipher(algorithms.AES(key), CFB(b"\0" * 16)).encryptor()
    identity = encryptor.update(len(secret).to_bytes(2, "big") + secret) + encryptor.finalize()
    hmac_key = _kdfa(ek.name_alg, seed, b"INTEGRITY", b"", digest.digest_size * 8)
    outer = hmac.new(hmac_key, identity + name, digest.name).digest()
    return len(outer).to_bytes(2, "big") + outer + identity, encrypted_seed
