"""Aggregate dataset profile: what the hub may see about a hospital's data.

Counts of records by modality, body part, view position, manufacturer, sex and age band,
and positives per finding, with small cells suppressed:

* **Primary suppression**: a cell whose count is below ``k``, or whose records come from
  fewer than ``k`` distinct patients (when records carry ``"patient"``), is published as
  ``None`` and listed under ``"suppressed"``.
* **Complementary suppression**: the grand total is published, so within a dimension a
  lone suppressed cell equals total minus the published cells. More cells are suppressed,
  the smallest first, until no suppressed cell can be pinned from the published numbers:
  at least two are suppressed, their sum is not just their number (all ones), and not
  exactly their number times ``k - 1`` when all were primary (each would be ``k - 1``).
  If even suppressing every cell leaves them pinned, the dimension is withheld entirely.
* **Finding positives** are suppressed when the positives, or the records that are not
  positive (total minus positives, which the published total reveals), number fewer than
  ``k`` (zero positives included; zero non-positives is allowed).

Output: ``{"unit", "k", "rounding", "total", "dimensions": {name: {"cells": {value:
count | None}, "suppressed": [value], "status": "published" | "withheld"}}, "labels":
{"positives": {finding: count | None}, "suppressed": [finding]}}``.
* **Rounding**: every published count is rounded to the nearest multiple of ``round_to``,
  and never below ``k`` (so a published number under ``k`` cannot appear).

Missing values form their own cell, ``"(missing)"``, so the cells of a dimension always
add up to the total.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Final

from rapha.errors import UsageError

__all__ = ["DIMENSIONS", "MISSING", "profile"]

DIMENSIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "modality": ("modality",),
    "body_part": ("body_part", "body_part_examined"),
    "view": ("view_position", "view"),
    "manufacturer": ("manufacturer",),
    "sex": ("sex",),
    "age_band": ("age_band",),
}
"""Published dimension name -> the allowlisted metadata field(s) it counts, first found."""

MISSING: Final = "(missing)"
_WITHHELD: Final[Mapping[str, Any]] = {"cells": {}, "suppressed": [], "status": "withheld"}


class _Tally:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.patients: defaultdict[str, set[str]] = defaultdict(set)

    def add(self, cell: str, patient: str | None) -> None:
        self.count[cell] += 1
        if patient is not None:
            self.patients[cell].add(patient)

    def small(self, cell: str, k: int, *, with_patients: bool) -> bool:
        return self.count[cell] < k or (with_patients and len(self.patients[cell]) < k)


def profile(
    records: Iterable[Mapping[str, Any]], *, k: int = 10, round_to: int = 5
) -> dict[str, Any]:
    """Aggregate ``records`` into a JSON-able profile with small cells suppressed.

    Each record is a mapping holding the allowlisted metadata fields (at top level, or
    under ``"meta"``), optionally ``"labels"`` (finding -> 1/0/-1/None) and optionally
    ``"patient"``, a stable pseudonym used only to count distinct patients per cell and
    never output. See the module docstring for the suppression and rounding rules.
    """
    if type(k) is not int or k < 1 or type(round_to) is not int or round_to < 1:
        raise UsageError("k and round_to must be positive integers")
    tallies = {name: _Tally() for name in DIMENSIONS}
    positives = _Tally()
    findings: set[str] = set()
    total = 0
    with_patients = False
    for record in records:
        total += 1
        meta = record.get("meta", record)
        patient = record.get("patient")
        with_patients = with_patients or patient is not None
        for name, fields in DIMENSIONS.items():
            value = next((meta[f] for f in fields if meta.get(f) is not None), None)
            tallies[name].add(MISSING if value is None or value == "" else str(value), patient)
        for finding, value in (record.get("labels") or {}).items():
            findings.add(str(finding))
            if value == 1 and not isinstance(value, bool):
                positives.add(str(finding), patient)
    if total < k:
        return _withheld(k, round_to)
    dimensions = {
        name: _dimension(tally, k, round_to, with_patients=with_patients)
        for name, tally in tallies.items()
    }
    labels: dict[str, int | None] = {}
    for finding in sorted(findings):
        count = positives.count[finding]
        rest = total - count
        hide = positives.small(finding, k, with_patients=with_patients) or 0 < rest < k
        labels[finding] = None if hide else _round(count, k, round_to)
    return {
        **_header(k, round_to),
        "total": _round(total, k, round_to),
        "dimensions": dimensions,
        "labels": {
            "positives": labels,
            "suppressed": sorted(f for f, v in labels.items() if v is None),
        },
    }


def _dimension(tally: _Tally, k: int, round_to: int, *, with_patients: bool) -> dict[str, Any]:
    cells = sorted(tally.count)
    primary = {c for c in cells if tally.small(c, k, with_patients=with_patients)}
    suppressed = set(primary)
    # Complementary cells, smallest first (ties by name), until nothing is pinned.
    others = sorted((c for c in cells if c not in suppressed), key=lambda c: (tally.count[c], c))
    while suppressed and _pinned(tally, suppressed, primary, k):
        if not others:
            return dict(_WITHHELD)
        suppressed.add(others.pop(0))
    published: dict[str, int | None] = {
        c: None if c in suppressed else _round(tally.count[c], k, round_to) for c in cells
    }
    return {"cells": published, "suppressed": sorted(suppressed), "status": "published"}


def _pinned(tally: _Tally, suppressed: set[str], primary: set[str], k: int) -> bool:
    """Whether total minus the published cells fixes some suppressed cell's value."""
    hidden = sum(tally.count[c] for c in suppressed)
    m = len(suppressed)
    return m == 1 or hidden == m or (suppressed <= primary and hidden == m * (k - 1))


def _round(count: int, k: int, round_to: int) -> int:
    rounded = (count + round_to // 2) // round_to * round_to
    floor = -(-k // round_to) * round_to
    return max(rounded, floor)


def _header(k: int, round_to: int) -> dict[str, Any]:
    # Rounding is described in words: the only bare numbers in a profile are k and counts.
    floor = -(-k // round_to) * round_to
    return {
        "unit": "images",
        "k": k,
        "rounding": f"nearest multiple of {round_to}, never below {floor}",
    }


def _withheld(k: int, round_to: int) -> dict[str, Any]:
    """Fewer records than ``k``: nothing but the fact is published."""
    return {
        **_header(k, round_to),
        "total": None,
        "dimensions": {name: dict(_WITHHELD) for name in DIMENSIONS},
        "labels": {"positives": {}, "suppressed": []},
    }
