"""The record of what an archive holds: ``labels.csv`` and ``truth.json``.

:class:`Ledger` is fed each file and study as :mod:`rapha.demo.archive` writes them and
then writes both files; the schema of ``truth.json`` is documented in
:mod:`rapha.demo.archive`.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from rapha.demo.headers import PHI_ATTRIBUTES, QUASI_ATTRIBUTES, StudyInfo, planted
from rapha.demo.iods import Image
from rapha.demo.phantom import FINDINGS
from rapha.demo.plan import Kind, StudyPlan

__all__ = ["FORMAT", "VERSION", "Ledger"]

FORMAT = "rapha-demo-archive"
VERSION = 1

Entry = tuple[str, str]  # (attribute path, value)


def _phi(ds: Dataset, study: StudyInfo) -> list[Entry]:
    """Planted identifiers of one dataset, plus the name parts and MRN inside them."""
    entries = list(planted(ds, PHI_ATTRIBUTES))
    p = study.patient
    parts = (p.family_name, p.given_name, p.mrn)
    extra = [
        (path, part) for path, value in entries for part in parts if part in value and part != value
    ]
    return entries + extra


def _entries(entries: list[Entry]) -> list[dict[str, str]]:
    return [{"attribute": attribute, "value": value} for attribute, value in entries]


class Ledger:
    """Collects per-file and per-study truth while an archive is written."""

    def __init__(self) -> None:
        self.studies: list[dict[str, Any]] = []
        self.burned_in: list[dict[str, Any]] = []
        self.corrupt_files: list[str] = []
        self.by_modality: Counter[str] = Counter()
        self.by_transfer_syntax: Counter[str] = Counter()
        self.files = 0
        self._files: list[dict[str, Any]] = []
        self._phis: list[list[Entry]] = []
        self._quasi: dict[str, str] | None = None

    def add_file(self, path: Path, ds: Dataset, image: Image, study: StudyInfo) -> None:
        """A readable file of the current study, as written."""
        record = self._file_record(path, ds, image, corrupt=None)
        self._files.append(record)
        self._phis.append(_phi(ds, study))
        if self._quasi is None:
            self._quasi = dict(planted(ds, QUASI_ATTRIBUTES))
        self.files += 1
        self.by_modality[str(ds.Modality)] += 1
        self.by_transfer_syntax[record["transfer_syntax"]] += 1
        if image.burned_lines is not None:
            flag = ds.get("BurnedInAnnotation")
            self.burned_in.append(
                {
                    "path": record["path"],
                    "accession": study.accession,
                    "study_uid": study.study_uid,
                    "sop_instance_uid": record["sop_instance_uid"],
                    "modality": study.modality,
                    "flagged": flag == "YES",
                    "burned_in_annotation": flag,
                    "lines": list(image.burned_lines),
                    "font_px": image.font_px,
                    "rows": int(ds.Rows),
                }
            )

    def add_damaged(self, path: Path, ds: Dataset, image: Image, kind: str) -> None:
        """A damaged file of the current study; its header values are not recorded as PHI."""
        record = self._file_record(path, ds, image, corrupt=kind)
        record["phi"] = []
        self._files.append(record)
        self.corrupt_files.append(record["path"])
        self.files += 1

    def end_study(self, plan: StudyPlan, study: StudyInfo, patient_index: int) -> None:
        """Close the current study: PHI common to all its readable files goes study-level."""
        readable = [f for f in self._files if f["corrupt"] is None]
        common = [e for e in self._phis[0] if all(e in other for other in self._phis[1:])]
        for record, phi in zip(readable, self._phis, strict=True):
            record["phi"] = _entries([e for e in phi if e not in common])
        self.studies.append(
            {
                "index": plan.index,
                "accession": study.accession,
                "study_uid": study.study_uid,
                "patient_id": study.patient.mrn,
                "patient_index": patient_index,
                "kind": str(plan.kind),
                "modality": study.modality,
                "body_part": study.body_part,
                "chest_radiograph": plan.kind is Kind.CHEST,
                "date": f"{study.date:%Y%m%d}",
                "findings": dict(plan.findings) if plan.findings is not None else None,
                "labels": dict(plan.labels) if plan.labels is not None else None,
                "burned_in": plan.burned_in,
                "burned_in_flagged": plan.burned_in_flagged,
                "quasi": self._quasi or {},
                "phi": _entries(common),
                "files": self._files,
            }
        )
        self._files, self._phis, self._quasi = [], [], None

    @staticmethod
    def _file_record(
        path: Path, ds: Dataset, image: Image, *, corrupt: str | None
    ) -> dict[str, Any]:
        return {
            "path": path.as_posix(),
            "sop_class_uid": str(ds.SOPClassUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "series_instance_uid": str(ds.SeriesInstanceUID),
            "modality": str(ds.Modality),
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
            "photometric": str(ds.PhotometricInterpretation),
            "rows": int(ds.Rows),
            "columns": int(ds.Columns),
            "bits_stored": int(ds.BitsStored),
            "view": image.view,
            "burned_in": image.burned_lines is not None,
            "burned_in_annotation": ds.get("BurnedInAnnotation"),
            "corrupt": corrupt,
        }

    def labels_csv(self) -> str:
        """``AccessionNumber`` and one column per finding; chest radiograph studies only."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["AccessionNumber", *FINDINGS])
        for record in self.studies:
            labels = record["labels"]
            if labels is None:
                continue
            cells = ["" if labels[name] is None else str(labels[name]) for name in FINDINGS]
            writer.writerow([record["accession"], *cells])
        return buffer.getvalue()

    def truth_json(self, *, seed: int, hospital: str, size_range: tuple[int, int]) -> str:
        """The truth document (schema in :mod:`rapha.demo.archive`)."""
        leak: set[str] = set()
        quasi: set[str] = set()
        for record in self.studies:
            leak.update(e["value"] for e in record["phi"])
            for f in record["files"]:
                leak.update(e["value"] for e in f["phi"])
            quasi.update(record["quasi"].values())
        truth = {
            "format": FORMAT,
            "version": VERSION,
            "seed": seed,
            "study_count": len(self.studies),
            "hospital": hospital,
            "size_range": list(size_range),
            "findings": list(FINDINGS),
            "must_not_leak": sorted(leak),
            "allowed_quasi_identifiers": sorted(quasi),
            "burned_in": self.burned_in,
            "corrupt_files": self.corrupt_files,
            "studies": self.studies,
        }
        return json.dumps(truth, indent=1) + "\n"
