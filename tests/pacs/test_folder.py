"""The folder source's own duties: header-only incremental indexing, a read-only mount, and
files it cannot read (the behaviour both sources share is in test_sources.py)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from rapha.errors import DataError
from rapha.pacs import FolderSource
from rapha.pacs.source import NO_INSTANCE_UIDS, UNREADABLE

from .conftest import SAMPLE_SCOPE, read, sample_file


@pytest.fixture
def mount(tmp_path: Path, sample_archive: Path) -> Path:
    root = tmp_path / "mount"
    shutil.copytree(sample_archive, root)
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_rescan_reads_only_new_and_changed_files(mount: Path) -> None:
    files = sum(1 for p in mount.rglob("*") if p.is_file())
    source = FolderSource(mount)
    first = source.scan()
    changed = mount / "77654033/CR1/6154"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    shutil.copyfile(sample_file("MR_small.dcm"), mount / "new.dcm")

    second = source.scan()
    third = source.scan()

    assert (first.files, first.read, first.removed) == (files, files, 0)
    assert (second.files, second.read, second.removed) == (files + 1, 2, 0)
    assert (third.read, third.removed) == (0, 0)


def test_removed_files_drop_out_of_the_index(mount: Path) -> None:
    source = FolderSource(mount)
    gone = read(mount / "bad_sequence.dcm", header_only=True).StudyInstanceUID
    assert gone in source.studies(SAMPLE_SCOPE)
    (mount / "bad_sequence.dcm").unlink()

    report = source.scan()

    assert report.removed == 1
    assert gone not in source.studies(SAMPLE_SCOPE)


def test_cache_makes_a_restart_incremental_and_is_private(mount: Path, tmp_path: Path) -> None:
    cache = tmp_path / "state" / "folder-index.json"
    FolderSource(mount, cache=cache).scan()

    restarted = FolderSource(mount, cache=cache)
    report = restarted.scan()

    assert report.read == 0
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert restarted.studies(SAMPLE_SCOPE) == FolderSource(mount).studies(SAMPLE_SCOPE)


def test_a_damaged_cache_costs_only_a_full_read(mount: Path, tmp_path: Path) -> None:
    cache = tmp_path / "index.json"
    cache.write_text("{not json")

    report = FolderSource(mount, cache=cache).scan()

    assert report.read == report.files


def test_the_cache_may_not_live_in_the_mount(mount: Path) -> None:
    with pytest.raises(DataError, match="inside the mount"):
        FolderSource(mount, cache=mount / "index.json")


def test_a_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        FolderSource(tmp_path / "nowhere")


def test_the_mount_is_never_written(mount: Path, tmp_path: Path) -> None:
    before = _snapshot(mount)
    source = FolderSource(mount, cache=tmp_path / "index.json")

    for uid in source.studies(SAMPLE_SCOPE):
        list(source.instances(SAMPLE_SCOPE, uid))

    assert _snapshot(mount) == before


def test_files_it_cannot_read_are_reported_never_raised(mount: Path) -> None:
    (mount / "README.txt").write_text("not DICOM")
    (mount / "empty.dcm").write_bytes(b"")
    (mount / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 2)
    shutil.copyfile(sample_file("no_meta_group_length.dcm"), mount / "no-uids.dcm")
    shutil.copyfile(sample_file("DICOMDIR"), mount / "DICOMDIR")
    source = FolderSource(mount)

    source.studies(SAMPLE_SCOPE)
    problems = source.unreadable()

    assert len(problems) == 4  # the DICOMDIR is an index, not an unreadable instance
    assert {p.error for p in problems} <= {UNREADABLE, NO_INSTANCE_UIDS}
    assert all(p.ref is None and p.dataset is None for p in problems)
    assert source.scan().unreadable == 4


def test_a_file_cut_off_in_its_pixel_data_is_indexed_then_yielded_as_unreadable(
    mount: Path,
) -> None:
    whole = (mount / "77654033/CT2/17106").read_bytes()
    (mount / "77654033/CT2/17106").write_bytes(whole[: len(whole) - 500])
    study = read(mount / "77654033/CT2/17136", header_only=True).StudyInstanceUID
    source = FolderSource(mount)

    items = list(source.instances(SAMPLE_SCOPE, study))

    assert [i.error for i in items] == [UNREADABLE, None, None, None]
    assert items[0].ref is None
    assert items[0].dataset is None
