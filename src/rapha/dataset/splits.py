"""Patient-level train / val / test assignment.

A patient's split is a pure function of (split key, PatientID, ratios): an HMAC-SHA256 of
the raw PatientID under the hospital's split key, read as a number in [0, 1) and cut at the
ratios. Consequences, each by construction:

* a patient never spans two splits, whichever studies or jobs their images arrive through;
* the split does not depend on the job (no job salt, no arrival order), so the test set of
  one hospital stays the same across jobs;
* the split key is separate from the pseudonym key, so rotating either leaves the other's
  output unchanged;
* the test interval comes first, [0, test), so changing only the train/val ratio never
  moves a patient into or out of test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Final

from rapha.crypto import hmac_sha256
from rapha.errors import ConfigError, DataError, KeyFileError

__all__ = [
    "DEFAULT_RATIOS",
    "SPLIT_KEY_LENGTH",
    "Split",
    "assign_split",
    "check_ratios",
]

SPLIT_KEY_LENGTH: Final = 32
DEFAULT_RATIOS: Final = (0.7, 0.15, 0.15)
_DOMAIN: Final = b"rapha-split-v1\x00"
_SCALE: Final = float(1 << 64)


class Split(StrEnum):
    """A view split. Declaration order is the canonical order (train, val, test)."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, val, test) ratios: three positive finite numbers summing to 1 +- 1e-9.

    Raises :class:`ConfigError` naming the rule that failed.
    """
    values = tuple(ratios)
    if len(values) != 3:
        raise ConfigError(f"split ratios are (train, val, test): 3 numbers, not {len(values)}")
    try:
        train, val, test = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ConfigError("split ratios must be numbers") from exc
    if not all(math.isfinite(v) and v > 0 for v in (train, val, test)):
        raise ConfigError("every split ratio must be a positive number")
    if abs(train + val + test - 1.0) > 1e-9:
        raise ConfigError(f"split ratios must sum to 1, not {train + val + test:.12g}")
    return train, val, test


def assign_split(
    patient_id: str, split_key: bytes, ratios: Sequence[float] = DEFAULT_RATIOS
) -> Split:
    """Return the split of the patient with raw PatientID ``patient_id``.

    ``split_key`` is the hospital's 32-byte split key (:data:`SPLIT_KEY_LENGTH`), not the
    pseudonym key. Leading and trailing spaces are ignored (DICOM pads LO values). Raises
    :class:`KeyFileError` for a key of another length, :class:`ConfigError` for invalid
    ratios and :class:`DataError` for an empty PatientID (such a record cannot be placed
    and is excluded by the caller).
    """
    if len(split_key) != SPLIT_KEY_LENGTH:
        raise KeyFileError(f"the split key must be exactly {SPLIT_KEY_LENGTH} bytes")
    _, val, test = check_ratios(ratios)
    patient = patient_id.strip(" \x00")
    if not patient:
        raise DataError("record has no PatientID; it cannot be assigned to a split")
    mac = hmac_sha256(split_key, _DOMAIN + patient.encode("utf-8"))
    point = int.from_bytes(mac[:8], "big") / _SCALE
    if point < test:
        return Split.TEST
    if point < test + val:
        return Split.VAL
    return Split.TRAIN
