"""The hospital's label table, joined on the node side before pseudonymisation.

The table is a CSV file with a header row. One column is the key, and the header decides
which: ``AccessionNumber`` or ``StudyInstanceUID`` (matched ignoring case, spaces and
underscores; with both present the Study Instance UID, which is globally unique, is the
key). Every other column is a finding, unless ``findings`` names the ones to keep. Values
follow the CheXpert convention::

    1 positive    0 negative    -1 uncertain    empty  not mentioned (None)

(``1.0``, ``0.0``, ``-1.0`` are accepted as written by pandas.) A malformed table is
refused with a :class:`~rapha.errors.DataError` naming the line number and column, never
the key value: accession numbers and UIDs are PHI.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from rapha.errors import DataError

__all__ = [
    "ACCESSION_NUMBER",
    "STUDY_INSTANCE_UID",
    "LabelTable",
    "LabelValue",
]

LabelValue = int | None
"""1 (positive), 0 (negative), -1 (uncertain) or None (not mentioned)."""

ACCESSION_NUMBER: Final = "AccessionNumber"
STUDY_INSTANCE_UID: Final = "StudyInstanceUID"
_VALUES: Final[Mapping[str, LabelValue]] = {
    "1": 1,
    "1.0": 1,
    "0": 0,
    "0.0": 0,
    "-1": -1,
    "-1.0": -1,
    "": None,
}
_DICOM_PADDING: Final = " \x00"


def _normal(header: str) -> str:
    return header.strip().replace("_", "").replace(" ", "").lower()


class LabelTable:
    """Labels per study, looked up by raw AccessionNumber or StudyInstanceUID.

    Holds PHI (the keys): it lives in the node process only, and its ``repr`` shows counts,
    never keys.
    """

    def __init__(
        self,
        key_column: str,
        findings: Iterable[str],
        rows: Mapping[str, Mapping[str, LabelValue]],
    ) -> None:
        if key_column not in (ACCESSION_NUMBER, STUDY_INSTANCE_UID):
            raise DataError(f"label key must be {ACCESSION_NUMBER} or {STUDY_INSTANCE_UID}")
        self.key_column: Final = key_column
        self.findings: Final = tuple(findings)
        if not self.findings or len(set(self.findings)) != len(self.findings):
            raise DataError("a label table needs at least one finding, each named once")
        self._rows = {
            key.strip(_DICOM_PADDING): {f: row.get(f) for f in self.findings}
            for key, row in rows.items()
        }

    @classmethod
    def from_csv(cls, path: Path, findings: Iterable[str] | None = None) -> LabelTable:
        """Read a label CSV (UTF-8, optional BOM); see the module docstring for the format.

        Raises :class:`DataError` for an unreadable file, a header without a key column or
        without a requested finding, a row of the wrong length, an empty or duplicate key
        and any value outside 1/0/-1/empty; row errors name the line and column only.
        """
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                return cls._parse(csv.reader(fh), findings)
        except UnicodeDecodeError as exc:
            raise DataError(f"labels CSV {path.name} is not UTF-8 text") from exc
        except OSError as exc:
            raise DataError(f"cannot read labels CSV {path.name}: {exc.strerror}") from exc

    @classmethod
    def _parse(cls, reader: Iterable[list[str]], wanted: Iterable[str] | None) -> LabelTable:
        lines = iter(reader)
        try:
            header = [h.strip() for h in next(lines)]
        except StopIteration:
            raise DataError("labels CSV is empty; it needs a header row") from None
        except csv.Error as exc:
            raise DataError("labels CSV line 1: malformed CSV") from exc
        normal = [_normal(h) for h in header]
        key_index = _key_index(normal)
        key_column = (
            STUDY_INSTANCE_UID if normal[key_index] == "studyinstanceuid" else (ACCESSION_NUMBER)
        )
        skipped = {i for i, n in enumerate(normal) if n in ("accessionnumber", "studyinstanceuid")}
        available = {h: i for i, h in enumerate(header) if i not in skipped}
        if any(not h for h in available):
            raise DataError("labels CSV line 1: every column needs a name")
        if len(available) != len(header) - len(skipped):
            raise DataError("labels CSV line 1: a column name appears twice")
        names = list(available) if wanted is None else list(wanted)
        for name in names:
            if name not in available:
                raise DataError(f"labels CSV has no column {name!r}")
        rows: dict[str, dict[str, LabelValue]] = {}
        first_seen: dict[str, int] = {}
        line = 1
        try:
            for fields in lines:
                line = getattr(reader, "line_num", line + 1)
                if not any(f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        f"labels CSV line {line}: {len(fields)} fields, header has {len(header)}"
                    )
                key = fields[key_index].strip(" \x00\t")
                if not key:
                    raise DataError(f"labels CSV line {line}: empty {key_column}")
                if key in first_seen:
                    raise DataError(
                        f"labels CSV line {line}: duplicate {key_column} "
                        f"(first on line {first_seen[key]})"
                    )
                first_seen[key] = line
                rows[key] = {name: _value(fields[available[name]], line, name) for name in names}
        except csv.Error as exc:
            raise DataError(f"labels CSV line {line + 1}: malformed CSV") from exc
        return cls(key_column, names, rows)

    def lookup(
        self, accession: str | None = None, study_uid: str | None = None
    ) -> dict[str, LabelValue]:
        """Labels of one study, every finding present; all None when the study has no row.

        The table's key column decides which argument is used; the other is ignored.
        """
        key = accession if self.key_column == ACCESSION_NUMBER else study_uid
        row = self._rows.get((key or "").strip(_DICOM_PADDING))
        if row is None:
            return dict.fromkeys(self.findings)
        return dict(row)

    def contains(self, accession: str | None = None, study_uid: str | None = None) -> bool:
        """Whether the study has a row (labels may still all be empty)."""
        key = accession if self.key_column == ACCESSION_NUMBER else study_uid
        return (key or "").strip(_DICOM_PADDING) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (
            f"LabelTable(key_column={self.key_column!r}, findings={self.findings!r}, "
            f"rows={len(self._rows)})"
        )


def _key_index(normal: list[str]) -> int:
    for key in ("studyinstanceuid", "accessionnumber"):
        if key in normal:
            if normal.count(key) > 1:
                raise DataError("labels CSV line 1: the key column appears twice")
            return normal.index(key)
    raise DataError(
        f"labels CSV line 1: no {ACCESSION_NUMBER} or {STUDY_INSTANCE_UID} column in the header"
    )


def _value(raw: str, line: int, column: str) -> LabelValue:
    try:
        return _VALUES[raw.strip()]
    except KeyError:
        raise DataError(
            f"labels CSV line {line}, column {column!r}: value must be 1, 0, -1 or empty"
        ) from None
