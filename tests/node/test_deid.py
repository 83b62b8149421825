"""Header de-identification and pixel preparation, on sample files and a synthetic archive."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.data
import pytest
from pydicom.data import data_manager
from pydicom.dataset import Dataset

from rapha.dataset import PixelReason
from rapha.demo.archive import generate_archive
from rapha.errors import DataError
from rapha.node import HeaderResult, deidentify_header, prepare_pixels
from rapha.pacs.source import read_dataset
from rapha.privacy import ALLOWLIST, Domain, Exclusion, Pseudonymizer

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ALLOWED_NAMES = [f.name for f in ALLOWLIST]
UID_FORM = re.compile(r"2\.25\.(0|[1-9][0-9]*)")
PIXEL_REASONS = {r.value for r in PixelReason}
SIZE = (32, 48)


@dataclass(frozen=True)
class ArchiveFile:
    rel: str
    ds: Dataset
    study: dict[str, Any]


@dataclass(frozen=True)
class Archive:
    truth: dict[str, Any]
    files: list[ArchiveFile]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    root = tmp_path_factory.mktemp("deid") / "archive"
    generate_archive(root, studies=20, seed=3, size_range=(64, 64))
    truth = json.loads((root / "truth.json").read_text())
    corrupt = set(truth["corrupt_files"])
    files = []
    for study in truth["studies"]:
        for record in study["files"]:
            if record["path"] not in corrupt:
                ds = read_dataset(str(root / record["path"]))
                files.append(ArchiveFile(record["path"], ds, study))
    return Archive(truth, files)


def _results(archive: Archive, key: bytes = KEY) -> Iterator[tuple[ArchiveFile, HeaderResult]]:
    pseudonymizer = Pseudonymizer(key)
    for item in archive.files:
        yield item, deidentify_header(item.ds, pseudonymizer)


def _sample_paths() -> list[Path]:
    local = Path(pydicom.data.__file__).parent / "test_files"
    paths = [p for p in local.rglob("*.dcm") if p.is_file()]
    external = data_manager.external_data_sources().get("pydicom-data")
    if external is not None:
        paths += [Path(p) for p in external.get_paths("*.dcm")]
    return sorted(paths, key=lambda p: (p.name, str(p)))


def _read_sample(path: Path) -> Dataset | None:
    try:
        return read_dataset(str(path))
    except Exception:  # a deliberately malformed sample: not this test's subject
        return None


def test_archive_excluded_kinds_are_excluded_and_others_pass(archive: Archive) -> None:
    # Prepare: what the generator planted
    expected: dict[str, Exclusion | None] = {}
    for item in archive.files:
        kind = item.study["kind"]
        if kind in {"us", "sc"}:
            expected[item.rel] = Exclusion.MODALITY_US_SC_OT
        elif item.study["burned_in_flagged"]:
            expected[item.rel] = Exclusion.BURNED_IN_FLAG
        else:
            expected[item.rel] = None

    # Execute
    got = {item.rel: result for item, result in _results(archive)}

    # Assert
    assert {rel: r.exclusion for rel, r in got.items()} == expected
    assert any(e is None for e in expected.values())
    assert any(e is not None for e in expected.values())
    for rel, result in got.items():
        if result.exclusion is None:
            assert list(result.meta) == ALLOWED_NAMES, rel
            assert result.patient_pseudonym is not None
            assert None not in (result.study_uid, result.series_uid, result.sop_uid)
        else:
            assert dict(result.meta) == {}
            assert result.patient_pseudonym is None


def test_archive_meta_carries_the_planted_quasi_identifiers(archive: Archive) -> None:
    # Execute
    kept = [(item, r) for item, r in _results(archive) if r.exclusion is None]

    # Assert
    for item, result in kept:
        assert result.meta["modality"] == item.study["modality"]
        assert result.meta["rows"] == item.ds.Rows
        assert result.meta["sex"] in {"M", "F", "O"}
        assert result.meta["age_band"] is not None


def test_pseudonyms_are_deterministic_per_key_and_follow_the_hierarchy(archive: Archive) -> None:
    # Execute
    first = [r for _, r in _results(archive)]
    again = [r for _, r in _results(archive)]
    other = [r for _, r in _results(archive, OTHER_KEY)]

    # Assert: stable under one key, unrelated under another
    assert first == again
    kept = [(a, b) for a, b in zip(first, other, strict=True) if a.exclusion is None]
    assert kept
    for a, b in kept:
        assert a.patient_pseudonym != b.patient_pseudonym
        assert {a.study_uid, a.series_uid, a.sop_uid}.isdisjoint(
            {b.study_uid, b.series_uid, b.sop_uid}
        )
    # one pseudonym per raw identifier, and the UIDs are those of Pseudonymizer.uid
    pseudonymizer = Pseudonymizer(KEY)
    by_patient: dict[str, set[str | None]] = {}
    for item, result in zip(archive.files, first, strict=True):
        if result.exclusion is not None:
            continue
        by_patient.setdefault(item.study["patient_id"], set()).add(result.patient_pseudonym)
        assert result.study_uid == pseudonymizer.uid(Domain.STUDY, item.study["study_uid"])
        assert result.sop_uid == pseudonymizer.uid(Domain.INSTANCE, item.ds.SOPInstanceUID)
        for uid in (result.study_uid, result.series_uid, result.sop_uid):
            assert uid is not None
            assert len(uid) <= 64
            assert UID_FORM.fullmatch(uid)
    assert all(len(p) == 1 for p in by_patient.values())
    assert len({next(iter(p)) for p in by_patient.values()}) == len(by_patient)


def test_no_must_not_leak_value_in_any_header_result(archive: Archive) -> None:
    # Prepare
    needles = [v.lower() for v in archive.truth["must_not_leak"]]
    assert needles

    # Execute
    results = [r for _, r in _results(archive)]

    # Assert: every field, and the repr a log line would show
    for result in results:
        texts = [repr(result)] + [str(getattr(result, f.name)) for f in fields(result)]
        texts += [str(v) for v in result.meta.values()]
        haystack = "\n".join(texts).lower()
        leaked = [n for n in needles if n in haystack]
        assert not leaked, f"{len(leaked)} identifiers leaked"


def test_header_only_read_gives_the_same_result(archive: Archive, tmp_path: Path) -> None:
    # Prepare
    pseudonymizer = Pseudonymizer(KEY)
    item = next(f for f in archive.files if f.study["kind"] == "chest")
    path = tmp_path / "one.dcm"
    item.ds.save_as(path)
    header = read_dataset(str(path), header_only=True)

    # Execute
    full = deidentify_header(item.ds, pseudonymizer)
    strict = deidentify_header(header, pseudonymizer)
    lenient = deidentify_header(header, pseudonymizer, require_pixel_data=False)

    # Assert: without pixel data the screen refuses unless told the pixels come later
    assert strict.exclusion is Exclusion.NON_IMAGE_OBJECT
    assert lenient == full


def _pixels(ds: Dataset) -> tuple[str, np.ndarray | None]:
    """("image", the image) or (the DataError message, None)."""
    try:
        return "image", prepare_pixels(ds, SIZE)
    except DataError as exc:
        return str(exc), None


def _check_image(image: np.ndarray, name: str) -> None:
    assert image.shape == SIZE, name
    assert image.dtype == np.float32, name
    assert float(image.min()) >= 0.0, name
    assert float(image.max()) <= 1.0, name


def test_archive_pixels_are_prepared_or_refused_with_a_reason(archive: Archive) -> None:
    for item, result in _results(archive):
        # Execute
        outcome, image = _pixels(item.ds)

        # Assert: a refusal has a fixed reason, and only excluded instances are refused
        if image is None:
            assert outcome in PIXEL_REASONS
            assert result.exclusion is not None
        else:
            _check_image(image, item.rel)


def test_sample_files_never_raise_from_the_header_and_refuse_pixels_with_a_reason() -> None:
    # Prepare
    pseudonymizer = Pseudonymizer(KEY)
    read = [(p.name, ds) for p in _sample_paths() if (ds := _read_sample(p)) is not None]
    assert len(read) > 100
    outcomes: dict[str, int] = {}

    for name, ds in read:
        # Execute
        result = deidentify_header(ds, pseudonymizer)
        outcome, image = _pixels(ds)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

        # Assert
        if result.exclusion is None:
            assert list(result.meta) == ALLOWED_NAMES, name
            for uid in (result.study_uid, result.series_uid, result.sop_uid):
                assert uid is None or UID_FORM.fullmatch(uid), name
                assert uid is None or len(uid) <= 64, name
        if image is None:
            assert outcome in PIXEL_REASONS, name
        else:
            _check_image(image, name)
    assert outcomes.get("image", 0) > 40


def _sample(name: str) -> Dataset:
    path = pydicom.data.get_testdata_file(name)
    assert isinstance(path, str), name
    return read_dataset(path)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR2_J2KR.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_known_samples_pass_the_screen_with_their_facts(name: str) -> None:
    # Prepare
    ds = _sample(name)

    # Execute
    result = deidentify_header(ds, Pseudonymizer(KEY))
    image = prepare_pixels(ds, SIZE)

    # Assert
    assert result.exclusion is None
    assert result.meta["modality"] == ds.Modality
    assert result.meta["rows"] == ds.Rows
    assert result.meta["columns"] == ds.Columns
    _check_image(image, name)
    assert float(image.max()) > float(image.min())


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_small.dcm", Exclusion.IMAGE_TYPE_SECONDARY),  # ImageType DERIVED, SECONDARY
        ("SC_rgb.dcm", Exclusion.MODALITY_US_SC_OT),  # Secondary Capture
        ("US1_UNCR.dcm", Exclusion.MODALITY_US_SC_OT),  # ultrasound
    ],
)
def test_known_samples_are_excluded_for_their_reason(name: str, reason: Exclusion) -> None:
    # Execute
    result = deidentify_header(_sample(name), Pseudonymizer(KEY))

    # Assert
    assert result.exclusion is reason
    assert result.patient_pseudonym is None
    assert dict(result.meta) == {}
