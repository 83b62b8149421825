"""One suite, two sources: the folder source and DICOMweb on a real Orthanc (STYLE rule 5).

Every test of :class:`TestSource` runs against both implementations over the same archive;
the comparison tests at the end show they yield the same instances in the same order with
equal datasets, on pydicom's sample files and on a synthetic hospital archive.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from rapha.errors import ScopeError
from rapha.pacs import DicomWebSource, FolderSource, InstanceRef, Scope, Source, SourceItem

from .conftest import SAMPLE_SCOPE, SYNTHETIC_SCOPE, Pacs, read

SourceFactory = Callable[[Path], Source]


@pytest.fixture(params=["folder", "dicomweb"])
def make_source(request: pytest.FixtureRequest) -> Iterator[SourceFactory]:
    """Build a source over an archive folder: directly, or via Orthanc holding its files."""
    opened: list[DicomWebSource] = []

    def folder(root: Path) -> Source:
        return FolderSource(root)

    def dicomweb(root: Path) -> Source:
        pacs: Pacs = request.getfixturevalue("pacs")
        pacs.load(root)
        source = DicomWebSource(pacs.server.dicomweb_url, page_size=3)
        opened.append(source)
        return source

    yield folder if request.param == "folder" else dicomweb
    for source in opened:
        source.close()


def _oracle(root: Path, scope: Scope) -> dict[str, list[InstanceRef]]:
    """What is in scope, worked out from the files with pydicom alone (first file by path
    wins for a repeated SOPInstanceUID)."""
    seen: set[str] = set()
    found: dict[str, list[InstanceRef]] = {}
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if not path.is_file():
            continue
        ds = read(path, header_only=True)
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        date = datetime.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        if (
            ds.get("Modality") in scope.modalities
            and ds.get("BodyPartExamined") in scope.body_parts
            and scope.date_from <= date <= scope.date_to
        ):
            ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            found.setdefault(ref.study_uid, []).append(ref)
    return {uid: sorted(refs) for uid, refs in found.items()}


def _collect(source: Source, scope: Scope) -> dict[str, list[SourceItem]]:
    return {uid: list(source.instances(scope, uid)) for uid in source.studies(scope)}


def _refs(items: dict[str, list[SourceItem]]) -> dict[str, list[InstanceRef]]:
    return {
        uid: [i.ref for i in found if i.ref is not None]
        for uid, found in items.items()
        if any(i.ref is not None for i in found)
    }


class TestSource:
    def test_implements_the_protocol(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        source = make_source(sample_archive)

        assert isinstance(source, Source)

    def test_yields_exactly_the_instances_in_scope_in_uid_order(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        source = make_source(sample_archive)

        items = _collect(source, SAMPLE_SCOPE)

        assert _refs(items) == _oracle(sample_archive, SAMPLE_SCOPE)
        assert list(items) == sorted(items)
        assert all(i.error is None and i.dataset is not None for f in items.values() for i in f)

    def test_datasets_are_whole_instances_with_pixels(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        source = make_source(sample_archive)

        items = _collect(source, SAMPLE_SCOPE)

        for found in items.values():
            for item in found:
                assert item.dataset is not None
                assert item.ref is not None
                assert "PixelData" in item.dataset
                assert item.dataset.SOPInstanceUID == item.ref.sop_uid

    def test_a_repeated_instance_is_yielded_once_from_the_first_file(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        first = read(sample_archive / "emri_small.dcm")
        scope = dataclasses.replace(SAMPLE_SCOPE, modalities=frozenset({"MR"}))
        source = make_source(sample_archive)

        items = [i for f in _collect(source, scope).values() for i in f]

        mine = [i for i in items if i.ref and i.ref.sop_uid == first.SOPInstanceUID]
        assert len(mine) == 1
        assert mine[0].dataset is not None
        assert mine[0].dataset.file_meta.TransferSyntaxUID == first.file_meta.TransferSyntaxUID

    @pytest.mark.parametrize(
        ("change", "expected_modalities", "expected_parts"),
        [
            ({"modalities": frozenset({"CR"})}, {"CR"}, {"CSPINE"}),
            ({"body_parts": frozenset({"HEAD"})}, {"CT", "MR"}, {"HEAD"}),
            (
                {"date_from": datetime.date(1999, 1, 1), "date_to": datetime.date(2001, 12, 31)},
                {"CR", "MR"},
                {"CSPINE", "HEAD"},
            ),
        ],
        ids=["modality", "body-part", "date-window"],
    )
    def test_each_scope_rule_narrows_the_instances(
        self,
        make_source: SourceFactory,
        sample_archive: Path,
        change: dict[str, object],
        expected_modalities: set[str],
        expected_parts: set[str],
    ) -> None:
        scope = dataclasses.replace(SAMPLE_SCOPE, **change)  # type: ignore[arg-type]
        source = make_source(sample_archive)

        items = [i for f in _collect(source, scope).values() for i in f]

        datasets: list[Dataset] = [i.dataset for i in items if i.dataset is not None]
        assert {ds.Modality for ds in datasets} == expected_modalities
        assert {ds.BodyPartExamined for ds in datasets} == expected_parts
        assert _refs(_collect(source, scope)) == _oracle(sample_archive, scope)

    def test_a_study_with_no_body_part_yields_nothing(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        no_part = read(sample_archive / "CT_small.dcm", header_only=True)
        source = make_source(sample_archive)

        studies = source.studies(SAMPLE_SCOPE)

        assert no_part.StudyInstanceUID in studies  # the study matches at study level
        assert list(source.instances(SAMPLE_SCOPE, no_part.StudyInstanceUID)) == []

    def test_allow_list_of_studies_keeps_only_those(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        wanted = read(sample_archive / "bad_sequence.dcm", header_only=True)
        scope = dataclasses.replace(SAMPLE_SCOPE, study_uids=frozenset({wanted.StudyInstanceUID}))
        source = make_source(sample_archive)

        studies = source.studies(scope)

        assert studies == [wanted.StudyInstanceUID]

    def test_allow_list_of_accessions_keeps_only_those(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        wanted = read(sample_archive / "examples_overlay.dcm", header_only=True)
        scope = dataclasses.replace(
            SAMPLE_SCOPE, accessions=frozenset({str(wanted.AccessionNumber)})
        )
        source = make_source(sample_archive)

        items = _collect(source, scope)

        assert list(items) == [wanted.StudyInstanceUID]
        assert [i.ref.sop_uid for i in items[wanted.StudyInstanceUID] if i.ref] == [
            wanted.SOPInstanceUID
        ]

    def test_more_studies_than_the_cap_is_refused(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        scope = dataclasses.replace(SAMPLE_SCOPE, max_studies=2)
        source = make_source(sample_archive)

        with pytest.raises(ScopeError, match="max_studies"):
            source.studies(scope)

    def test_a_study_outside_the_scope_is_refused(
        self, make_source: SourceFactory, sample_archive: Path
    ) -> None:
        outside = read(sample_archive / "JPEG2000.dcm", header_only=True)
        scope = dataclasses.replace(SAMPLE_SCOPE, modalities=frozenset({"CT"}))
        source = make_source(sample_archive)

        assert outside.StudyInstanceUID not in source.studies(scope)
        with pytest.raises(ScopeError, match="not among"):
            list(source.instances(scope, outside.StudyInstanceUID))

    def test_synthetic_archive_studies_are_all_found(
        self, make_source: SourceFactory, synthetic_archive: Path
    ) -> None:
        source = make_source(synthetic_archive)

        items = _collect(source, SYNTHETIC_SCOPE)

        readable = _refs(items)
        oracle = _oracle_readable(synthetic_archive, SYNTHETIC_SCOPE)
        assert readable == oracle


def _oracle_readable(root: Path, scope: Scope) -> dict[str, list[InstanceRef]]:
    """The oracle over the files that pydicom can read whole (damaged ones are skipped)."""
    good = root.parent / "readable"
    if not good.exists():
        for path in sorted(root.rglob("*.dcm")):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pydicom.dcmread(path).pixel_array  # noqa: B018
            except Exception:
                continue
            target = good / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return _oracle(good, scope)


def _elements(ds: Dataset) -> list[tuple[str, str, object]]:
    return [(str(e.tag), str(e.VR), e.value) for e in ds]


@pytest.mark.parametrize("archive", ["sample_archive", "synthetic_archive"])
def test_folder_and_dicomweb_yield_identical_instances(
    archive: str, request: pytest.FixtureRequest, pacs: Pacs
) -> None:
    root: Path = request.getfixturevalue(archive)
    if archive == "sample_archive":
        scope, repeated, damaged = SAMPLE_SCOPE, 1, 0  # emri_small_RLE.dcm repeats an instance
    else:
        truth = json.loads((root.parent / "truth.json").read_text())
        scope, repeated, damaged = SYNTHETIC_SCOPE, 0, len(truth["corrupt_files"])
    files = sum(1 for p in root.rglob("*") if p.is_file())
    stored = pacs.load(root)
    folder = FolderSource(root)
    web = DicomWebSource(pacs.server.dicomweb_url)

    from_folder = _collect(folder, scope)
    from_web = _collect(web, scope)

    assert list(from_folder) == list(from_web)
    readable_folder = [i for f in from_folder.values() for i in f if i.dataset is not None]
    readable_web = [i for f in from_web.values() for i in f if i.dataset is not None]
    assert [i.ref for i in readable_folder] == [i.ref for i in readable_web]
    for a, b in zip(readable_folder, readable_web, strict=True):
        assert a.dataset is not None
        assert b.dataset is not None
        assert _elements(a.dataset) == _elements(b.dataset)
        assert a.dataset.file_meta.TransferSyntaxUID == b.dataset.file_meta.TransferSyntaxUID
    # The only difference: damaged files, which Orthanc refused at upload and the folder
    # source reports as unreadable.
    reported = len(folder.unreadable()) + sum(
        1 for f in from_folder.values() for i in f if i.error is not None
    )
    assert reported == damaged
    assert stored == files - repeated - damaged
    assert all(i.error is None for f in from_web.values() for i in f)
    web.close()
