"""The folder source: a read-only PACS mount, indexed by reading DICOM headers only.

:class:`FolderSource` walks the tree, reads each file's header up to the pixel data (only
the attributes scope rules need), and keeps an index keyed by relative path with the
file's size and modification time (ns). A re-scan re-reads only files that are new or
whose size or mtime changed, and drops files that disappeared. The index lives in memory
and, optionally, in a cache file in the node's state directory (never in the mount, which
is read-only; the file holds UIDs, so it is written 0600).

Scope rules are the shared ones of :mod:`rapha.pacs.source`, applied to the headers: the
same archive yields the same instances here as through a DICOMweb PACS. When two files
hold the same SOPInstanceUID, the one with the smallest path is used (as a PACS keeps the
first copy it stored).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapha.errors import DataError, ScopeError
from rapha.pacs.scope import Scope
from rapha.pacs.source import (
    NO_INSTANCE_UIDS,
    UNREADABLE,
    InstanceRef,
    SourceItem,
    StudyFacts,
    code_value,
    dicom_date,
    instance_matches,
    read_dataset,
    ref_of,
    select_studies,
)

__all__ = ["FolderSource", "ScanReport"]

_CACHE_FORMAT = 1
_HEADER_TAGS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPartExamined",
    "StudyDate",
    "AccessionNumber",
]
# Media Storage Directory Storage (PS3.4 B.5): a DICOMDIR indexes files, it is no instance.
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class _Header:
    ref: InstanceRef
    modality: str | None
    body_part: str | None
    study_date: str | None
    accession: str | None


@dataclass(frozen=True)
class _Entry:
    size: int
    mtime_ns: int
    header: _Header | None
    error: str | None  # None with header None: not an instance (DICOMDIR)


@dataclass(frozen=True)
class ScanReport:
    """What one scan did: files seen, headers read (new or changed files), files removed
    from the index, and files whose header could not be read."""

    files: int
    read: int
    removed: int
    unreadable: int


def _read_header(path: Path) -> tuple[_Header | None, str | None]:
    try:
        ds = read_dataset(str(path), header_only=True, tags=_HEADER_TAGS)
    except Exception:  # any parse failure of a foreign file is "unreadable", never a crash
        return None, UNREADABLE
    media_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if media_class == _DICOMDIR_CLASS:
        return None, None
    ref = ref_of(ds)
    if ref is None:
        return None, NO_INSTANCE_UIDS
    accession = ds.get("AccessionNumber")
    return (
        _Header(
            ref=ref,
            modality=code_value(ds.get("Modality")),
            body_part=code_value(ds.get("BodyPartExamined")),
            study_date=None if ds.get("StudyDate") is None else str(ds.get("StudyDate")),
            accession=None if accession is None else str(accession),
        ),
        None,
    )


class FolderSource:
    """A directory of DICOM files (a PACS mount), read-only.

    ``cache`` is an optional index file in the node's state directory; it makes the first
    scan after a restart incremental too. It must not be inside ``root``.
    """

    def __init__(self, root: Path, *, cache: Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"the DICOM folder {self.root} does not exist or is not a directory")
        self._cache = cache
        if cache is not None and cache.resolve().is_relative_to(self.root.resolve()):
            raise DataError("the folder source's index cache must not be inside the mount")
        self._index: dict[str, _Entry] = self._load_cache()
        self._by_study: dict[str, list[tuple[str, _Header]]] | None = None
        self._granted: dict[Scope, frozenset[str]] = {}

    # -- index ------------------------------------------------------------------------

    def _load_cache(self) -> dict[str, _Entry]:
        if self._cache is None or not self._cache.exists():
            return {}
        try:
            data = json.loads(self._cache.read_text(encoding="utf-8"))
            if data.get("format") != _CACHE_FORMAT or data.get("root") != str(self.root):
                return {}
            return {rel: _entry_from_json(raw) for rel, raw in data["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # a damaged cache only costs a full re-read

    def _save_cache(self) -> None:
        if self._cache is None:
            return
        payload = {
            "format": _CACHE_FORMAT,
            "root": str(self.root),
            "entries": {rel: _entry_to_json(e) for rel, e in sorted(self._index.items())},
        }
        self._cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._cache.parent, prefix=".index-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp creates it 0600
                json.dump(payload, out)
            os.replace(tmp, self._cache)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                try:
                    st = path.stat()
                except OSError:
                    continue  # vanished between listing and stat
                if not os.path.isfile(path):
                    continue
                yield path.relative_to(self.root).as_posix(), st

    def scan(self) -> ScanReport:
        """Bring the index up to date: read headers of new and changed files only."""
        seen: set[str] = set()
        read = 0
        for rel, st in self._walk():
            seen.add(rel)
            old = self._index.get(rel)
            if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                continue
            header, error = _read_header(self.root / rel)
            self._index[rel] = _Entry(st.st_size, st.st_mtime_ns, header, error)
            read += 1
        removed = [rel for rel in self._index if rel not in seen]
        for rel in removed:
            del self._index[rel]
        if read or removed:
            self._by_study = None
        if read or removed or (self._cache is not None and not self._cache.exists()):
            self._save_cache()
        unreadable = sum(1 for e in self._index.values() if e.error is not None)
        return ScanReport(files=len(seen), read=read, removed=len(removed), unreadable=unreadable)

    def _groups(self) -> dict[str, list[tuple[str, _Header]]]:
        """Readable instances by study, in path order; one file per SOPInstanceUID (the
        smallest path). Rebuilt only after a scan changed the index."""
        if self._by_study is None:
            chosen: dict[str, tuple[str, _Header]] = {}
            for rel in sorted(self._index):
                header = self._index[rel].header
                if header is not None and header.ref.sop_uid not in chosen:
                    chosen[header.ref.sop_uid] = (rel, header)
            groups: dict[str, list[tuple[str, _Header]]] = {}
            for rel, header in chosen.values():
                groups.setdefault(header.ref.study_uid, []).append((rel, header))
            self._by_study = groups
        return self._by_study

    # -- Source -----------------------------------------------------------------------

    def studies(self, scope: Scope) -> list[str]:
        self.scan()
        facts = [_study_facts(uid, [h for _r, h in group]) for uid, group in self._groups().items()]
        chosen = select_studies(facts, scope)
        self._granted[scope] = frozenset(chosen)
        return chosen

    def instances(self, scope: Scope, study_uid: str) -> Iterator[SourceItem]:
        if scope not in self._granted:
            self.studies(scope)
        if study_uid not in self._granted[scope]:
            raise ScopeError("this study is not among the studies the scope allows")
        members = sorted((h.ref, rel, h) for rel, h in self._groups().get(study_uid, []))
        for ref, rel, header in members:
            if not _header_may_match(header, scope):
                continue
            try:
                ds = read_dataset(str(self.root / rel))
            except Exception:  # any parse failure is counted, never a crash
                yield SourceItem(ref=None, dataset=None, error=UNREADABLE)
                continue
            if ref_of(ds) != ref:  # changed since the scan
                yield SourceItem(ref=None, dataset=None, error=UNREADABLE)
                continue
            if instance_matches(ds, scope):
                yield SourceItem(ref=ref, dataset=ds)

    def unreadable(self) -> list[SourceItem]:
        return [
            SourceItem(ref=None, dataset=None, error=entry.error)
            for _rel, entry in sorted(self._index.items())
            if entry.error is not None
        ]


def _header_may_match(header: _Header, scope: Scope) -> bool:
    # The same instance-level rule as instance_matches, on the indexed header, so files
    # that cannot match are not read in full.
    return (
        header.modality in scope.modalities
        and header.body_part in scope.body_parts
        and (day := dicom_date(header.study_date)) is not None
        and scope.date_from <= day <= scope.date_to
    )


def _study_facts(study_uid: str, headers: list[_Header]) -> StudyFacts:
    # Study-level values as a PACS derives them: ModalitiesInStudy is the set of the
    # series' modalities; StudyDate and AccessionNumber come from the first instance.
    modalities = frozenset(h.modality for h in headers if h.modality)
    first = headers[0]
    return StudyFacts(
        study_uid=study_uid,
        study_date=dicom_date(first.study_date),
        modalities=modalities,
        accession=first.accession,
    )


def _entry_to_json(entry: _Entry) -> dict[str, Any]:
    header = None
    if entry.header is not None:
        h = entry.header
        header = {
            "ref": [h.ref.study_uid, h.ref.series_uid, h.ref.sop_uid],
            "modality": h.modality,
            "body_part": h.body_part,
            "study_date": h.study_date,
            "accession": h.accession,
        }
    return {"size": entry.size, "mtime_ns": entry.mtime_ns, "header": header, "error": entry.error}


def _entry_from_json(raw: dict[str, Any]) -> _Entry:
    header = None
    if raw["header"] is not None:
        h = raw["header"]
        header = _Header(
            ref=InstanceRef(*h["ref"]),
            modality=h["modality"],
            body_part=h["body_part"],
            study_date=h["study_date"],
            accession=h["accession"],
        )
    return _Entry(int(raw["size"]), int(raw["mtime_ns"]), header, raw["error"])
