"""Fixtures for the PACS sources: sample archives and one real Orthanc per test session."""

from __future__ import annotations

import copy
import datetime
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from rapha.demo.archive import generate_archive
from rapha.pacs import Scope
from support.orthanc import OrthancServer, orthanc_or_skip, upload_folder

# Well-formed pydicom test files with distinct instances (several share UIDs across
# unrelated files, so they are picked by hand). emri_small_RLE.dcm is the same instance as
# emri_small.dcm in another transfer syntax: both sources must keep the first by path.
_SAMPLE_FILES = (
    "77654033/CR1/6154",  # CR CSPINE: one study in three series
    "77654033/CR2/6247",
    "77654033/CR3/6278",
    "77654033/CT2/17106",  # CT HEAD: four instances of one series
    "77654033/CT2/17136",
    "77654033/CT2/17166",
    "77654033/CT2/17196",
    "emri_small.dcm",  # MR HEAD
    "emri_small_RLE.dcm",  # the same SOP instance again, RLE Lossless
    "JPEG2000.dcm",  # NM WHOLE BODY, JPEG 2000
    "CT_small.dcm",  # CT without BodyPartExamined: never in scope
    "bad_sequence.dcm",  # CT NECK, JPEG Lossless
    "explicit_VR-UN.dcm",  # CT PANCREAS
    "J2K_pixelrep_mismatch.dcm",  # CT HEAD
    "examples_overlay.dcm",  # MR ABDOMEN, with an accession number
)

#: A scope that covers every instance of the sample archive that has a body part.
SAMPLE_SCOPE = Scope(
    modalities=frozenset({"CR", "CT", "MR", "NM"}),
    body_parts=frozenset({"CSPINE", "HEAD", "NECK", "PANCREAS", "WHOLE BODY", "ABDOMEN"}),
    date_from=datetime.date(1990, 1, 1),
    date_to=datetime.date(2030, 12, 31),
    max_studies=50,
)

SYNTHETIC_STUDIES = 12
SYNTHETIC_SCOPE = Scope(
    modalities=frozenset({"CR", "DX", "CT", "MR", "US", "OT"}),
    body_parts=frozenset({"CHEST", "ABDOMEN", "HEAD", "KNEE", "LSPINE"}),
    date_from=datetime.date(1990, 1, 1),
    date_to=datetime.date(2030, 12, 31),
    max_studies=50,
)


PAGING_SCOPE = Scope(
    modalities=frozenset({"CR"}),
    body_parts=frozenset({"CSPINE"}),
    date_from=datetime.date(2020, 1, 1),
    date_to=datetime.date(2020, 12, 31),
    max_studies=50,
)
#: Studies of the paging archive: 7 CR CSPINE studies in 2020 (the first with 5 instances)
#: and one DX study the scope does not allow.
PAGING_CR_STUDIES = 7
PAGING_FIRST_STUDY_INSTANCES = 5


def read(path: Path, *, header_only: bool = False) -> Dataset:
    """pydicom alone, every value converted with its warnings silenced (sample files hold
    values pydicom warns about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=header_only)
        ds.walk(lambda _ds, _elem: None)
    return ds


def sample_file(name: str) -> Path:
    """A pydicom or pydicom-data test file by name (or path under pydicom's test files)."""
    found = get_testdata_file(name)
    assert found is not None, f"pydicom test file {name} is missing"
    return Path(found)


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real pydicom / pydicom-data sample files (all readable)."""
    root = tmp_path_factory.mktemp("sample-archive")
    for name in _SAMPLE_FILES:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_file(name), target)
    return root


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DICOM folder of a small synthetic hospital archive (one damaged file)."""
    out = tmp_path_factory.mktemp("synthetic") / "archive"
    generate_archive(out, studies=SYNTHETIC_STUDIES, seed=3, size_range=(64, 64))
    return out / "dicom"


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["rapha-tests-paging", *map(str, parts)]))


@pytest.fixture(scope="session")
def paging_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small made-up studies from one sample CR file, with canary identifiers that tests
    look for in logs: see :data:`PAGING_SCOPE`."""
    root = tmp_path_factory.mktemp("paging-archive")
    template = read(sample_file("77654033/CR1/6154"))
    for study in range(PAGING_CR_STUDIES + 1):
        count = PAGING_FIRST_STUDY_INSTANCES if study == 0 else 1
        for number in range(count):
            ds = copy.deepcopy(template)
            ds.StudyInstanceUID = _uid(study)
            ds.SeriesInstanceUID = _uid(study, "series")
            ds.SOPInstanceUID = _uid(study, "instance", number)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number + 1
            ds.Modality = "DX" if study == PAGING_CR_STUDIES else "CR"
            ds.StudyDate = f"2020{study + 1:02d}15"
            ds.PatientName = f"CANARY^PATIENT{study}"
            ds.PatientID = f"MRN-CANARY-{study:04d}"
            ds.AccessionNumber = f"ACC-CANARY-{study:02d}"
            ds.save_as(root / f"study{study}-{number}.dcm", enforce_file_format=True)
    return root


class Pacs:
    """The session's Orthanc and which archive it holds (reloaded only when it changes)."""

    def __init__(self, server: OrthancServer) -> None:
        self.server = server
        self._loaded: Path | None = None
        self.stored = 0

    def load(self, root: Path) -> int:
        """Make Orthanc hold exactly the files of ``root``; return how many it stored."""
        if self._loaded != root:
            self.server.clear()
            self.stored = upload_folder(self.server, root)
            self._loaded = root
        return self.stored


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One real Orthanc with the DICOMweb plugin on loopback for the whole session."""
    with orthanc_or_skip(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="session")
def pacs(orthanc: OrthancServer) -> Pacs:
    return Pacs(orthanc)
