"""The Source protocol, what it yields, and the scope rules both sources share.

A source lists the studies a :class:`~rapha.pacs.scope.Scope` allows and yields their
instances, in a deterministic order: studies sorted by StudyInstanceUID, instances by
(SeriesInstanceUID, SOPInstanceUID). The folder and DICOMweb sources decide what is in
scope with the functions below and nothing else, so the same archive gives the same
instances through either:

* study level (:func:`study_matches`, :func:`select_studies`): an allowed modality among
  the study's modalities (ModalitiesInStudy), a StudyDate inside the window (a study
  without a date is out), the allow-lists, and the hard cap;
* series level (:func:`series_may_match`): an allowed Modality, and a BodyPartExamined that
  is allowed or absent (a series without one is decided per instance);
* instance level (:func:`instance_matches`): the instance's own header must carry an
  allowed Modality and BodyPartExamined, a StudyDate in the window, and pass the
  allow-lists. BodyPartExamined is a General Series attribute (PS3.3 C.7.3.1), not a
  study matching key, and a PACS may not return it at series level, so the instance
  header is the final word.

Everything here handles PHI: UIDs, accession numbers and headers stay in the node
process. :func:`quiet` silences third-party logging and warnings while DICOM is parsed or
a PACS is queried, because pydicom, dicomweb-client and urllib3 put file paths, URLs
with UIDs and element values into their messages.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from rapha.errors import DataError, ScopeError
from rapha.pacs.scope import Scope, usable_uid

__all__ = [
    "NO_INSTANCE_UIDS",
    "UNREADABLE",
    "InstanceRef",
    "Source",
    "SourceItem",
    "StudyFacts",
    "code_value",
    "dicom_date",
    "instance_matches",
    "is_whole",
    "quiet",
    "read_dataset",
    "ref_of",
    "select_studies",
    "series_may_match",
    "settle",
    "study_matches",
]

#: Fixed, PHI-free reasons carried by :attr:`SourceItem.error`.
UNREADABLE = "unreadable DICOM"
NO_INSTANCE_UIDS = "DICOM without instance UIDs"

# Loggers of the libraries a source calls; their records carry paths, URLs and values.
_NOISY_LOGGERS = (
    "pydicom",
    "dicomweb_client",
    "dicomweb_client.web",
    "dicomweb_client.session_utils",
    "urllib3",
    "urllib3.connection",
    "urllib3.connectionpool",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
)
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("rapha_pacs_quiet", default=False)


class _DropWhileQuiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET.get()


_FILTER = _DropWhileQuiet()


@contextmanager
def quiet() -> Iterator[None]:
    """Drop log records of pydicom, dicomweb-client and urllib3 emitted in this thread of
    control for the duration of the block (their records elsewhere pass), and ignore
    warnings (process-wide: :func:`warnings.catch_warnings` is not thread-local). Used
    around every DICOM parse and PACS request: their messages quote paths, URLs with UIDs
    and element values."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    token = _QUIET.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _QUIET.reset(token)


@dataclass(frozen=True, order=True)
class InstanceRef:
    """The three UIDs that place an instance. Raw UIDs are PHI: they never leave the node."""

    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class SourceItem:
    """One instance from a source: a dataset (pixels included) or a fixed error reason.

    ``ref`` and ``dataset`` are ``None`` exactly when ``error`` is set; ``error`` is one
    of the PHI-free constants of this module.
    """

    ref: InstanceRef | None
    dataset: Dataset | None
    error: str | None = None


@dataclass(frozen=True)
class StudyFacts:
    """The study-level facts scope rules look at (from a QIDO-RS answer or file headers)."""

    study_uid: str
    study_date: datetime.date | None
    modalities: frozenset[str]
    accession: str | None


@runtime_checkable
class Source(Protocol):
    """Where the node reads DICOM from: a folder (PACS mount) or a DICOMweb PACS."""

    def studies(self, scope: Scope) -> list[str]:
        """StudyInstanceUIDs in ``scope``, sorted; :class:`ScopeError` above the cap."""
        ...

    def instances(self, scope: Scope, study_uid: str) -> Iterator[SourceItem]:
        """In-scope instances of a study :meth:`studies` returned, sorted by (series, SOP)
        UID. A study it did not return is refused with :class:`ScopeError`."""
        ...

    def unreadable(self) -> list[SourceItem]:
        """Items the source holds but could not read far enough to place in a study
        (counted by the caller, never in scope). Empty for a PACS, which stores only what
        it could parse."""
        ...


def code_value(value: object) -> str | None:
    """A CS value (Modality, BodyPartExamined) normalised for comparison, or ``None``."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def dicom_date(value: object) -> datetime.date | None:
    """A DA value (``YYYYMMDD``, PS3.5 6.2) as a date; ``None`` when absent or invalid."""
    text = str(value).strip() if value is not None else ""
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def _in_window(day: datetime.date | None, scope: Scope) -> bool:
    return day is not None and scope.date_from <= day <= scope.date_to


def _allowed_by_lists(study_uid: str, accession: str | None, scope: Scope) -> bool:
    if scope.study_uids is not None and study_uid not in scope.study_uids:
        return False
    return scope.accessions is None or (accession or "").strip() in scope.accessions


def study_matches(facts: StudyFacts, scope: Scope) -> bool:
    """Study-level rule: an allowed modality, a date in the window, the allow-lists."""
    return (
        bool(facts.modalities & scope.modalities)
        and _in_window(facts.study_date, scope)
        and _allowed_by_lists(facts.study_uid, facts.accession, scope)
    )


def select_studies(facts: Iterable[StudyFacts], scope: Scope) -> list[str]:
    """Sorted UIDs of the matching studies; :class:`ScopeError` if there are more than the
    cap (the scope is too broad: narrow it, or raise ``max_studies``)."""
    chosen = sorted({f.study_uid for f in facts if study_matches(f, scope)})
    if len(chosen) > scope.max_studies:
        raise ScopeError(
            f"the scope matches more than max_studies ({scope.max_studies}) studies; "
            "narrow the date window or modalities, or raise max_studies"
        )
    return chosen


def series_may_match(modality: object, body_part: object, scope: Scope) -> bool:
    """Series-level rule: an allowed Modality, and a BodyPartExamined that is allowed or
    absent at this level (then each instance decides)."""
    part = code_value(body_part)
    return code_value(modality) in scope.modalities and (part is None or part in scope.body_parts)


def ref_of(ds: Dataset) -> InstanceRef | None:
    """The instance's UIDs, or ``None`` when any of the three is missing or unusable."""
    uids = [str(ds.get(k, "") or "").strip() for k in _UID_KEYWORDS]
    if not all(usable_uid(u) for u in uids):
        return None
    return InstanceRef(*uids)


_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def instance_matches(ds: Dataset, scope: Scope) -> bool:
    """Instance-level rule on the instance's own header: allowed Modality and
    BodyPartExamined (absent is out), StudyDate in the window, the allow-lists."""
    study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    return (
        code_value(ds.get("Modality")) in scope.modalities
        and code_value(ds.get("BodyPartExamined")) in scope.body_parts
        and _in_window(dicom_date(ds.get("StudyDate")), scope)
        and _allowed_by_lists(study_uid, _text(ds.get("AccessionNumber")), scope)
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)


_UNDEFINED_LENGTH = 0xFFFFFFFF


def is_whole(ds: Dataset) -> bool:
    """Whether no top-level element of a freshly read dataset is shorter than its declared
    length. pydicom reads a file cut off inside a value (typically inside Pixel Data)
    without complaint; a PACS refuses such a file at storage, so the sources treat it as
    unreadable too. Call it before touching values (it inspects raw elements)."""
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset would convert the values)
        element = ds.get_item(tag)
        if (
            isinstance(element, RawDataElement)
            and element.value is not None
            and element.length != _UNDEFINED_LENGTH
            and len(element.value) < element.length
        ):
            return False
    return True


def _visit(_ds: Dataset, _element: object) -> None:
    pass


def settle(ds: Dataset) -> Dataset:
    """Make a freshly parsed dataset safe to hand on: refuse one that was cut off
    (:class:`DataError`, see :func:`is_whole`), then convert every element (nested ones
    too) while third-party warnings are silenced. pydicom converts values lazily and warns
    about invalid ones on first access, quoting the value; after this, no access does."""
    with quiet():
        if not is_whole(ds):
            raise DataError("the DICOM file is cut off")
        ds.walk(_visit)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            meta.walk(_visit)
    return ds


def read_dataset(
    source: str | BinaryIO, *, header_only: bool = False, tags: list[str] | None = None
) -> Dataset:
    """Parse DICOM (Part 10, PS3.10 7.1) quietly and :func:`settle` it. Raises whatever
    pydicom raises, or :class:`DataError`; callers turn that into :data:`UNREADABLE`.
    ``header_only`` stops before the pixel data; ``tags`` reads only those attributes."""
    with quiet():
        ds = pydicom.dcmread(source, stop_before_pixels=header_only, specific_tags=tags)
    return settle(ds)
