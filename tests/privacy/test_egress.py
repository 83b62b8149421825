"""The egress scan finds planted identifiers in every encoding and container, and only them."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rapha.errors import DataError, UsageError
from rapha.privacy import Leak, find_leaks

from ._support import Archive

NEEDLES = [
    "DOE^JANE",  # 0: a DICOM person name
    "MRN00012345",  # 1: an MRN
    "1.2.826.0.1.3680043.8.498.123456789",  # 2: a UID
    "20240131",  # 3: a date
    "Müller^Jürgen",  # 4: a name outside ASCII
]


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _clean_view(root: Path) -> None:
    """Files shaped like a view: arrays, JSON lines, compressed copies. No needle."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    np.save(root / "train" / "images.npy", rng.integers(0, 4096, (20, 64, 64), np.uint16))
    (root / "train" / "records.jsonl").write_text(
        "".join(f'{{"record_id": "{i:032x}", "meta": {{"modality": "CR"}}}}\n' for i in range(50))
    )
    np.savez_compressed(root / "arrays.npz", a=rng.random((32, 32)), names=np.array(["CR", "DX"]))
    (root / "view.json").write_text('{"schema": 1, "counts": {"train": 20}}')
    (root / "log.gz").write_bytes(gzip.compress(b"built 20 records\n"))


def _found(leaks: list[Leak]) -> set[tuple[str, int, str, tuple[str, ...]]]:
    return {(leak.path.name, leak.needle_index, leak.encoding, leak.member) for leak in leaks}


def test_a_clean_directory_has_no_leaks(tmp_path: Path) -> None:
    _clean_view(tmp_path)

    assert find_leaks(tmp_path, NEEDLES) == []


@pytest.mark.parametrize(
    ("data", "index", "encoding"),
    [
        (b"xx MRN00012345 yy", 1, "utf-8"),
        (b"xx mrn00012345 yy", 1, "utf-8"),
        (b'{"id": "Mrn00012345"}', 1, "utf-8"),
        ("MRN00012345".encode("utf-16-le"), 1, "utf-16-le"),
        ("mrn00012345".encode("utf-16-be"), 1, "utf-16-be"),
        ("\ufeffMRN00012345".encode("utf-16"), 1, "utf-16-le"),
        (b"name=DOE^JANE;", 0, "utf-8"),
        (b"name=doe jane;", 0, "utf-8+pn"),
        (b"name=Jane Doe;", 0, "utf-8+pn"),
        (b"name=DOE, JANE;", 0, "utf-8+pn"),
        ("DOE JANE".encode("utf-16-le"), 0, "utf-16-le+pn"),
        ("Müller^Jürgen".encode("latin-1"), 4, "latin-1"),
        ("MÜLLER^JÜRGEN".encode(), 4, "utf-8"),
        (b"uid 1.2.826.0.1.3680043.8.498.123456789\x00", 2, "utf-8"),
        (b"on 2024-01-31", 3, "utf-8+date"),
    ],
)
def test_a_planted_value_is_found_in_raw_bytes(
    tmp_path: Path, data: bytes, index: int, encoding: str
) -> None:
    _clean_view(tmp_path)
    (tmp_path / "train" / "extra.bin").write_bytes(os.urandom(1000) + data + os.urandom(1000))

    leaks = find_leaks(tmp_path, NEEDLES)

    assert ("extra.bin", index, encoding, ()) in _found(leaks)
    assert {leak.path.name for leak in leaks} == {"extra.bin"}


def test_a_value_split_across_read_chunks_is_found(tmp_path: Path) -> None:
    data = bytearray(os.urandom((8 << 20) + 100))
    at = (8 << 20) - 5  # the needle straddles the first chunk boundary
    data[at : at + 11] = b"MRN00012345"
    (tmp_path / "big.npy").write_bytes(bytes(data))

    assert ("big.npy", 1, "utf-8", ()) in _found(find_leaks(tmp_path, NEEDLES))


def test_values_are_found_inside_containers(tmp_path: Path) -> None:
    secret = b"patient MRN00012345 here"
    (tmp_path / "a.zip").write_bytes(_zip({"inner/notes.txt": secret}))
    np.savez_compressed(tmp_path / "b.npz", ids=np.array(["x", "MRN00012345"]))
    (tmp_path / "c.gz").write_bytes(gzip.compress(secret))
    (tmp_path / "d.tar").write_bytes(_tar({"x/notes.txt": gzip.compress(secret)}))
    (tmp_path / "e.tar.gz").write_bytes(gzip.compress(_tar({"notes.txt": secret})))
    (tmp_path / "f.bz2").write_bytes(bz2.compress(secret))
    (tmp_path / "g.xz").write_bytes(lzma.compress(secret))
    (tmp_path / "h.zip").write_bytes(_zip({"deeper.zip": _zip({"n.txt": secret})}))

    found = _found(find_leaks(tmp_path, NEEDLES))

    assert ("a.zip", 1, "utf-8", ("inner/notes.txt",)) in found
    assert ("b.npz", 1, "utf-32-le", ("ids.npy",)) in found
    assert ("c.gz", 1, "utf-8", ("<gzip>",)) in found
    assert ("d.tar", 1, "utf-8", ("x/notes.txt", "<gzip>")) in found
    assert ("e.tar.gz", 1, "utf-8", ("<gzip>", "notes.txt")) in found
    assert ("f.bz2", 1, "utf-8", ("<bzip2>",)) in found
    assert ("g.xz", 1, "utf-8", ("<xz>",)) in found
    assert ("h.zip", 1, "utf-8", ("deeper.zip", "n.txt")) in found


@pytest.mark.parametrize("name", ["weights.safetensors", "plot.png", "noext"])
def test_containers_are_recognised_by_magic_not_by_name(tmp_path: Path, name: str) -> None:
    (tmp_path / f"{name}.1").write_bytes(_zip({"m.txt": b"MRN00012345 " * 3}))
    (tmp_path / f"{name}.2").write_bytes(gzip.compress("DOE^JANE".encode("utf-16-le")))

    found = _found(find_leaks(tmp_path, NEEDLES))

    assert (f"{name}.1", 1, "utf-8", ("m.txt",)) in found
    assert (f"{name}.2", 0, "utf-16-le", ("<gzip>",)) in found


def test_a_zip_appended_to_other_data_is_opened(tmp_path: Path) -> None:
    (tmp_path / "image.png").write_bytes(b"\x89PNG" + os.urandom(500) + _zip({"m": b"MRN00012345"}))

    assert ("image.png", 1, "utf-8", ("m",)) in _found(find_leaks(tmp_path, NEEDLES))


def test_file_names_are_scanned(tmp_path: Path) -> None:
    (tmp_path / "MRN00012345").mkdir()
    (tmp_path / "MRN00012345" / "weights.bin").write_bytes(b"\x00" * 10)

    assert ("weights.bin", 1, "utf-8+name", ()) in _found(find_leaks(tmp_path, NEEDLES))


def test_a_leak_never_shows_the_needle(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("DOE^JANE MRN00012345")

    leaks = find_leaks(tmp_path, NEEDLES)

    assert leaks
    for leak in leaks:
        for text in (repr(leak), str(leak)):
            assert "DOE" not in text.upper()
            assert "00012345" not in text


def test_a_single_file_can_be_scanned(tmp_path: Path) -> None:
    target = tmp_path / "one.txt"
    target.write_text("20240131")

    assert find_leaks(target, NEEDLES) == [Leak(target, 3, "utf-8")]


def test_too_short_needles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="#1"):
        find_leaks(tmp_path, ["MRN00012345", "abc"])


@pytest.mark.parametrize(
    "data",
    [
        _zip({"a": b"x" * 100})[:-30] + b"PK\x05\x06",  # ZIP magic, broken directory
        b"\x1f\x8b\x08\x00" + b"\x00" * 20,  # gzip magic, truncated stream
    ],
    ids=["zip", "gzip"],
)
def test_an_unreadable_container_fails_closed(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "blob").write_bytes(data)

    with pytest.raises(DataError, match="cannot be"):
        find_leaks(tmp_path, NEEDLES)


def test_a_container_expanding_past_the_budget_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "bomb.gz").write_bytes(gzip.compress(b"\x00" * (4 << 20)))

    with pytest.raises(DataError, match="budget"):
        find_leaks(tmp_path, NEEDLES, max_expanded_bytes=1 << 20)


def test_nesting_deeper_than_the_limit_fails_closed(tmp_path: Path) -> None:
    data = b"MRN00012345"
    for _ in range(10):
        data = gzip.compress(data)
    (tmp_path / "deep.gz").write_bytes(data)

    with pytest.raises(DataError, match="nested"):
        find_leaks(tmp_path, NEEDLES)


def test_a_special_file_fails_closed(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")

    with pytest.raises(DataError, match="not a regular file"):
        find_leaks(tmp_path, NEEDLES)


def test_every_planted_value_of_the_archive_is_found_in_its_files(small_archive: Archive) -> None:
    """The archive's DICOM files are full of PHI: the scan must find every must-not-leak
    value that a readable file holds verbatim, in its raw bytes."""
    needles = small_archive.truth["must_not_leak"]
    study = small_archive.truth["studies"][0]
    path = small_archive.root / study["files"][0]["path"]
    planted = {p["value"] for p in study["phi"]} | {p["value"] for p in study["files"][0]["phi"]}
    raw = path.read_bytes()
    verbatim = {v for v in planted if v.encode("latin-1", "ignore") in raw and v in needles}

    found = {needles[leak.needle_index] for leak in find_leaks(path, needles)}

    assert len(verbatim) >= 10
    assert verbatim <= found
