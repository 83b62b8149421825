"""The synthetic hospital archive: what it holds, that it is valid DICOM, and what truth says."""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from rapha.demo import FINDINGS, ArchiveSummary, generate_archive, is_archive
from rapha.demo.encoding import encode, to_bytes
from rapha.demo.headers import resolve
from rapha.demo.iods import Image
from rapha.errors import UsageError

STUDIES = 200
SEED = 1

CHEST_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
}
ALL_SOP_CLASSES = CHEST_SOP_CLASSES | {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.6.1",  # US Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}

# dciodvfy warnings the archive produces on purpose, as (attribute, message):
# the private block in group 0011 is unknown to dciodvfy's dictionary, and the retired
# Other Patient IDs (0010,1000) is planted because legacy exports still carry it.
_UNKNOWN_PRIVATE = "Unrecognized tag - assuming explicit value representation OK"
ALLOWED_WARNINGS = {
    ('(0011,1010,"MEDIVIEW PACS 3.1")', _UNKNOWN_PRIVATE),
    ('(0011,1011,"MEDIVIEW PACS 3.1")', _UNKNOWN_PRIVATE),
    ('(0011,1012,"MEDIVIEW PACS 3.1")', _UNKNOWN_PRIVATE),
    ("OtherPatientIDs(0010,1000)", "Retired attribute"),
    ("OtherPatientIDs(0010,1000)", "Attribute is not present in standard DICOM IOD"),
}

_WARNING = re.compile(r"^Warning - </(?P<attr>[^>]*)> - (?P<message>.*?)(?: \[[A-Z]{2}\])?$")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArchiveSummary, dict[str, Any]]:
    out = tmp_path_factory.mktemp("archive")
    summary = generate_archive(out, studies=STUDIES, seed=SEED)
    truth = json.loads(summary.truth_json.read_text(encoding="utf-8"))
    return summary, truth


def _readable(truth: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(s, f) for s in truth["studies"] for f in s["files"] if f["corrupt"] is None]


def _read_pixels(path: Path) -> tuple[Dataset, np.ndarray[Any, Any]]:
    ds = dcmread(path)
    return ds, ds.pixel_array


def _labels(summary: ArchiveSummary) -> list[dict[str, str]]:
    with summary.labels_csv.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _dciodvfy() -> str:
    local = Path(sys.executable).parent / "dciodvfy"
    found = str(local) if local.exists() else shutil.which("dciodvfy")
    if found is None:
        pytest.fail("dciodvfy not found: install the dev extra (pip install -e '.[dev]')")
    return found


def test_writes_at_least_the_requested_studies(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive

    study_dirs = list((summary.out / "dicom").glob("PAT*/STU*"))

    assert summary.studies == truth["study_count"] == len(truth["studies"]) == STUDIES
    assert len(study_dirs) >= STUDIES
    assert len({s["study_uid"] for s in truth["studies"]}) == STUDIES
    assert len({s["accession"] for s in truth["studies"]}) == STUDIES
    assert is_archive(summary.out)


def test_files_on_disk_are_exactly_those_in_truth(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive

    on_disk = {p.relative_to(summary.out).as_posix() for p in summary.out.rglob("*.dcm")}
    in_truth = {f["path"] for s in truth["studies"] for f in s["files"]}

    assert on_disk == in_truth
    assert summary.files == len(on_disk)
    assert sum(summary.by_modality.values()) == summary.files - summary.corrupt_files
    assert sum(summary.by_transfer_syntax.values()) == summary.files - summary.corrupt_files


def test_every_file_not_listed_as_corrupt_reads_with_its_pixels(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive

    for _study, record in _readable(truth):
        ds, pixels = _read_pixels(summary.out / record["path"])

        assert str(ds.SOPClassUID) == record["sop_class_uid"]
        assert str(ds.file_meta.TransferSyntaxUID) == record["transfer_syntax"]
        assert ds.PhotometricInterpretation == record["photometric"]
        assert pixels.shape[:2] == (record["rows"], record["columns"])
        assert int(pixels.max()) <= 2 ** record["bits_stored"] - 1


def test_corrupt_files_listed_in_truth_fail_to_read(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    kinds = {f["corrupt"] for s in truth["studies"] for f in s["files"] if f["corrupt"]}

    assert len(truth["corrupt_files"]) == summary.corrupt_files >= 4
    assert kinds == {
        "truncated_pixel_data",
        "truncated_header",
        "garbage_after_preamble",
        "zero_length",
    }
    for rel in truth["corrupt_files"]:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure is the point
            _read_pixels(summary.out / rel)


def test_dciodvfy_finds_no_errors_and_only_allowed_warnings(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    sample: dict[tuple[str, str, str, bool], str] = {}
    for _study, record in _readable(truth):
        key = (
            record["sop_class_uid"],
            record["transfer_syntax"],
            record["photometric"],
            record["burned_in_annotation"] is None,
        )
        sample.setdefault(key, record["path"])
    tool = _dciodvfy()

    errors: list[str] = []
    warnings: set[tuple[str, str]] = set()
    for path in sample.values():
        proc = subprocess.run(
            [tool, "-new", str(summary.out / path)], capture_output=True, text=True, check=False
        )
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith("Error"):
                errors.append(f"{path}: {line}")
            match = _WARNING.match(line)
            if match:
                warnings.add((match["attr"], match["message"]))

    assert {key[0] for key in sample} == ALL_SOP_CLASSES
    assert errors == []
    assert warnings <= ALLOWED_WARNINGS, warnings - ALLOWED_WARNINGS


def test_truth_labels_csv_and_headers_agree(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    rows = _labels(summary)
    chest = [s for s in truth["studies"] if s["chest_radiograph"]]
    by_accession = {s["accession"]: s for s in truth["studies"]}

    assert list(rows[0]) == ["AccessionNumber", *FINDINGS]
    assert [r["AccessionNumber"] for r in rows] == [s["accession"] for s in chest]
    for row in rows:
        study = by_accession[row["AccessionNumber"]]
        for name in FINDINGS:
            cell = row[name]
            label = study["labels"][name]
            assert cell == ("" if label is None else str(label))
            if cell in ("0", "1"):
                assert study["findings"][name] is (cell == "1")
    for study, record in _readable(truth):
        ds = dcmread(summary.out / record["path"], stop_before_pixels=True)
        assert ds.AccessionNumber == study["accession"]
        assert ds.StudyInstanceUID == study["study_uid"]
        assert ds.PatientID == study["patient_id"]
        assert ds.SOPInstanceUID == record["sop_instance_uid"]
        assert ds.SeriesInstanceUID == record["series_instance_uid"]
        assert ds.Modality == record["modality"] == study["modality"]
        assert ds.BodyPartExamined == study["body_part"]
    for study in truth["studies"]:
        assert (study["findings"] is not None) is study["chest_radiograph"]


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    sizes = (64, 96)
    a = generate_archive(tmp_path / "a", studies=24, seed=7, size_range=sizes)
    b = generate_archive(tmp_path / "b", studies=24, seed=7, size_range=sizes)
    c = generate_archive(tmp_path / "c", studies=24, seed=8, size_range=sizes)

    files_a, files_b, files_c = _tree_bytes(a.out), _tree_bytes(b.out), _tree_bytes(c.out)

    assert files_a == files_b
    assert files_a["labels.csv"] != files_c["labels.csv"]
    common = set(files_a) & set(files_c)
    dicom = [name for name in common if name.endswith(".dcm") and files_a[name]]
    assert dicom
    assert all(files_a[name] != files_c[name] for name in dicom)


def test_study_i_does_not_depend_on_the_number_of_studies(tmp_path: Path) -> None:
    small = generate_archive(tmp_path / "small", studies=7, seed=3, size_range=(64, 64))
    large = generate_archive(tmp_path / "large", studies=30, seed=3, size_range=(64, 64))

    files_small = _tree_bytes(small.out / "dicom")
    files_large = _tree_bytes(large.out / "dicom")

    assert files_small
    assert all(files_large[name] == data for name, data in files_small.items())


def test_at_least_ten_percent_of_studies_are_not_chest_radiographs(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    _summary, truth = archive

    modalities = Counter(s["modality"] for s in truth["studies"])
    not_chest = [s for s in truth["studies"] if not s["chest_radiograph"]]
    chest_parts = {s["body_part"] for s in truth["studies"] if s["chest_radiograph"]}
    other_parts = {s["body_part"] for s in not_chest}

    assert len(not_chest) / len(truth["studies"]) >= 0.10
    assert {"DX", "CR", "CT", "MR", "US", "OT"} <= set(modalities)
    assert chest_parts == {"CHEST"}
    assert other_parts - {"CHEST"}
    assert all(s["modality"] not in ("DX", "CR") for s in not_chest)


def test_chest_radiographs_have_views_laterality_and_sop_classes(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive

    views: Counter[str] = Counter()
    for study, record in _readable(truth):
        if not study["chest_radiograph"]:
            continue
        ds = dcmread(summary.out / record["path"], stop_before_pixels=True)
        views[ds.ViewPosition] += 1
        assert ds.SOPClassUID in CHEST_SOP_CLASSES
        assert ds.BodyPartExamined == "CHEST"
        if ds.Modality == "DX":
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
            assert ds.ImageLaterality == "U"  # chest is not a paired structure
            assert ds.PresentationIntentType == "FOR PRESENTATION"
        else:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"

    assert set(views) == {"PA", "AP", "LL"}


def test_transfer_syntax_mix_is_present_and_every_one_decodes(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    by_ts = Counter(f["transfer_syntax"] for _s, f in _readable(truth))

    assert set(by_ts) == {ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless}
    assert by_ts[ExplicitVRLittleEndian] > by_ts[JPEG2000Lossless] + by_ts[RLELossless]
    assert dict(summary.by_transfer_syntax) == dict(by_ts)


@pytest.mark.parametrize("transfer_syntax", [JPEG2000Lossless, RLELossless])
def test_compressed_transfer_syntaxes_round_trip_to_the_original_pixels(
    archive: tuple[ArchiveSummary, dict[str, Any]], transfer_syntax: UID
) -> None:
    summary, truth = archive
    # One file per photometric interpretation and bit depth the archive uses.
    sample: dict[tuple[str, int], str] = {}
    for _study, record in _readable(truth):
        if transfer_syntax == JPEG2000Lossless and record["photometric"] == "RGB":
            continue  # the archive writes colour as Explicit VR or RLE only
        sample.setdefault((record["photometric"], record["bits_stored"]), record["path"])

    for path in sample.values():
        ds, original = _read_pixels(summary.out / path)
        template = copy.deepcopy(ds)
        del template.PixelData
        template.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        image = Image(dataset=template, pixels=original, view=None)

        data = to_bytes(encode(image, transfer_syntax))
        decoded = dcmread(io.BytesIO(data)).pixel_array

        assert np.array_equal(decoded, original), path
    assert len(sample) >= 4


def test_both_photometric_interpretations_and_plausible_pixel_modules(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    photometrics: Counter[str] = Counter()
    bits: set[int] = set()
    sizes: set[tuple[int, int]] = set()

    for study, record in _readable(truth):
        ds, pixels = _read_pixels(summary.out / record["path"])
        photometrics[ds.PhotometricInterpretation] += 1
        if study["chest_radiograph"]:
            bits.add(int(ds.BitsStored))
            assert 12 <= ds.BitsStored <= 16
            assert 0 < float(ds.WindowWidth) <= 2**ds.BitsStored
            assert 0 <= float(ds.WindowCenter) <= 2**ds.BitsStored - 1
            assert 256 <= max(ds.Rows, ds.Columns) <= 512
            sizes.add((int(ds.Rows), int(ds.Columns)))
            if ds.Modality == "DX":
                assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, 0)
                expected = (
                    "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
                )
                assert ds.PresentationLUTShape == expected
        if ds.Modality == "CT":
            assert ds.RescaleType == "HU"
            assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
            hu = pixels.astype(np.int32) - 1024
            assert hu.min() < -900  # air around the body
        if ds.Modality == "US":
            assert ds.BitsStored == 8

    assert photometrics["MONOCHROME1"] > 0
    assert photometrics["MONOCHROME2"] > 0
    assert photometrics["RGB"] > 0
    assert {12, 16} <= bits
    assert len(sizes) > 20


def test_label_prevalence_is_within_bounds_with_uncertain_and_missing_cells(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, _truth = archive
    rows = _labels(summary)

    for name in FINDINGS:
        cells = Counter(row[name] for row in rows)
        assert 0.10 <= cells["1"] / len(rows) <= 0.40, (name, cells)
    all_cells = Counter(row[name] for row in rows for name in FINDINGS)
    total = sum(all_cells.values())
    assert set(all_cells) == {"1", "0", "-1", ""}
    assert 0.01 <= all_cells["-1"] / total <= 0.10
    assert 0.01 <= all_cells[""] / total <= 0.10


def _is_uid(value: str) -> bool:
    return UID(value).is_valid and value.startswith("2.25.")


def test_must_not_leak_values_are_distinctive_and_in_the_headers_they_claim(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    must_not_leak = set(truth["must_not_leak"])
    claimed: set[str] = set()
    attributes: set[str] = set()

    for study, record in _readable(truth):
        ds = dcmread(summary.out / record["path"], stop_before_pixels=True)
        for entry in study["phi"] + record["phi"]:
            value = resolve(ds, entry["attribute"])
            assert value is not None, entry["attribute"]
            assert entry["value"] in value, entry["attribute"]
            claimed.add(entry["value"])
            attributes.add(entry["attribute"])

    assert claimed == must_not_leak
    assert all(len(v) >= 8 or _is_uid(v) for v in must_not_leak)
    assert must_not_leak.isdisjoint(truth["allowed_quasi_identifiers"])
    assert {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
        "OtherPatientIDsSequence[0].PatientID",
        "AccessionNumber",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "ReferringPhysicianName",
        "InstitutionName",
        "InstitutionAddress",
        "OperatorsName",
        "StationName",
        "StudyDescription",
        "ProtocolName",
        "SeriesDescription",
        "ImageComments",
        "RequestAttributesSequence[0].RequestedProcedureID",
        "RequestAttributesSequence[0].ScheduledProcedureStepID",
        "RequestAttributesSequence[0].AccessionNumber",
        "00111010",
    } <= attributes


def test_free_text_private_tags_and_nested_ids_carry_the_patient(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    study, record = _readable(truth)[0]
    ds = dcmread(summary.out / record["path"], stop_before_pixels=True)
    family, given = str(ds.PatientName).split("^")[:2]

    for keyword in ("StudyDescription", "ProtocolName", "SeriesDescription", "ImageComments"):
        assert family in str(ds[keyword].value)
        assert given in str(ds[keyword].value)
    block = ds.private_block(0x0011, "MEDIVIEW PACS 3.1")
    assert block[0x10].value == study["patient_id"]
    assert ds.RequestAttributesSequence[0].AccessionNumber == study["accession"]
    assert ds.OtherPatientIDsSequence[0].PatientID in truth["must_not_leak"]
    assert study["patient_id"] in truth["must_not_leak"]
    assert re.fullmatch(r"MRN\d{8}", study["patient_id"])
    assert len(study["accession"]) >= 10


def test_patients_vary_in_sex_age_vendor_and_number_of_studies(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    _summary, truth = archive
    quasi = [s["quasi"] for s in truth["studies"]]
    ages = [int(q["PatientAge"][:3]) for q in quasi]
    per_patient = Counter(s["patient_index"] for s in truth["studies"])
    dates = [dt.datetime.strptime(s["date"], "%Y%m%d").date() for s in truth["studies"]]

    assert {q["PatientSex"] for q in quasi} == {"F", "M"}
    assert min(ages) >= 18
    assert max(ages) <= 95
    assert max(ages) - min(ages) > 40
    assert len({q["Manufacturer"] for q in quasi}) >= 4
    assert len({q["ManufacturerModelName"] for q in quasi}) >= 6
    assert max(per_patient.values()) >= 3
    assert all(dt.date(2016, 1, 1) <= d <= dt.date(2024, 12, 31) for d in dates)
    assert set(truth["allowed_quasi_identifiers"]) >= {"F", "M"}


def test_about_five_percent_of_studies_have_burned_in_text_flagged_or_not(
    archive: tuple[ArchiveSummary, dict[str, Any]],
) -> None:
    summary, truth = archive
    burned_studies = {b["study_uid"] for b in truth["burned_in"]}
    flags = Counter(b["burned_in_annotation"] for b in truth["burned_in"])

    assert summary.burned_in_studies == len(burned_studies)
    assert 0.03 <= len(burned_studies) / STUDIES <= 0.08
    assert flags["YES"] > 0
    assert flags[None] > 0
    assert set(flags) <= {"YES", None}
    assert {b["modality"] for b in truth["burned_in"]} >= {"DX", "CR", "US", "OT"}
    for entry in truth["burned_in"]:
        ds = dcmread(summary.out / entry["path"], stop_before_pixels=True)
        assert ds.get("BurnedInAnnotation") == entry["burned_in_annotation"]
        assert entry["flagged"] is (entry["burned_in_annotation"] == "YES")
        assert entry["font_px"] * 0.7 >= 0.05 * entry["rows"]  # capitals >= 5 % of height
        assert str(ds.PatientID) in entry["lines"]


def _display(ds: Dataset, pixels: np.ndarray[Any, Any]) -> PILImage.Image:
    if pixels.ndim == 3:
        return PILImage.fromarray(pixels.astype(np.uint8)).convert("L")
    top = 2 ** int(ds.BitsStored) - 1
    grey = pixels.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = top - grey
    return PILImage.fromarray((grey * 255.0 / top).astype(np.uint8))


def test_burned_in_text_is_readable_by_tesseract(
    archive: tuple[ArchiveSummary, dict[str, Any]], tmp_path: Path
) -> None:
    tesseract = shutil.which("tesseract")
    if tesseract is None:
        pytest.skip("tesseract is not installed (apt-get install tesseract-ocr)")
    summary, truth = archive

    read = 0
    for n, entry in enumerate(truth["burned_in"]):
        ds, pixels = _read_pixels(summary.out / entry["path"])
        png = tmp_path / f"{n}.png"
        _display(ds, pixels).save(png)
        proc = subprocess.run(
            [tesseract, str(png), "-", "--psm", "11"], capture_output=True, text=True, check=True
        )
        family = str(ds.PatientName).split("^")[0]
        read += family in proc.stdout

    assert read == len(truth["burned_in"])


def test_refuses_a_foreign_non_empty_directory_and_replaces_a_previous_archive(
    tmp_path: Path,
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    previous = tmp_path / "previous"
    generate_archive(previous, studies=3, seed=1, size_range=(64, 64))

    with pytest.raises(UsageError, match="not empty"):
        generate_archive(foreign, studies=3, seed=1, size_range=(64, 64))
    again = generate_archive(previous, studies=2, seed=2, size_range=(64, 64))

    assert (foreign / "notes.txt").read_text() == "keep me"
    assert json.loads(again.truth_json.read_text())["study_count"] == 2
    assert len(list((previous / "dicom").glob("PAT*/STU*"))) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"studies": 0}, "number of studies"),
        ({"seed": -1}, "seed"),
        ({"size_range": (16, 64)}, "size_range"),
        ({"size_range": (128, 64)}, "size_range"),
        ({"hospital": "Tiny"}, "hospital name"),
    ],
)
def test_invalid_arguments_raise_usage_error(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"studies": 2, "seed": 1, "size_range": (64, 64)} | kwargs

    with pytest.raises(UsageError, match=message):
        generate_archive(tmp_path / "out", **args)

    assert not (tmp_path / "out").exists()
