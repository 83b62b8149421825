"""Keyed pseudonyms: stable ones that stay inside the node, per-job ids that leave it.

Every identifier is replaced by HMAC-SHA256 (RFC 2104) under the hospital's 32-byte key,
so only the holder of the key can recompute (and so look up) a pseudonym; changing the key
changes every pseudonym.

Domain separation
    The HMAC input is ``len ‖ "rapha.pseudonym.v1" ‖ len ‖ domain ‖ len ‖ value``, each part
    prefixed by its length as 8 big-endian bytes. The same string in two domains (a
    PatientID that equals an AccessionNumber) gets unrelated pseudonyms, and no choice of
    separator characters inside a value (``"a|b"``) can make two different
    ``(domain, value)`` pairs share an input.

Values
    Leading and trailing spaces and NUL bytes are dropped first: PS3.5 6.2 makes them
    padding, not content, for every string VR an identifier can have (LO, SH, UI, PN), so
    ``"12345 "`` and ``"12345"`` name the same patient.

UIDs
    :meth:`Pseudonymizer.uid` maps a UID to ``2.25.<n>``, the UUID-derived form of PS3.5
    B.2, where ``n`` is the first 16 bytes of the HMAC read as an RFC 9562 version-8
    (custom) UUID: at most 128 bits, at most 44 characters, only digits and dots, no
    leading zeros. The mapping is deterministic, so every instance of a study gets the same
    pseudonymous StudyInstanceUID and the study/series/instance structure survives.

Per-job record ids
    :func:`record_id` is the HMAC of a stable pseudonym under a per-job salt. Model code
    only ever sees these; without the salt two jobs' ids cannot be linked to each other,
    and without the key none can be linked to a patient.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Final

from rapha.crypto import hmac_sha256, load_secret
from rapha.errors import DataError, KeyFileError, UsageError

__all__ = [
    "KEY_SIZE",
    "MIN_JOB_SALT_SIZE",
    "Domain",
    "Pseudonymizer",
    "record_id",
]

KEY_SIZE: Final = 32
MIN_JOB_SALT_SIZE: Final = 16
_CONTEXT: Final = b"rapha.pseudonym.v1"
_RECORD_CONTEXT: Final = b"rapha.record-id.v1"
_RECORD_ID_BYTES: Final = 16  # 128 bits: collision-free for any job's record count
_UID_ROOT: Final = "2.25."
_PADDING: Final = " \x00"


class Domain(enum.StrEnum):
    """What kind of identifier a value is; each kind has its own pseudonym space."""

    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"
    ACCESSION = "accession"


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


class Pseudonymizer:
    """Pseudonyms under one hospital key. Never printed: the repr hides the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        """Use ``key``, which must be exactly :data:`KEY_SIZE` bytes."""
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            size = len(key) if isinstance(key, bytes) else type(key).__name__
            raise KeyFileError(
                f"the pseudonym key must be exactly {KEY_SIZE} bytes, not {size} "
                "(create one with `rapha node init`)"
            )
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> Pseudonymizer:
        """Load the key from a 0600 file of exactly 32 bytes (:func:`rapha.crypto.load_secret`)."""
        return cls(load_secret(path, length=KEY_SIZE))

    def __repr__(self) -> str:
        return "Pseudonymizer(key=<hidden>)"

    def _mac(self, domain: Domain, value: str) -> bytes:
        domain = Domain(domain)
        text = value.strip(_PADDING)
        if not text:
            # An empty identifier would send every record that lacks one to one pseudonym.
            raise DataError(f"an empty {domain.value} identifier cannot be pseudonymised")
        return hmac_sha256(self._key, _framed(_CONTEXT, domain.value.encode(), text.encode()))

    def pseudonym(self, domain: Domain, value: str) -> str:
        """The stable pseudonym of ``value``: 64 lower-case hex digits. Node-internal."""
        return self._mac(domain, value).hex()

    def uid(self, domain: Domain, uid: str) -> str:
        """A valid ``2.25.<n>`` UID (PS3.5 B.2, 9.1) standing for ``uid`` in ``domain``."""
        raw = bytearray(self._mac(domain, uid)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # RFC 9562 5.8: version 8 (custom)
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 4.1: variant 10xx
        return _UID_ROOT + str(int.from_bytes(raw, "big"))


def record_id(stable_pseudonym: str, job_salt: bytes) -> str:
    """The per-job id of a record: HMAC-SHA256 of its stable pseudonym under the job salt.

    Returns 32 lower-case hex digits (128 bits). ``job_salt`` must be at least
    :data:`MIN_JOB_SALT_SIZE` random bytes, fresh for each job.
    """
    if not isinstance(job_salt, bytes) or len(job_salt) < MIN_JOB_SALT_SIZE:
        raise UsageError(f"a job salt is at least {MIN_JOB_SALT_SIZE} random bytes")
    if not stable_pseudonym:
        raise UsageError("a record id needs a non-empty stable pseudonym")
    mac = hmac_sha256(job_salt, _framed(_RECORD_CONTEXT, stable_pseudonym.encode()))
    return mac[:_RECORD_ID_BYTES].hex()
