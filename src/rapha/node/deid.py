"""De-identifying one instance: its header facts and its pixels, as the node pipeline uses them.

Two steps, kept apart so a caller (and ``bench/deid_throughput.py``) can time them apart:

* :func:`deidentify_header`: screen the header for burned-in risk
  (:func:`rapha.privacy.screen_header`), then pseudonymise the patient and the study,
  series and instance UIDs (:class:`rapha.privacy.Pseudonymizer`), and take the
  allowlisted facts (:func:`rapha.privacy.extract_meta`). Nothing else of the header is
  read: there is no output dataset to clean, only these fields, so an attribute nobody
  named (free text, a private block) cannot come out. No OCR and no pixel decoding.
* :func:`prepare_pixels`: the display image (:func:`rapha.dataset.pixels.to_display`)
  resampled to the job's size (:func:`rapha.dataset.pixels.resample`).

Values are read from the raw element bytes where that is enough (UIDs are ASCII,
PS3.5 9.1), so a dataset read lazily by pydicom is not converted wholesale and no
read-time validation warning, which would quote the value, is raised. The PatientID is
converted by pydicom (its Specific Character Set decides the text) with warnings silenced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from rapha.dataset import resample, to_display
from rapha.pacs.source import quiet
from rapha.privacy import Domain, Exclusion, MetaValue, Pseudonymizer, extract_meta, screen_header

__all__ = [
    "HeaderResult",
    "deidentify_header",
    "display_image",
    "header_text",
    "prepare_pixels",
]

_PATIENT_ID: Final = 0x00100020
_STUDY_UID: Final = 0x0020000D
_SERIES_UID: Final = 0x0020000E
_SOP_UID: Final = 0x00080018
_PADDING: Final = " \x00"
_NO_META: Final[Mapping[str, MetaValue]] = MappingProxyType({})


@dataclass(frozen=True)
class HeaderResult:
    """What the header of one instance contributes to a view.

    Attributes:
        exclusion: the header rule that excludes the instance, or ``None``. When set,
            nothing else is computed: the other fields are ``None`` and ``meta`` is empty.
        patient_pseudonym: the stable (node-internal) pseudonym of PatientID (0010,0020);
            ``None`` when the PatientID is absent or empty.
        meta: exactly the allowlisted facts (:data:`rapha.privacy.ALLOWLIST`), read-only.
        study_uid, series_uid, sop_uid: ``2.25`` pseudonymous UIDs in the
            :class:`~rapha.privacy.Domain` STUDY, SERIES and INSTANCE; ``None`` when the
            instance lacks that UID.

    The fields hold no raw identifier, so a ``HeaderResult`` may be logged by its repr.
    """

    exclusion: Exclusion | None
    patient_pseudonym: str | None
    meta: Mapping[str, MetaValue]
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None


def _raw_text(ds: Dataset, tag: int) -> str | None:
    """The padded-stripped text of an ASCII element (UI), without pydicom's conversion."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(elem, RawDataElement):
        text = bytes(value).decode("ascii", "replace") if isinstance(value, bytes) else ""
    else:
        text = "" if value is None else str(value)
    text = text.strip(_PADDING)
    return text or None


def header_text(ds: Dataset, tag: int) -> str | None:
    """The padded-stripped text of element ``tag`` converted by pydicom, or None when absent
    or empty. Conversion may warn about an invalid value, quoting it: it runs quietly."""
    if tag not in ds:
        return None
    with quiet():
        value = ds[tag].value
    text = "" if value is None else str(value).strip(_PADDING)
    return text or None


def _uid(pseudonymizer: Pseudonymizer, domain: Domain, ds: Dataset, tag: int) -> str | None:
    raw = _raw_text(ds, tag)
    return None if raw is None else pseudonymizer.uid(domain, raw)


def deidentify_header(
    ds: Dataset, pseudonymizer: Pseudonymizer, *, require_pixel_data: bool = True
) -> HeaderResult:
    """Screen, pseudonymise and allowlist the header of ``ds`` (no OCR, no pixel decode).

    ``require_pixel_data=False`` accepts a header read without its pixels
    (``stop_before_pixels=True``), as :func:`rapha.privacy.screen_header` does; such an
    instance must still have its pixels decoded (:func:`prepare_pixels`) before use,
    which refuses one without pixel data.
    """
    exclusion = screen_header(ds, require_pixel_data=require_pixel_data)
    if exclusion is not None:
        return HeaderResult(exclusion, None, _NO_META, None, None, None)
    patient = header_text(ds, _PATIENT_ID)
    return HeaderResult(
        exclusion=None,
        patient_pseudonym=None
        if patient is None
        else pseudonymizer.pseudonym(Domain.PATIENT, patient),
        meta=MappingProxyType(extract_meta(ds)),
        study_uid=_uid(pseudonymizer, Domain.STUDY, ds, _STUDY_UID),
        series_uid=_uid(pseudonymizer, Domain.SERIES, ds, _SERIES_UID),
        sop_uid=_uid(pseudonymizer, Domain.INSTANCE, ds, _SOP_UID),
    )


def prepare_pixels(ds: Dataset, size: tuple[int, int]) -> NDArray[np.float32]:
    """The display image of ``ds`` resampled to ``size`` = (height, width): float32 in [0, 1].

    Raises :class:`~rapha.errors.DataError` with a
    :class:`~rapha.dataset.pixels.PixelReason` message, as
    :func:`~rapha.dataset.pixels.to_display` does (no pixels, multi-frame, colour,
    undecodable), and :class:`~rapha.errors.UsageError` for an invalid size. pydicom's
    decoders log their failures with details of the data; those records are dropped.
    """
    return resample(display_image(ds), size)


def display_image(ds: Dataset) -> NDArray[np.float32]:
    """:func:`~rapha.dataset.pixels.to_display` with pydicom's decoder log records dropped
    (they carry details of the data); raises the same :class:`~rapha.errors.DataError`."""
    with quiet():
        return to_display(ds)
