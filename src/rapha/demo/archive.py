"""A synthetic hospital archive: DICOM files as a PACS export writes them, labels, and truth.

:func:`generate_archive` writes, under ``out``::

    dicom/PAT<p>/STU<i>/SER<s>/IMG<n>.dcm   the export (names carry indices, never PHI)
    labels.csv                              AccessionNumber, effusion, pneumothorax, nodule
    truth.json                              what was planted, for tests (schema below)
    .rapha-demo-archive                     marks the directory as a generated archive

What the archive holds (proportions per 20 studies, see :mod:`rapha.demo.plan`): 14 chest
radiographs (DX For Presentation or CR; PA, PA + lateral, or portable AP), 2 CT series
(Hounsfield rescale), 2 MR series, 1 ultrasound (8-bit RGB or MONOCHROME2) and 1 Secondary
Capture (Conversion Type ``WSD``); one study with the patient's name and MRN burned into
the pixels; one extra damaged file. Radiographs are 12-16-bit MONOCHROME1 or MONOCHROME2.
Files are Explicit VR Little Endian, JPEG 2000 Lossless or RLE Lossless
(:mod:`rapha.demo.encoding`). Identifiers are planted in the attributes listed in
:data:`rapha.demo.headers.PHI_ATTRIBUTES`, including free text, a nested sequence and a
private block. Patients are of both sexes, 18-95 years old, some with several studies;
devices come from several manufacturers and models (:mod:`rapha.demo.identities`). The
same seed gives byte-identical files; study ``i`` does not depend on the number of
studies.

``labels.csv``
    One row per chest radiograph study, keyed by ``AccessionNumber``; one column per
    finding in :data:`FINDINGS` with ``1``, ``0``, ``-1`` (uncertain) or empty (missing).
    Studies that are not chest radiographs (CT, MR, US, SC) have no row.

``truth.json`` (``format`` = ``"rapha-demo-archive"``, ``version`` = 1)::

    seed, study_count, hospital, size_range, findings   the generator's inputs
    must_not_leak: [str]        every planted identifier, sorted: names and name parts,
                                MRN and other IDs, accession and procedure IDs, dates,
                                UIDs, free text, staff, institution, station, serial
                                numbers, private values. Each is >= 8 characters or a UID.
    allowed_quasi_identifiers: [str]   sex, age, manufacturer, model, software versions
    burned_in: [{path, accession, study_uid, sop_instance_uid, modality, flagged,
                 burned_in_annotation, lines, font_px, rows}]   one per file with text in
                                its pixels; ``flagged`` is Burned In Annotation == "YES",
                                ``burned_in_annotation`` the attribute's value or null
    corrupt_files: [str]        paths (relative to ``out``) of damaged files
    studies: [{
        index, accession, study_uid, patient_id, patient_index, kind, modality,
        body_part, chest_radiograph, date,
        findings: {name: bool} | null     true state drawn into the pixels (chest only)
        labels: {name: 1|0|-1|null} | null   the CSV cells (null = empty)
        burned_in, burned_in_flagged,
        quasi: {attribute: value},
        phi: [{attribute, value}]     planted in every readable file of the study
        files: [{path, sop_class_uid, sop_instance_uid, series_instance_uid, modality,
                 transfer_syntax, photometric, rows, columns, bits_stored, view,
                 burned_in, burned_in_annotation, corrupt: kind | null,
                 phi: [{attribute, value}]}]   planted in this file only
    }]

A ``phi`` entry ``{attribute, value}`` means ``value`` occurs in (is a substring of) the
attribute at that path, as :func:`rapha.demo.headers.resolve` reads it: equal for
identifiers, contained for name parts inside free text. Damaged files have no ``phi``
entries and their values are not in ``must_not_leak``; reading one with pydicom
(``dcmread`` then ``pixel_array``) raises.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pydicom.pixels.encoders.base import JPEG2000LosslessEncoder
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from rapha.demo import iods
from rapha.demo.encoding import damage, encode, to_bytes
from rapha.demo.headers import StudyInfo
from rapha.demo.identities import (
    Hospital,
    Patient,
    accession_number,
    make_hospital,
    make_patient,
    numeric_id,
    random_uid,
    studies_of_patient,
)
from rapha.demo.phantom import FINDINGS
from rapha.demo.plan import Kind, StudyPlan, plan_studies
from rapha.demo.truth import FORMAT, VERSION, Ledger
from rapha.errors import DependencyError, RaphaError, UsageError

__all__ = ["FINDINGS", "ArchiveSummary", "generate_archive", "is_archive"]

_MARKER = ".rapha-demo-archive"
_OWNED = frozenset({"dicom", "labels.csv", "truth.json", _MARKER})
_MAX_STUDIES = 100_000
_SIZE_LIMITS = (32, 2048)

_STUDY_STREAM = 3
_PIXEL_STREAM = 4
_DAMAGE_STREAM = 5

_MODALITY_BODY_PARTS: Mapping[Kind, tuple[str, ...]] = {
    Kind.CHEST: ("CHEST",),
    Kind.CT: ("CHEST", "ABDOMEN", "HEAD"),
    Kind.MR: ("HEAD", "KNEE", "LSPINE"),
    Kind.US: ("ABDOMEN",),
    Kind.SC: ("CHEST",),
}
_DESCRIPTIONS: Mapping[str, str] = {
    "DX": "XR CHEST",
    "CR": "XR CHEST",
    "CT": "CT",
    "MR": "MR",
    "US": "US ABDOMEN",
    "OT": "KEY IMAGES FROM OUTSIDE REVIEW",
}


@dataclass(frozen=True)
class ArchiveSummary:
    """What :func:`generate_archive` wrote.

    ``files`` counts every ``.dcm`` file, damaged ones included; ``by_modality`` (Modality
    value) and ``by_transfer_syntax`` (transfer syntax UID) count readable files only, so
    each sums to ``files - corrupt_files``.
    """

    out: Path
    labels_csv: Path
    truth_json: Path
    studies: int
    files: int
    corrupt_files: int
    burned_in_studies: int
    by_modality: Mapping[str, int]
    by_transfer_syntax: Mapping[str, int]


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a directory this module generated (it holds the marker file)."""
    return (path / _MARKER).is_file()


def generate_archive(
    out: Path,
    *,
    studies: int,
    seed: int,
    hospital: str = "Rapha General Hospital",
    size_range: tuple[int, int] = (256, 512),
    progress: Callable[[int, int], None] | None = None,
    cr_share: float = 0.4,
) -> ArchiveSummary:
    """Write a synthetic archive of ``studies`` studies under ``out`` (see module docstring).

    Args:
        out: the directory to write. It must not exist, be empty, or hold a previous
            archive (which is replaced).
        studies: number of studies, 1 to 100 000.
        seed: the only source of randomness, >= 0; the same seed gives byte-identical
            files.
        hospital: Institution Name, 8-64 characters.
        size_range: inclusive range of the longer image side in pixels, within 32-2048.
        progress: called as ``progress(done, total)`` after each study.
        cr_share: the share of chest radiographs written as CR rather than DX, 0 to 1
            (a DX-only site is 0, a CR-only site 1). The unflagged burned-in case is always
            CR, whatever the share: only CR may omit Burned In Annotation.

    Raises:
        UsageError: an argument is out of range, or ``out`` holds other files.
        DependencyError: the JPEG 2000 encoder (pylibjpeg-openjpeg) is not installed.
        RaphaError: the archive could not be written (disk full, permissions).
    """
    _check(studies, seed, size_range)
    if not 0.0 <= cr_share <= 1.0:
        raise UsageError(f"cr_share must be between 0 and 1, not {cr_share}")
    if "pylibjpeg" not in JPEG2000LosslessEncoder.available_plugins:
        raise DependencyError(
            "writing JPEG 2000 files needs pylibjpeg and pylibjpeg-openjpeg; "
            "install them with: pip install 'rapha[node]'"
        )
    site = make_hospital(seed, hospital)
    try:
        _prepare(out)
        summary = _write(
            out,
            site,
            studies=studies,
            seed=seed,
            size_range=size_range,
            progress=progress,
            cr_share=cr_share,
        )
    except OSError as exc:
        raise RaphaError(
            f"cannot write the demo archive under {out}: {exc.strerror or exc}; "
            "check the path, its permissions and free disk space"
        ) from exc
    return summary


def _check(studies: int, seed: int, size_range: tuple[int, int]) -> None:
    if not 1 <= studies <= _MAX_STUDIES:
        raise UsageError(f"the number of studies must be 1 to {_MAX_STUDIES}, not {studies}")
    if seed < 0:
        raise UsageError(f"the seed must be a non-negative integer, not {seed}")
    lo, hi = size_range
    if not _SIZE_LIMITS[0] <= lo <= hi <= _SIZE_LIMITS[1]:
        raise UsageError(
            f"size_range must satisfy {_SIZE_LIMITS[0]} <= low <= high <= {_SIZE_LIMITS[1]},"
            f" not {size_range}"
        )


def _prepare(out: Path) -> None:
    """Make ``out`` ready: new, empty, or a previous archive whose files are removed."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and _MARKER not in entries:
            raise UsageError(
                f"{out} is not empty and does not hold a Rapha demo archive; "
                "choose a new or empty directory"
            )
        foreign = [name for name in entries if name not in _OWNED]
        if foreign:
            shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
            raise UsageError(
                f"{out} holds a demo archive and other files ({shown}); "
                "move them away or choose another output directory"
            )
        for name in entries:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")


def _study_info(
    rng: np.random.Generator,
    plan: StudyPlan,
    patient: Patient,
    nth: int,
    site: Hospital,
    seed: int,
    cr_share: float,
) -> StudyInfo:
    if plan.kind is Kind.CHEST:
        modality = "CR" if plan.force_cr or rng.random() < cr_share else "DX"
    else:
        modality = {Kind.CT: "CT", Kind.MR: "MR", Kind.US: "US", Kind.SC: "OT"}[plan.kind]
    parts = _MODALITY_BODY_PARTS[plan.kind]
    body_part = parts[int(rng.integers(len(parts)))]
    devices = site.devices_for(modality)
    device = devices[int(rng.integers(len(devices)))]
    base = _DESCRIPTIONS[modality]
    if modality in ("CT", "MR"):
        base = f"{modality} {body_part}"
    p = patient
    description = (
        f"{base} - {p.family_name}, {p.given_name}",
        f"{base} for {p.given_name} {p.family_name}",
        f"{p.family_name} {p.given_name} {base}",
    )[int(rng.integers(3))]
    hour = int(rng.integers(7, 19))
    return StudyInfo(
        hospital=site,
        patient=patient,
        device=device,
        modality=modality,
        body_part=body_part,
        accession=accession_number(plan.index, seed=seed),
        study_uid=random_uid(rng),
        study_id="ST" + numeric_id(plan.index, seed=seed, salt=5, digits=8),
        requested_procedure_id="RP" + numeric_id(plan.index, seed=seed, salt=6, digits=10),
        scheduled_step_id="SPS" + numeric_id(plan.index, seed=seed, salt=7, digits=10),
        date=patient.study_dates[nth],
        time=f"{hour:02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}",
        description=description,
        referring_physician=str(rng.choice(site.referring_physicians)),
        operator=str(rng.choice(site.operators)),
    )


def _images(
    rng: np.random.Generator,
    plan: StudyPlan,
    study: StudyInfo,
    seed: int,
    size_range: tuple[int, int],
) -> list[iods.Image]:
    def pixel_rng(n: int) -> np.random.Generator:
        return np.random.default_rng([seed, _PIXEL_STREAM, plan.index, n])

    p = study.patient
    burn = None
    if plan.burned_in:
        burn = iods.Burn(
            layouts=((p.display_name, p.mrn), (p.family_name, p.given_name, p.mrn)),
            flagged=plan.burned_in_flagged,
        )
    if plan.kind is Kind.CHEST:
        assert plan.findings is not None
        return iods.chest_images(
            rng, pixel_rng, study, findings=plan.findings, burn=burn, size_range=size_range
        )
    if plan.kind is Kind.CT:
        return iods.ct_images(rng, pixel_rng, study, size_range=size_range)
    if plan.kind is Kind.MR:
        return iods.mr_images(rng, pixel_rng, study, size_range=size_range)
    if plan.kind is Kind.US:
        return iods.us_images(rng, pixel_rng, study, burn=burn, size_range=size_range)
    return iods.sc_images(rng, pixel_rng, study, burn=burn, size_range=size_range)


def _transfer_syntax(rng: np.random.Generator, images: list[iods.Image]) -> UID:
    """Mostly Explicit VR Little Endian; JPEG 2000 only for monochrome images."""
    draw = rng.random()
    colour = any(image.pixels.ndim == 3 for image in images)
    if draw < 0.14 and not colour:
        return JPEG2000Lossless
    if draw < 0.28:
        return RLELossless
    return ExplicitVRLittleEndian


def _write(
    out: Path,
    site: Hospital,
    *,
    studies: int,
    seed: int,
    size_range: tuple[int, int],
    progress: Callable[[int, int], None] | None,
    cr_share: float,
) -> ArchiveSummary:
    owners = studies_of_patient(seed, studies)
    patients: dict[int, Patient] = {}
    ledger = Ledger()
    for plan, (patient_index, nth) in zip(plan_studies(seed, studies), owners, strict=True):
        patient = patients.setdefault(patient_index, make_patient(seed, patient_index))
        rng = np.random.default_rng([seed, _STUDY_STREAM, plan.index])
        study = _study_info(rng, plan, patient, nth, site, seed, cr_share)
        images = _images(rng, plan, study, seed, size_range)
        ts = _transfer_syntax(rng, images)
        study_dir = Path("dicom", f"PAT{patient_index:05d}", f"STU{plan.index:05d}")
        for image in images:
            ds = encode(image, ts)
            rel = study_dir / f"SER{ds.SeriesNumber:03d}" / f"IMG{ds.InstanceNumber:04d}.dcm"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(to_bytes(ds))
            ledger.add_file(rel, ds, image, study)
        if plan.damage is not None:
            _write_damaged(out, study_dir, plan, rng, images, seed, ledger)
        ledger.end_study(plan, study, patient_index)
        if progress is not None:
            progress(plan.index + 1, studies)

    labels_csv = out / "labels.csv"
    labels_csv.write_text(ledger.labels_csv(), encoding="utf-8")
    truth_json = out / "truth.json"
    truth_json.write_text(
        ledger.truth_json(seed=seed, hospital=site.name, size_range=size_range),
        encoding="utf-8",
    )
    return ArchiveSummary(
        out=out,
        labels_csv=labels_csv,
        truth_json=truth_json,
        studies=studies,
        files=ledger.files,
        corrupt_files=len(ledger.corrupt_files),
        burned_in_studies=sum(1 for record in ledger.studies if record["burned_in"]),
        by_modality=MappingProxyType(dict(sorted(ledger.by_modality.items()))),
        by_transfer_syntax=MappingProxyType(dict(sorted(ledger.by_transfer_syntax.items()))),
    )


def _write_damaged(
    out: Path,
    study_dir: Path,
    plan: StudyPlan,
    rng: np.random.Generator,
    images: list[iods.Image],
    seed: int,
    ledger: Ledger,
) -> None:
    """One more instance in the study's first series, written and then broken."""
    assert plan.damage is not None
    template = images[0]
    ds = copy.deepcopy(template.dataset)
    series = [i.dataset for i in images if i.dataset.SeriesInstanceUID == ds.SeriesInstanceUID]
    ds.InstanceNumber = 1 + max(int(d.InstanceNumber) for d in series)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(random_uid(rng))
    broken = damage(
        to_bytes(ds), plan.damage, np.random.default_rng([seed, _DAMAGE_STREAM, plan.index])
    )
    rel = study_dir / f"SER{ds.SeriesNumber:03d}" / f"IMG{ds.InstanceNumber:04d}.dcm"
    (out / rel).write_bytes(broken)
    ledger.add_damaged(rel, ds, template, str(plan.damage))
