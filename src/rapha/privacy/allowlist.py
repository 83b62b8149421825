"""The attribute allowlist: the only header facts that reach a view.

This is an allowlist, not a blocklist. :func:`extract_meta` builds a record's metadata from
:data:`ALLOWLIST` alone; an attribute that is not named there cannot reach model code, so a
new or private attribute full of PHI is safe by construction. Dates and free text
(StudyDescription, ProtocolName, SeriesDescription, ImageComments …) are never named.

Each :class:`AllowedField` says which attributes it reads and, where DICOM PS3.15 Table
E.1-1 (the Basic Application Level Confidentiality Profile) would remove or blank one of
them, the profile option under which PS3.15 keeps it (``K``). ``tests/privacy`` checks
every entry against the table; :func:`options_used` lists the options a view relies on.

Values are normalised before they leave: code strings (CS) are stripped, upper-cased and
must be valid for the VR (PS3.5 6.2: at most 16 of ``A-Z 0-9 _`` and space) or in the
enumerated values of their attribute; other strings lose non-printable characters and are
capped in length; numbers are range-checked. Anything that fails becomes ``None``; a
value is never passed through unchecked.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset

from rapha.privacy._header import strings, unsigned_short

__all__ = [
    "ALLOWLIST",
    "AllowedField",
    "MetaValue",
    "ProfileOption",
    "age_band",
    "extract_meta",
    "options_used",
]

MetaValue = str | int | float | None


class ProfileOption(enum.StrEnum):
    """PS3.15 E.3 profile options, valued as the column keys of Table E.1-1."""

    RETAIN_DEVICE_IDENTITY = "rtnDevIdOpt"
    RETAIN_PATIENT_CHARACTERISTICS = "rtnPatCharsOpt"

    @property
    def label(self) -> str:
        """The option's name in PS3.15 E.3."""
        return _LABELS[self]

    @property
    def code(self) -> str:
        """Its code in CID 7050 (De-identification Method, DCM scheme), for
        Deidentification Method Code Sequence (0012,0064)."""
        return _CODES[self]


_LABELS: Final = {
    ProfileOption.RETAIN_DEVICE_IDENTITY: "Retain Device Identity Option",
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: "Retain Patient Characteristics Option",
}
_CODES: Final = {
    ProfileOption.RETAIN_DEVICE_IDENTITY: "113109",
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: "113108",
}


@dataclass(frozen=True)
class AllowedField:
    """One fact a view may carry.

    Attributes:
        name: the key in a record's metadata.
        source_tags: the attributes whose information reaches the view, ``"(GGGG,EEEE)"``,
            in the order they are tried.
        option: the PS3.15 option that keeps them, or ``None`` when Table E.1-1 does not
            list them at all.
        why: what the fact is for, and why it is safe to share.
        derived_from: attributes read only to compute the value and never exposed
            themselves (the age band from Patient's Birth Date vs Study Date).
    """

    name: str
    source_tags: tuple[str, ...]
    option: ProfileOption | None
    why: str
    derived_from: tuple[str, ...] = ()


_MODALITY = "(0008,0060)"
_BODY_PART = "(0018,0015)"
_VIEW_POSITION = "(0018,5101)"
_IMAGE_LATERALITY = "(0020,0062)"
_LATERALITY = "(0020,0060)"
_SEX = "(0010,0040)"
_AGE = "(0010,1010)"
_BIRTH_DATE = "(0010,0030)"
_STUDY_DATE = "(0008,0020)"
_MANUFACTURER = "(0008,0070)"
_MODEL = "(0008,1090)"
_PIXEL_SPACING = "(0028,0030)"
_IMAGER_PIXEL_SPACING = "(0018,1164)"
_ROWS = "(0028,0010)"
_COLUMNS = "(0028,0011)"
_PHOTOMETRIC = "(0028,0004)"

_DEV = ProfileOption.RETAIN_DEVICE_IDENTITY
_PAT = ProfileOption.RETAIN_PATIENT_CHARACTERISTICS

ALLOWLIST: tuple[AllowedField, ...] = (
    AllowedField("modality", (_MODALITY,), None, "what kind of image it is"),
    AllowedField("body_part", (_BODY_PART,), None, "which anatomy; scopes and stratifies"),
    AllowedField("view_position", (_VIEW_POSITION,), None, "projection (AP, PA, LL …)"),
    AllowedField(
        "laterality",
        (_IMAGE_LATERALITY, _LATERALITY),
        None,
        "side imaged (R, L, B, U); Image Laterality first, then series Laterality",
    ),
    AllowedField("sex", (_SEX,), _PAT, "M, F or O: a common covariate and fairness stratum"),
    AllowedField(
        "age_band",
        (_AGE,),
        _PAT,
        "5-year band of the age at the study, 90 and over pooled (as HIPAA Safe Harbor "
        "pools ages over 89); Patient's Age when present, else computed from birth date "
        "and study date, neither of which is exposed",
        derived_from=(_BIRTH_DATE, _STUDY_DATE),
    ),
    AllowedField(
        "manufacturer",
        (_MANUFACTURER,),
        _DEV,
        "vendor: domain shift between devices; device identity, kept as the issue asks "
        "under Retain Device Identity (Table E.1-1 does not list the attribute)",
    ),
    AllowedField(
        "model",
        (_MODEL,),
        _DEV,
        "device model: domain shift between devices; no serial number or station name",
    ),
    AllowedField(
        "pixel_spacing",
        (_PIXEL_SPACING, _IMAGER_PIXEL_SPACING),
        None,
        "mm per pixel, mean of row and column spacing, 3 decimals; Pixel Spacing first, "
        "then Imager Pixel Spacing (projection radiography, PS3.3 C.8.11.4)",
    ),
    AllowedField("rows", (_ROWS,), None, "image height in pixels before resampling"),
    AllowedField("columns", (_COLUMNS,), None, "image width in pixels before resampling"),
    AllowedField(
        "photometric_interpretation",
        (_PHOTOMETRIC,),
        None,
        "how stored values map to grey or colour (PS3.3 C.7.6.3.1.2)",
    ),
)

_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # PS3.5 6.2, VR CS
_AGE_STRING = re.compile(r"(\d{3})([DWMY])")  # PS3.5 6.2, VR AS
_DATE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")  # DA, and the ACR-NEMA form with dots
_TEXT_CAP = 64  # the LO limit (PS3.5 6.2)
_MAX_AGE_YEARS = 130
_BAND_YEARS = 5
_POOLED_FROM = 90
_MAX_SPACING_MM = 100.0
_SPACING_DECIMALS = 3

_SEXES: Final = frozenset({"M", "F", "O"})  # PS3.3 C.7.1.1
_IMAGE_LATERALITIES: Final = frozenset({"R", "L", "U", "B"})  # PS3.3 C.7.6.1
_LATERALITIES: Final = frozenset({"R", "L"})  # PS3.3 C.7.3.1
_PHOTOMETRICS: Final = frozenset(  # PS3.3 C.7.6.3.1.2, retired terms included
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "XYZ",
    }
)


def _tag(text: str) -> int:
    return int(text[1:5] + text[6:10], 16)


def _single(ds: Dataset, tag: str) -> str | None:
    values = strings(ds, _tag(tag))
    if not values or len(values) != 1:
        return None  # absent, empty, or multi-valued where the attribute has VM 1
    return values[0]


def _code(ds: Dataset, tag: str, allowed: frozenset[str] | None = None) -> str | None:
    raw = _single(ds, tag)
    if raw is None:
        return None
    value = "".join(c for c in raw if c.isprintable()).strip().upper()
    if not _CODE_STRING.fullmatch(value):
        return None
    if allowed is not None and value not in allowed:
        return None
    return value


def _text(ds: Dataset, tag: str) -> str | None:
    raw = _single(ds, tag)
    if raw is None:
        return None
    value = " ".join("".join(c for c in raw if c.isprintable()).split())[:_TEXT_CAP].strip()
    return value or None


def _laterality(ds: Dataset) -> str | None:
    return _code(ds, _IMAGE_LATERALITY, _IMAGE_LATERALITIES) or _code(
        ds, _LATERALITY, _LATERALITIES
    )


def _dimension(ds: Dataset, tag: str) -> int | None:
    value = unsigned_short(ds, _tag(tag))
    return value if value is not None and value > 0 else None


def _spacing_of(ds: Dataset, tag: str) -> float | None:
    values = strings(ds, _tag(tag))
    if not values or len(values) != 2:
        return None
    try:
        row, col = (float(v) for v in values)
    except ValueError:
        return None
    if not all(math.isfinite(v) and 0.0 < v <= _MAX_SPACING_MM for v in (row, col)):
        return None
    return round((row + col) / 2, _SPACING_DECIMALS)


def _pixel_spacing(ds: Dataset) -> float | None:
    spacing = _spacing_of(ds, _PIXEL_SPACING)
    return spacing if spacing is not None else _spacing_of(ds, _IMAGER_PIXEL_SPACING)


def _date(ds: Dataset, tag: str) -> dt.date | None:
    raw = _single(ds, tag)
    match = _DATE.fullmatch(raw) if raw is not None else None
    if match is None:
        return None
    try:
        return dt.date(*(int(g) for g in match.groups()))
    except ValueError:
        return None


def _years_from_age(ds: Dataset) -> float | None:
    raw = _single(ds, _AGE)
    match = _AGE_STRING.fullmatch(raw.upper()) if raw is not None else None
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2)
    per_year = {"D": 365.2425, "W": 365.2425 / 7, "M": 12.0, "Y": 1.0}[unit]
    return number / per_year


def _years_from_dates(ds: Dataset) -> float | None:
    born, seen = _date(ds, _BIRTH_DATE), _date(ds, _STUDY_DATE)
    if born is None or seen is None or seen < born:
        return None
    return float(seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day)))


def age_band(ds: Dataset) -> str | None:
    """The 5-year band of the patient's age at the study: ``"00-04"`` … ``"85-89"``, ``"90+"``.

    From Patient's Age (0010,1010, AS ``nnnD|W|M|Y``) when it is valid, else from Patient's
    Birth Date (0010,0030) and Study Date (0008,0020). ``None`` when neither gives an age,
    or the age is implausible (over 130 years, or a study before birth). Neither the age
    nor the dates themselves are returned.
    """
    years = _years_from_age(ds)
    if years is None:
        years = _years_from_dates(ds)
    if years is None or not 0 <= years <= _MAX_AGE_YEARS:
        return None
    if years >= _POOLED_FROM:
        return f"{_POOLED_FROM}+"
    low = int(years) // _BAND_YEARS * _BAND_YEARS
    return f"{low:02d}-{low + _BAND_YEARS - 1:02d}"


_EXTRACTORS: Final[dict[str, Callable[[Dataset], MetaValue]]] = {
    "modality": lambda ds: _code(ds, _MODALITY),
    "body_part": lambda ds: _code(ds, _BODY_PART),
    "view_position": lambda ds: _code(ds, _VIEW_POSITION),
    "laterality": _laterality,
    "sex": lambda ds: _code(ds, _SEX, _SEXES),
    "age_band": age_band,
    "manufacturer": lambda ds: _text(ds, _MANUFACTURER),
    "model": lambda ds: _text(ds, _MODEL),
    "pixel_spacing": _pixel_spacing,
    "rows": lambda ds: _dimension(ds, _ROWS),
    "columns": lambda ds: _dimension(ds, _COLUMNS),
    "photometric_interpretation": lambda ds: _code(ds, _PHOTOMETRIC, _PHOTOMETRICS),
}
if tuple(_EXTRACTORS) != tuple(f.name for f in ALLOWLIST):  # pragma: no cover - import guard
    raise RuntimeError("allowlist and extractors disagree")


def extract_meta(ds: Dataset) -> dict[str, MetaValue]:
    """The allowlisted facts of ``ds``: exactly the :data:`ALLOWLIST` names, in its order.

    A fact that is absent, empty or invalid is ``None``. Record ids are not added here;
    the view adds them.
    """
    return {name: extract(ds) for name, extract in _EXTRACTORS.items()}


def options_used() -> list[str]:
    """The PS3.15 option keys (``rtnDevIdOpt`` …) the allowlist relies on, sorted."""
    return sorted({f.option.value for f in ALLOWLIST if f.option is not None})
