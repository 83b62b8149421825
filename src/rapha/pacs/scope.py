"""The hospital's scope, and the gate every PACS study query passes before it is sent.

A :class:`Scope` says what the node may ask the PACS for: allowed modalities, allowed body
parts, an inclusive study-date window, a hard cap on studies, and optionally allow-lists
of studies (by StudyInstanceUID or AccessionNumber). :class:`ScopeSettings` is its typed
configuration (the ``[scope]`` table of ``node.toml``).

Every QIDO-RS study query the node sends is built from the scope by :func:`queries_for`
and checked by :func:`check_query` right before it leaves. The check refuses, with a
:class:`~rapha.errors.ScopeError`, a query that

* has no modality, or a modality outside the scope;
* has no study-date range with both bounds, or a range outside the window;
* uses a wildcard anywhere (``*`` and ``?`` are the DICOM wildcards, PS3.4 C.2.2.2.4;
  ``%`` covers percent-encoded forms such as ``%2A`` that some servers decode and others
  match literally), so no query depends on how a server treats wildcards;
* has no ``limit``, or a ``limit`` above the cap;
* filters on any attribute other than the scope's own (modality, date, allow-lists).

Queries use only exact values: one query per allowed modality (``ModalitiesInStudy`` is
matched as a single value), and a date range ``YYYYMMDD-YYYYMMDD`` (PS3.4 C.2.2.2.5). Such
queries mean the same thing on every conformant server and on Orthanc.

BodyPartExamined is a series-level attribute (PS3.3 C.7.3.1, General Series module), not a
study-level matching key, so body parts are checked per series and per instance by the
sources, never in the study query.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Self

from pydantic import Field, field_validator, model_validator

from rapha.config import Settings
from rapha.errors import ScopeError, UsageError

__all__ = [
    "Scope",
    "ScopeSettings",
    "StudyQuery",
    "check_query",
    "describe_query",
    "dicom_date_range",
    "queries_for",
    "usable_uid",
]

# A CS value (PS3.5 6.2): upper-case letters, digits, space and underscore, at most 16.
_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")
# UIDs as real archives hold them: conformant ones (PS3.5 9.1: digits and dots, at most
# 64) and non-conformant ones (hex digests, longer), but only URL-path-safe characters.
_USABLE_UID = re.compile(r"[0-9A-Za-z._-]{1,128}")
_WILDCARD_CHARS = ("*", "?", "%")
_DATE_RANGE = re.compile(r"(\d{8})-(\d{8})")

_MODALITY_KEYS = ("ModalitiesInStudy", "00080061")
_DATE_KEYS = ("StudyDate", "00080020")
_ACCESSION_KEYS = ("AccessionNumber", "00080050")
_STUDY_UID_KEYS = ("StudyInstanceUID", "0020000D")
_CONTROL_KEYS = ("limit", "offset", "includefield")
_ALLOWED_KEYS = frozenset(
    _MODALITY_KEYS + _DATE_KEYS + _ACCESSION_KEYS + _STUDY_UID_KEYS + _CONTROL_KEYS
)


def _check_codes(name: str, values: frozenset[str]) -> None:
    if not values:
        raise UsageError(f"scope {name} must not be empty")
    for value in values:
        if not _CODE.fullmatch(value) or value != value.strip():
            raise UsageError(
                f"scope {name} must be upper-case DICOM code strings (A-Z, 0-9, _, space; "
                "at most 16 characters), without wildcards"
            )


@dataclass(frozen=True)
class Scope:
    """What the node may ask the PACS for. Validated on construction.

    ``max_studies`` is a hard cap: a build never touches more studies, and a scope that
    matches more is refused (narrow the window or raise the cap) rather than cut at a
    point that would depend on the order a server happens to return results in.
    """

    modalities: frozenset[str]
    body_parts: frozenset[str]
    date_from: datetime.date
    date_to: datetime.date
    max_studies: int
    study_uids: frozenset[str] | None = None
    accessions: frozenset[str] | None = None

    def __post_init__(self) -> None:
        _check_codes("modalities", self.modalities)
        _check_codes("body_parts", self.body_parts)
        if self.date_from > self.date_to:
            raise UsageError("scope date_from must not be after date_to")
        if self.max_studies <= 0:
            raise UsageError("scope max_studies must be a positive number")
        if self.study_uids is not None:
            if not self.study_uids:
                raise UsageError("scope study_uids, when given, must not be empty")
            if not all(usable_uid(u) for u in self.study_uids):
                raise UsageError(
                    "scope study_uids must be UIDs (letters, digits, '.', '-', '_'; <= 128)"
                )
        if self.accessions is not None:
            if not self.accessions:
                raise UsageError("scope accessions, when given, must not be empty")
            if any(_has_wildcard(a) or not a.strip() or "\\" in a for a in self.accessions):
                raise UsageError("scope accessions must be exact values without wildcards")


class ScopeSettings(Settings):
    """The ``[scope]`` table of ``node.toml``.

    Modality and body-part codes are normalised to upper case (they are CS values,
    PS3.5 6.2). ``study_uids`` and ``accessions`` are optional allow-lists: when given,
    only those studies are in scope.
    """

    modalities: list[str] = Field(min_length=1)
    body_parts: list[str] = Field(min_length=1)
    date_from: datetime.date
    date_to: datetime.date
    max_studies: int = Field(gt=0)
    study_uids: list[str] | None = None
    accessions: list[str] | None = None

    @field_validator("modalities", "body_parts")
    @classmethod
    def _codes(cls, values: list[str]) -> list[str]:
        out = [v.strip().upper() for v in values]
        for value in out:
            if not _CODE.fullmatch(value):
                raise ValueError(
                    "must be DICOM code strings (letters, digits, _, space; at most 16), "
                    "without wildcards"
                )
        return out

    @field_validator("study_uids")
    @classmethod
    def _uids(cls, values: list[str] | None) -> list[str] | None:
        if values is not None:
            if not values:
                raise ValueError("must not be empty when given (omit it to allow all studies)")
            if not all(usable_uid(v) for v in values):
                raise ValueError("must be UIDs (letters, digits, '.', '-', '_'; at most 128)")
        return values

    @field_validator("accessions")
    @classmethod
    def _accessions(cls, values: list[str] | None) -> list[str] | None:
        if values is not None:
            if not values:
                raise ValueError("must not be empty when given (omit it to allow all studies)")
            if any(_has_wildcard(v) or not v.strip() or "\\" in v for v in values):
                raise ValueError("must be exact accession numbers without wildcards")
        return values

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.date_from > self.date_to:
            raise ValueError("date_from must not be after date_to")
        return self

    def to_scope(self) -> Scope:
        return Scope(
            modalities=frozenset(self.modalities),
            body_parts=frozenset(self.body_parts),
            date_from=self.date_from,
            date_to=self.date_to,
            max_studies=self.max_studies,
            study_uids=None if self.study_uids is None else frozenset(self.study_uids),
            accessions=None if self.accessions is None else frozenset(self.accessions),
        )


def dicom_date_range(date_from: datetime.date, date_to: datetime.date) -> str:
    """A closed DA range, ``YYYYMMDD-YYYYMMDD`` (PS3.4 C.2.2.2.5.1)."""
    return f"{date_from:%Y%m%d}-{date_to:%Y%m%d}"


@dataclass(frozen=True)
class StudyQuery:
    """One QIDO-RS study query (PS3.18 10.6). :meth:`params` gives its query parameters.

    ``extra`` holds exact-match keys from the scope's allow-lists (``StudyInstanceUID`` or
    ``AccessionNumber``). Its values are identifiers: never log them.
    """

    modality: str
    date_from: datetime.date
    date_to: datetime.date
    limit: int
    offset: int = 0
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def params(self) -> dict[str, str]:
        """The query parameters, exactly as they are sent (values are exact, never wildcards)."""
        params = {
            "ModalitiesInStudy": self.modality,
            "StudyDate": dicom_date_range(self.date_from, self.date_to),
            "limit": str(self.limit),
            "offset": str(self.offset),
        }
        params.update(self.extra)
        return params

    def describe(self) -> dict[str, str | list[str]]:
        """See :func:`describe_query`."""
        return describe_query(self)


def queries_for(scope: Scope, *, limit: int | None = None) -> list[StudyQuery]:
    """The study queries that cover ``scope``: one per allowed modality, in sorted order.

    With an allow-list, one query per modality and allowed study (StudyInstanceUID when
    given, else AccessionNumber), each an exact match, so no server has to support list
    matching. ``limit`` is the page size (default: the cap); it may not exceed the cap.
    """
    page = scope.max_studies if limit is None else limit
    if not 0 < page <= scope.max_studies:
        raise ScopeError(f"a query limit of {page} is outside 1..max_studies ({scope.max_studies})")
    extras: list[dict[str, str]]
    if scope.study_uids is not None:
        extras = [{"StudyInstanceUID": uid} for uid in sorted(scope.study_uids)]
    elif scope.accessions is not None:
        extras = [{"AccessionNumber": acc} for acc in sorted(scope.accessions)]
    else:
        extras = [{}]
    return [
        StudyQuery(
            modality=modality,
            date_from=scope.date_from,
            date_to=scope.date_to,
            limit=page,
            extra=MappingProxyType(extra),
        )
        for modality in sorted(scope.modalities)
        for extra in extras
    ]


def usable_uid(uid: str | None) -> bool:
    """Whether a UID can be used: conformant UIDs (PS3.5 9.1) and the non-conformant ones
    real archives hold (hex digests, longer than 64), but only characters that are safe in
    a URL path, since QIDO-RS and WADO-RS put UIDs into paths."""
    return uid is not None and _USABLE_UID.fullmatch(uid) is not None


def describe_query(query: StudyQuery | Mapping[str, str]) -> dict[str, str | list[str]]:
    """A PHI-free description of a study query for the audit log: its scope (modality,
    date range, limit, offset) and which allow-list keys it used, never their values."""
    params = query.params() if isinstance(query, StudyQuery) else dict(query)
    identifying = _ACCESSION_KEYS + _STUDY_UID_KEYS
    return {
        "modality": next((params[k] for k in _MODALITY_KEYS if k in params), ""),
        "study_date": next((params[k] for k in _DATE_KEYS if k in params), ""),
        "limit": params.get("limit", ""),
        "offset": params.get("offset", "0"),
        "allow_list_keys": sorted(k for k in params if k in identifying),
    }


def _has_wildcard(value: str) -> bool:
    return any(ch in value for ch in _WILDCARD_CHARS)


def _one(params: Mapping[str, str], keys: tuple[str, ...], what: str) -> str | None:
    found = [params[k] for k in keys if k in params]
    if len(found) > 1:
        raise ScopeError(f"query refused: {what} is given more than once")
    return found[0] if found else None


def _parse_int(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise ScopeError(f"query refused: {what} must be a non-negative whole number")
    return int(value)


def _parse_date(text: str) -> datetime.date:
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError as exc:
        raise ScopeError("query refused: StudyDate holds an invalid date") from exc


def check_query(query: StudyQuery | Mapping[str, str], scope: Scope) -> None:
    """Refuse, with :class:`ScopeError`, a study query that is not bounded by ``scope``.

    Accepts a :class:`StudyQuery` or raw QIDO-RS query parameters (keyword or tag keys).
    Messages name the rule that was broken, never a value from the query.
    """
    params = query.params() if isinstance(query, StudyQuery) else dict(query)
    unknown = sorted(k for k in params if k not in _ALLOWED_KEYS)
    if unknown:
        raise ScopeError(
            "query refused: only ModalitiesInStudy, StudyDate, AccessionNumber, "
            "StudyInstanceUID, limit, offset and includefield may be used "
            f"({len(unknown)} other key(s) given)"
        )
    for key, value in params.items():
        if not isinstance(value, str):
            raise ScopeError(f"query refused: {key} must be a single text value")
        if _has_wildcard(value) and key != "includefield":
            raise ScopeError(
                f"query refused: {key} uses a wildcard or a percent-encoded character; "
                "queries use exact values only"
            )
    includefield = params.get("includefield")
    if includefield is not None and not re.fullmatch(r"[A-Za-z0-9,]+", includefield):
        raise ScopeError("query refused: includefield must list attribute keywords or tags")

    modality = _one(params, _MODALITY_KEYS, "ModalitiesInStudy")
    if modality is None or not modality.strip():
        raise ScopeError("query refused: it has no modality (ModalitiesInStudy)")
    if modality not in scope.modalities:
        raise ScopeError("query refused: the modality is not one the scope allows")

    study_date = _one(params, _DATE_KEYS, "StudyDate")
    if study_date is None:
        raise ScopeError("query refused: it has no study-date range (StudyDate)")
    match = _DATE_RANGE.fullmatch(study_date)
    if match is None:
        raise ScopeError(
            "query refused: StudyDate must be a closed range YYYYMMDD-YYYYMMDD with both bounds"
        )
    low, high = _parse_date(match.group(1)), _parse_date(match.group(2))
    if low > high or low < scope.date_from or high > scope.date_to:
        raise ScopeError("query refused: the study-date range is outside the scope's window")

    limit = _parse_int(params.get("limit"), "limit")
    if limit is None:
        raise ScopeError("query refused: it has no limit; every query is capped")
    if limit == 0 or limit > scope.max_studies:
        raise ScopeError(
            f"query refused: limit must be between 1 and max_studies ({scope.max_studies})"
        )
    _parse_int(params.get("offset"), "offset")

    study_uid = _one(params, _STUDY_UID_KEYS, "StudyInstanceUID")
    if study_uid is not None and (
        not usable_uid(study_uid)
        or (scope.study_uids is not None and study_uid not in scope.study_uids)
    ):
        raise ScopeError("query refused: the StudyInstanceUID is not on the scope's allow-list")
    accession = _one(params, _ACCESSION_KEYS, "AccessionNumber")
    if accession is not None and (
        "\\" in accession
        or not accession.strip()
        or (scope.accessions is not None and accession not in scope.accessions)
    ):
        raise ScopeError("query refused: the AccessionNumber is not on the scope's allow-list")
