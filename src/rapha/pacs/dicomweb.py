"""The DICOMweb source: any DICOMweb PACS, searched with QIDO-RS and read with WADO-RS.

:class:`DicomWebSource` talks to the PACS through :class:`dicomweb_client.DICOMwebClient`
over a :class:`requests.Session` configured by :mod:`rapha.pacs.auth` for the PACS's
authentication: HTTP Basic, a bearer token, or a client TLS certificate, with a custom CA
bundle for the server's certificate.

Searching (PS3.18 10.6):

* study queries come from :func:`~rapha.pacs.scope.queries_for` (one per allowed
  modality, exact values, a closed date range) and each page passes
  :func:`~rapha.pacs.scope.check_query` right before it is sent;
* pages use ``limit``/``offset`` and do not trust ``offset`` (:mod:`rapha.pacs._paging`):
  some servers ignore it, and Orthanc 1.10 applies ``limit`` before ``offset`` when
  matching ModalitiesInStudy. Results are de-duplicated by UID; when a page adds nothing
  the source re-asks from offset 0 with a growing ``limit`` (never above the cap), so it
  neither loops forever, nor duplicates, nor misses. When even that cannot prove the
  answer complete (a full answer at the cap), the date range is split in two and each
  half searched, so more matching studies than the cap are always noticed;
* a study in an answer that does not match its query (a server ignoring query keys) stops
  the build with :class:`~rapha.errors.RemoteError`; more matching studies than the cap
  stop it with :class:`~rapha.errors.ScopeError`;
* body parts are checked per series (BodyPartExamined, when the series answer has it) and
  on every retrieved instance's own header (:mod:`rapha.pacs.source`).

Instances are retrieved one by one with WADO-RS in the transfer syntax they are stored in
(``application/dicom; transfer-syntax=*``), in (series, SOP) UID order.

QIDO-RS answers are PHI: they are parsed into the few facts scope rules need and never
logged; third-party logging is silenced while a request runs. Errors become
:class:`~rapha.errors.RemoteError` with fixed messages (status code and a hint, never a
URL with UIDs, never a response body).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from rapha.errors import ConfigError, RemoteError, ScopeError
from rapha.pacs._paging import collect
from rapha.pacs.auth import PacsAuth, configure_session
from rapha.pacs.scope import (
    Scope,
    StudyQuery,
    check_query,
    describe_query,
    queries_for,
    usable_uid,
)
from rapha.pacs.source import (
    UNREADABLE,
    InstanceRef,
    SourceItem,
    StudyFacts,
    code_value,
    dicom_date,
    instance_matches,
    quiet,
    ref_of,
    select_studies,
    series_may_match,
    settle,
    study_matches,
)

__all__ = ["DicomWebSource"]

T = TypeVar("T")
_ONE_DAY = datetime.timedelta(days=1)

# DICOM JSON (PS3.18 F.2) tags of the attributes read from QIDO-RS answers.
_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_STUDY_DATE = "00080020"
_MODALITIES_IN_STUDY = "00080061"
_ACCESSION = "00080050"
_MODALITY = "00080060"
_BODY_PART = "00180015"

_STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "AccessionNumber")
_SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "BodyPartExamined")
_INSTANCE_FIELDS = ("SOPInstanceUID",)
# Stored transfer syntax, whatever it is (PS3.18 8.7.3.5.2).
_AS_STORED = (("application/dicom", "*"),)
# Upper bound on series per study and instances per series one listing may return.
_MAX_LISTING = 10_000


def _values(row: Mapping[str, Any], tag: str) -> list[Any]:
    element = row.get(tag)
    if not isinstance(element, Mapping):
        return []
    values = element.get("Value")
    return list(values) if isinstance(values, list) else []


def _first(row: Mapping[str, Any], tag: str) -> str | None:
    values = _values(row, tag)
    if not values or values[0] is None:
        return None
    text = str(values[0]).strip()
    return text or None


def _usable(tag: str) -> Callable[[Mapping[str, Any]], str | None]:
    """The key function for a listing: the row's UID, or ``None`` (row skipped)."""

    def key(row: Mapping[str, Any]) -> str | None:
        uid = _first(row, tag)
        return uid if usable_uid(uid) else None

    return key


class DicomWebSource:
    """A DICOMweb PACS (QIDO-RS, WADO-RS) as a :class:`~rapha.pacs.source.Source`.

    ``url`` is the DICOMweb root (for Orthanc, ``…/dicom-web``). ``session`` may be passed
    in (tests, proxies); ``auth`` and ``ca_bundle`` are applied to it. ``page_size`` is the
    QIDO-RS ``limit`` per page (never above the scope's cap). ``attempts`` is how often a
    failed request is tried (with back-off from 0.5 s) before it becomes a RemoteError.
    ``on_query`` is called with :func:`~rapha.pacs.scope.describe_query` of every study
    query right before it is sent (for the audit log: the query's scope, never results).
    """

    def __init__(
        self,
        url: str,
        *,
        auth: PacsAuth | None = None,
        ca_bundle: Path | None = None,
        timeout: float = 30.0,
        session: requests.Session | None = None,
        page_size: int = 100,
        attempts: int = 3,
        on_query: Callable[[dict[str, str | list[str]]], None] | None = None,
    ) -> None:
        if page_size <= 0:
            raise ConfigError("page_size must be a positive number")
        self._session = session if session is not None else requests.Session()
        configure_session(self._session, url, auth, ca_bundle)
        parts = urlsplit(url)
        self._where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._timeout = timeout
        self._page = page_size
        self._on_query = on_query
        with quiet():
            # UIDs are checked here (usable_uid) rather than by dicomweb-client, which
            # rejects the non-conformant UIDs real archives hold.
            self._client = DICOMwebClient(
                url.rstrip("/"), session=self._session, timeout=timeout, permissive_uid=True
            )
            # dicomweb-client retries failed requests (and 408/429/503/504 answers) with
            # exponential back-off; its default (5 attempts from 2 s) waits 30 s on a
            # refused connection.
            self._client.set_http_retry_params(
                retry=attempts > 1,
                max_attempts=max(attempts, 1),
                wait_exponential_multiplier=250,
            )
        self._granted: dict[Scope, frozenset[str]] = {}

    def close(self) -> None:
        self._session.close()

    # -- requests ---------------------------------------------------------------------

    def _call(self, what: str, request: Callable[[], T]) -> T:
        """Run one PACS request quietly; turn transport and HTTP errors into RemoteError."""
        try:
            with quiet():
                return request()
        except requests.RequestException as exc:
            raise self._remote(exc, what) from None
        except (ValueError, TypeError, KeyError):  # malformed JSON or multipart answer
            raise RemoteError(f"the PACS sent a malformed answer to a {what}") from None

    def _remote(self, exc: requests.RequestException, what: str) -> RemoteError:
        """A fixed, PHI-free message: no URL path or query (they hold UIDs), no body."""
        if isinstance(exc, requests.HTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            hint = {
                401: " (authentication failed: check the PACS credentials)",
                403: " (access denied: check the PACS account's permissions)",
                404: " (not found: check the DICOMweb URL)",
            }.get(status, "")
            return RemoteError(f"the PACS answered HTTP {status} to a {what}{hint}")
        if isinstance(exc, requests.exceptions.SSLError):
            return RemoteError(
                f"TLS with the PACS at {self._where} failed during a {what}: check the CA "
                "bundle and the client certificate"
            )
        if isinstance(exc, requests.Timeout):
            return RemoteError(
                f"the PACS at {self._where} did not answer a {what} within {self._timeout} s"
            )
        if isinstance(exc, requests.ConnectionError):
            return RemoteError(
                f"cannot reach the PACS at {self._where} for a {what}; check the URL and network"
            )
        return RemoteError(f"the {what} to the PACS at {self._where} failed")

    def search_studies(
        self, query: StudyQuery | Mapping[str, str], scope: Scope
    ) -> list[StudyFacts]:
        """Send one QIDO-RS study query, after :func:`check_query`; return the facts of each
        study in the answer. A refused query raises :class:`ScopeError` and sends nothing."""
        params = query.params() if isinstance(query, StudyQuery) else dict(query)
        check_query(params, scope)
        if self._on_query is not None:
            self._on_query(describe_query(params))
        rows = self._call(
            "study search",
            lambda: self._client.search_for_studies(
                fields=list(_STUDY_FIELDS), additional_params=params
            ),
        )
        fallback = (
            frozenset({params["ModalitiesInStudy"]})
            if "ModalitiesInStudy" in params
            else frozenset()
        )
        facts = []
        for row in rows:
            uid = _first(row, _STUDY_UID)
            if uid is None or not usable_uid(uid):
                continue
            returned = frozenset(
                m for v in _values(row, _MODALITIES_IN_STUDY) if (m := code_value(v))
            )
            facts.append(
                StudyFacts(
                    study_uid=uid,
                    study_date=dicom_date(_first(row, _STUDY_DATE)),
                    modalities=returned or fallback,
                    accession=_first(row, _ACCESSION),
                )
            )
        return facts

    # -- Source -----------------------------------------------------------------------

    def studies(self, scope: Scope) -> list[str]:
        matching: dict[str, StudyFacts] = {}
        for base in queries_for(scope, limit=min(self._page, scope.max_studies)):
            self._search_window(base, base.date_from, base.date_to, scope, matching)
        chosen = select_studies(matching.values(), scope)
        self._granted[scope] = frozenset(chosen)
        return chosen

    def _search_window(
        self,
        base: StudyQuery,
        low: datetime.date,
        high: datetime.date,
        scope: Scope,
        matching: dict[str, StudyFacts],
    ) -> None:
        """Page one study query over [low, high] into ``matching``. When paging cannot prove
        the answer complete (a server misusing offset, at the cap), split the date range
        in two and search each half: more than the cap across the halves is refused."""
        window = replace(base, date_from=low, date_to=high)

        def fetch(limit: int, offset: int) -> list[StudyFacts]:
            query = replace(window, limit=limit, offset=offset)
            answer = self.search_studies(query, scope)
            if not all(_answers(query, f) for f in answer):
                raise RemoteError(
                    "the PACS answered a study query with studies that do not match it "
                    "(it may ignore query keys); refusing to continue"
                )
            return answer

        def count(seen: dict[str, StudyFacts]) -> None:
            matching.update((uid, f) for uid, f in seen.items() if study_matches(f, scope))
            if len(matching) > scope.max_studies:
                select_studies(matching.values(), scope)  # raises the cap's ScopeError

        _, complete = collect(
            fetch,
            lambda f: f.study_uid,
            page=self._page,
            max_limit=scope.max_studies,
            after_page=count,
        )
        if complete:
            return
        if low == high:
            raise ScopeError(
                f"at least max_studies ({scope.max_studies}) studies match on a single day "
                "and the PACS does not page reliably; raise max_studies"
            )
        middle = low + (high - low) // 2
        self._search_window(base, low, middle, scope, matching)
        self._search_window(base, middle + _ONE_DAY, high, scope, matching)

    def _listing(
        self, fetch: Callable[[int, int], list[dict[str, Any]]], tag: str, what: str
    ) -> dict[str, dict[str, Any]]:
        found, complete = collect(fetch, _usable(tag), page=self._page, max_limit=_MAX_LISTING)
        if not complete:
            raise RemoteError(f"the PACS lists more than {_MAX_LISTING} {what} in one place")
        return found

    def _series(self, study_uid: str) -> list[tuple[str, str | None, str | None]]:
        def fetch(limit: int, offset: int) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = self._call(
                "series search",
                lambda: self._client.search_for_series(
                    study_uid, fields=list(_SERIES_FIELDS), limit=limit, offset=offset
                ),
            )
            return rows

        found = self._listing(fetch, _SERIES_UID, "series")
        return sorted(
            (uid, _first(row, _MODALITY), _first(row, _BODY_PART)) for uid, row in found.items()
        )

    def _sop_uids(self, study_uid: str, series_uid: str) -> list[str]:
        def fetch(limit: int, offset: int) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = self._call(
                "instance search",
                lambda: self._client.search_for_instances(
                    study_uid, series_uid, fields=list(_INSTANCE_FIELDS), limit=limit, offset=offset
                ),
            )
            return rows

        found = self._listing(fetch, _SOP_UID, "instances")
        return sorted(found)

    def _retrieve(self, ref: InstanceRef) -> Dataset | None:
        def get() -> Dataset:
            ds: Dataset = self._client.retrieve_instance(
                ref.study_uid, ref.series_uid, ref.sop_uid, media_types=_AS_STORED
            )
            return ds

        try:
            with quiet():
                return settle(get())
        except requests.RequestException as exc:
            raise self._remote(exc, "instance retrieval") from None
        except Exception:  # an answer pydicom cannot parse is counted, never a crash
            return None

    def instances(self, scope: Scope, study_uid: str) -> Iterator[SourceItem]:
        if scope not in self._granted:
            self.studies(scope)
        if study_uid not in self._granted[scope]:
            raise ScopeError("this study is not among the studies the scope allows")
        for series_uid, modality, body_part in self._series(study_uid):
            if not series_may_match(modality, body_part, scope):
                continue
            for sop_uid in self._sop_uids(study_uid, series_uid):
                ref = InstanceRef(study_uid, series_uid, sop_uid)
                ds = self._retrieve(ref)
                if ds is None or ref_of(ds) != ref:
                    yield SourceItem(ref=None, dataset=None, error=UNREADABLE)
                elif instance_matches(ds, scope):
                    yield SourceItem(ref=ref, dataset=ds)

    def unreadable(self) -> list[SourceItem]:
        return []


def _answers(query: StudyQuery, facts: StudyFacts) -> bool:
    """Whether a study in an answer matches the query that asked for it. A missing date
    is not a mismatch (scope rules drop such a study anyway)."""
    if query.modality not in facts.modalities:
        return False
    if facts.study_date is not None and not (query.date_from <= facts.study_date <= query.date_to):
        return False
    uid = query.extra.get("StudyInstanceUID")
    if uid is not None and facts.study_uid != uid:
        return False
    accession = query.extra.get("AccessionNumber")
    return accession is None or (facts.accession or "") == accession
