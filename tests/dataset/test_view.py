"""The view format, its writer and its digest (rapha.dataset.view)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import stat
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rapha.dataset.pixels import PixelDType, quantize, resample
from rapha.dataset.splits import Split, assign_split
from rapha.dataset.view import (
    TEST_LABELS_FILE,
    ViewParams,
    ViewRecord,
    ViewSummary,
    ViewWriter,
    verify_view,
)
from rapha.errors import ConfigError, IntegrityError, UsageError

FINDINGS = ("effusion", "nodule")
ALLOWLIST = ("modality", "body_part", "sex", "age_band", "rows", "columns")
SPLIT_KEY = bytes(range(32))
RATIOS = (0.5, 0.25, 0.25)


def _params(**changes: Any) -> ViewParams:
    fields: dict[str, Any] = {
        "size": (32, 24),
        "dtype": PixelDType.UINT8,
        "findings": FINDINGS,
        "job_salt_id": "job-0001",
        "ratios": RATIOS,
        "allowlist": ALLOWLIST,
        "options": ("rtnDevIdOpt", "rtnPatCharsOpt"),
    }
    fields.update(changes)
    return ViewParams(**fields)


def _records(count: int = 60, seed: int = 5) -> list[ViewRecord]:
    rng = np.random.default_rng(seed)
    values = [1, 0, -1, None]
    records = []
    for n in range(count):
        patient = f"MRN{n // 3:05d}"  # three images per patient
        rows, columns = (int(v) for v in rng.integers(16, 80, size=2))
        records.append(
            ViewRecord(
                record_id=hashlib.sha256(f"record {n}".encode()).hexdigest()[:32],
                split=assign_split(patient, SPLIT_KEY, RATIOS),
                pixels=rng.random((rows, columns), dtype=np.float32),
                meta={"modality": "DX", "sex": "FM"[n % 2], "rows": rows, "columns": columns},
                labels={"effusion": values[n % 4], "nodule": values[(n // 4) % 4]},
                patient_pseudonym=hashlib.sha256(patient.encode()).hexdigest(),
            )
        )
    if count >= 60:
        assert {r.split for r in records} == set(Split)
    return records


def _build(
    root: Path,
    records: Iterable[ViewRecord],
    params: ViewParams | None = None,
    *,
    name: str = "view",
) -> ViewSummary:
    with ViewWriter(root / name, root / f"{name}-private", params or _params()) as writer:
        for record in records:
            writer.add(record)
        writer.exclude("undecodable pixel data", 2)
        writer.exclude("colour image")
        return writer.finish()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _replace(record: ViewRecord, **changes: Any) -> ViewRecord:
    return dataclasses.replace(record, **changes)


# --- determinism and digest -------------------------------------------------------------


def test_same_records_in_any_order_give_byte_identical_views(tmp_path: Path) -> None:
    # Prepare
    records = _records()
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)

    # Execute
    first = _build(tmp_path, records, name="a")
    second = _build(tmp_path, shuffled, name="b")

    # Assert
    assert first.digest == second.digest
    assert _files(first.out) == _files(second.out)
    assert first.test_labels.read_bytes() == second.test_labels.read_bytes()


def test_verify_view_recomputes_the_recorded_digest(tmp_path: Path) -> None:
    # Prepare
    summary = _build(tmp_path, _records())

    # Execute
    plain = verify_view(summary.out)
    with_labels = verify_view(summary.out, summary.test_labels.parent)

    # Assert
    assert plain == with_labels == summary.digest
    assert json.loads((summary.out / "view.json").read_text())["digest"] == summary.digest


def _pixel_change(records: list[ViewRecord]) -> list[ViewRecord]:
    first = records[0]
    image = resample(first.pixels, (32, 24))
    image[5, 5] = 1.0 - image[5, 5] if image[5, 5] < 0.4 or image[5, 5] > 0.6 else 0.0
    return [_replace(first, pixels=image), *records[1:]]


def _label_change(split: Split) -> Callable[[list[ViewRecord]], list[ViewRecord]]:
    def change(records: list[ViewRecord]) -> list[ViewRecord]:
        index = next(i for i, r in enumerate(records) if r.split is split)
        record = records[index]
        flipped = 0 if record.labels["effusion"] == 1 else 1
        labels = {**record.labels, "effusion": flipped}
        return [*records[:index], _replace(record, labels=labels), *records[index + 1 :]]

    return change


def _meta_change(records: list[ViewRecord]) -> list[ViewRecord]:
    return [_replace(records[0], meta={**records[0].meta, "modality": "CR"}), *records[1:]]


@pytest.mark.parametrize(
    "change",
    [_pixel_change, _label_change(Split.TRAIN), _label_change(Split.TEST), _meta_change],
    ids=["one-pixel", "one-train-label", "one-test-label", "one-meta-value"],
)
def test_a_changed_record_changes_the_digest(
    tmp_path: Path, change: Callable[[list[ViewRecord]], list[ViewRecord]]
) -> None:
    # Prepare
    records = _records()
    reference = _build(tmp_path, records, name="reference")

    # Execute
    changed = _build(tmp_path, change(records), name="changed")

    # Assert
    assert changed.digest != reference.digest
    assert verify_view(changed.out) == changed.digest


@pytest.mark.parametrize(
    "changes",
    [
        {"size": (32, 25)},
        {"dtype": PixelDType.UINT16},
        {"findings": ("nodule", "effusion")},
        {"job_salt_id": "job-0002"},
        {"ratios": (0.6, 0.25, 0.15)},
        {"allowlist": (*ALLOWLIST, "manufacturer")},
        {"options": ("rtnPatCharsOpt",)},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_changed_parameter_changes_the_digest(tmp_path: Path, changes: dict[str, Any]) -> None:
    # Prepare
    records = _records(count=24)
    reference = _build(tmp_path, records, name="reference")

    # Execute
    changed = _build(tmp_path, records, _params(**changes), name="changed")

    # Assert
    assert changed.digest != reference.digest


# --- the files ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(PixelDType))
def test_images_memory_map_row_for_row_with_their_records(
    tmp_path: Path, dtype: PixelDType
) -> None:
    # Prepare
    records = _records()
    by_id = {r.record_id: r for r in records}

    # Execute
    summary = _build(tmp_path, records, _params(dtype=dtype))

    # Assert
    for split in Split:
        images = np.load(summary.out / split.value / "images.npy", mmap_mode="r")
        lines = (summary.out / split.value / "records.jsonl").read_text().splitlines()
        assert isinstance(images, np.memmap)
        assert images.shape == (summary.counts[split.value], 32, 24)
        assert images.dtype == dtype.numpy
        assert len(lines) == images.shape[0]
        ids = [json.loads(line)["record_id"] for line in lines]
        assert ids == sorted(ids)
        for row, record_id in enumerate(ids):
            expected = quantize(resample(by_id[record_id].pixels, (32, 24)), dtype)
            np.testing.assert_array_equal(images[row], expected)


def test_records_carry_meta_and_train_val_labels_only(tmp_path: Path) -> None:
    # Prepare
    records = _records()
    by_id = {r.record_id: r for r in records}

    # Execute
    summary = _build(tmp_path, records)

    # Assert
    for split in Split:
        for line in (summary.out / split.value / "records.jsonl").read_text().splitlines():
            entry = json.loads(line)
            source = by_id[entry["record_id"]]
            assert entry["meta"] == dict(source.meta)
            if split is Split.TEST:
                assert "labels" not in entry
                assert len(entry["labels_commitment"]) == 64
            else:
                assert entry["labels"] == dict(source.labels)


def test_test_labels_are_held_outside_the_view(tmp_path: Path) -> None:
    # Prepare
    records = _records()
    test_ids = {r.record_id for r in records if r.split is Split.TEST}

    # Execute
    summary = _build(tmp_path, records)

    # Assert
    assert not summary.test_labels.is_relative_to(summary.out)
    assert stat.S_IMODE(summary.test_labels.stat().st_mode) == 0o600
    assert not [p for p in summary.out.rglob("*") if p.name == TEST_LABELS_FILE]
    held = json.loads(summary.test_labels.read_text())
    assert set(held["records"]) == test_ids
    assert held["view_digest"] == summary.digest
    view_bytes = b"".join(_files(summary.out).values())
    assert b'"labels":{' not in (summary.out / "test" / "records.jsonl").read_bytes()
    assert b"patient" not in view_bytes.lower()
    assert all(r.patient_pseudonym.encode() not in view_bytes for r in records)


def test_view_json_describes_the_build(tmp_path: Path) -> None:
    # Prepare
    params = _params()

    # Execute
    summary = _build(tmp_path, _records(), params)

    # Assert
    document = json.loads((summary.out / "view.json").read_text())
    assert document["schema_version"] == 1
    assert document["counts"] == dict(summary.counts)
    assert sum(document["counts"].values()) == 60 == summary.records
    assert document["exclusions"] == {"colour image": 1, "undecodable pixel data": 2}
    assert document["label_names"] == list(FINDINGS)
    assert document["allowlist"] == list(ALLOWLIST)
    assert document["options"] == ["rtnDevIdOpt", "rtnPatCharsOpt"]
    assert document["params"] == params.to_json()
    assert document["pixels"]["scale"] == 255


def test_a_view_without_records_is_still_a_valid_view(tmp_path: Path) -> None:
    # Execute
    summary = _build(tmp_path, [])

    # Assert
    assert summary.counts == {"train": 0, "val": 0, "test": 0}
    assert np.load(summary.out / "train" / "images.npy", mmap_mode="r").shape == (0, 32, 24)
    assert verify_view(summary.out, summary.test_labels.parent) == summary.digest


def test_the_writer_streams_pixels_to_disk(tmp_path: Path) -> None:
    # Prepare: 120 images of 256 x 256 float32 are 31 MB; the view stores 224 x 224 uint16.
    rng = np.random.default_rng(0)
    params = _params(size=(224, 224), dtype=PixelDType.UINT16)
    image = rng.random((256, 256), dtype=np.float32)

    # Execute
    tracemalloc.start()
    try:
        with ViewWriter(tmp_path / "view", tmp_path / "private", params) as writer:
            for n in range(120):
                writer.add(
                    ViewRecord(
                        record_id=f"r{n:04d}",
                        split=Split.TRAIN,
                        pixels=image,
                        meta={},
                        labels={},
                        patient_pseudonym=f"p{n}",
                    )
                )
            writer.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: the pixels written (12 MB) never sit in memory together.
    assert peak < 6 * 1024 * 1024


# --- verification -------------------------------------------------------------------------


def _flip_image_byte(out: Path) -> None:
    path = out / "train" / "images.npy"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_meta(out: Path) -> None:
    path = out / "val" / "records.jsonl"
    path.write_text(path.read_text().replace('"modality":"DX"', '"modality":"CR"', 1))


def _swap_lines(out: Path) -> None:
    path = out / "train" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[1], lines[0], *lines[2:]]))


def _edit_params(out: Path) -> None:
    path = out / "view.json"
    path.write_text(path.read_text().replace('"job_salt_id":"job-0001"', '"job_salt_id":"job-9"'))


def _reformat_view_json(out: Path) -> None:
    path = out / "view.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=1))


def _edit_counts(out: Path) -> None:
    path = out / "view.json"
    document = json.loads(path.read_text())
    document["label_names"] = ["effusion"]
    path.write_bytes(json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n")


def _add_file(out: Path) -> None:
    (out / "train" / "notes.txt").write_text("hello")


def _remove_file(out: Path) -> None:
    (out / "test" / "records.jsonl").unlink()


def _truncate_images(out: Path) -> None:
    path = out / "val" / "images.npy"
    path.write_bytes(path.read_bytes()[:-1])


@pytest.mark.parametrize(
    "tamper",
    [
        _flip_image_byte,
        _edit_meta,
        _swap_lines,
        _edit_params,
        _reformat_view_json,
        _edit_counts,
        _add_file,
        _remove_file,
        _truncate_images,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_any_change_to_the_view_is_detected(tmp_path: Path, tamper: Callable[[Path], None]) -> None:
    # Prepare
    summary = _build(tmp_path, _records())

    # Execute
    tamper(summary.out)

    # Assert
    with pytest.raises(IntegrityError):
        verify_view(summary.out)


def test_changed_test_labels_are_detected_with_the_private_directory(tmp_path: Path) -> None:
    # Prepare
    summary = _build(tmp_path, _records())
    held = json.loads(summary.test_labels.read_text())
    record_id = next(iter(held["records"]))
    entry = held["records"][record_id]["labels"]
    entry["effusion"] = 1 if entry["effusion"] != 1 else 0
    summary.test_labels.write_bytes(
        json.dumps(held, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    )

    # Execute / Assert
    assert verify_view(summary.out) == summary.digest  # the view itself is intact
    with pytest.raises(IntegrityError):
        verify_view(summary.out, summary.test_labels.parent)


# --- refusals -------------------------------------------------------------------------------


def test_an_existing_view_is_replaced_only_when_allowed(tmp_path: Path) -> None:
    # Prepare
    first = _build(tmp_path, _records(count=12))

    # Execute / Assert
    with pytest.raises(UsageError, match="not empty"):
        ViewWriter(first.out, tmp_path / "other-private", _params())
    with ViewWriter(first.out, first.test_labels.parent, _params(), overwrite=True) as writer:
        second = writer.finish()
    assert second.counts == {"train": 0, "val": 0, "test": 0}
    assert verify_view(second.out) == second.digest
    assert not list(tmp_path.glob("*.tmp"))
    assert not list(tmp_path.glob("*.old"))


def test_a_failed_build_leaves_no_view(tmp_path: Path) -> None:
    # Prepare
    records = _records(count=12)

    def build() -> None:
        with ViewWriter(tmp_path / "view", tmp_path / "p", _params()) as writer:
            writer.add(records[0])
            raise RuntimeError("source failed")

    # Execute
    with pytest.raises(RuntimeError):
        build()

    # Assert
    assert list(tmp_path.iterdir()) == []


def test_private_directory_inside_the_view_is_refused(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(UsageError, match="must not be inside"):
        ViewWriter(tmp_path / "view", tmp_path / "view" / "private", _params())


def _two_splits(record: ViewRecord) -> list[ViewRecord]:
    other = Split.TEST if record.split is not Split.TEST else Split.TRAIN
    return [record, _replace(record, record_id="f" * 32, split=other)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_two_splits, "patient already in"),
        (lambda r: [r, r], "added twice"),
        (lambda r: [_replace(r, meta={"PatientName": "x"})], "allowlist"),
        (lambda r: [_replace(r, labels={"effusion": 2})], "must be 1, 0, -1 or None"),
        (lambda r: [_replace(r, labels={"fracture": 1})], "findings"),
        (lambda r: [_replace(r, pixels=r.pixels * 3)], r"\[0, 1\]"),
        (lambda r: [_replace(r, pixels=np.full((4, 4), np.nan))], "finite"),
        (lambda r: [_replace(r, record_id="a b")], "record id"),
    ],
    ids=["two-splits", "duplicate", "meta", "label-value", "label-name", "range", "nan", "id"],
)
def test_records_the_node_should_never_produce_are_refused(
    tmp_path: Path, make: Callable[[ViewRecord], list[ViewRecord]], message: str
) -> None:
    # Prepare
    *accepted, refused = make(_records(count=3)[0])
    writer = ViewWriter(tmp_path / "view", tmp_path / "p", _params())
    for record in accepted:
        writer.add(record)

    # Execute / Assert
    with writer, pytest.raises(UsageError, match=message):
        writer.add(refused)


@pytest.mark.parametrize("reason", ["", "Name: DOE^JANE\n", "é" * 3, "x" * 101])
def test_exclusion_reasons_must_be_fixed_phrases(tmp_path: Path, reason: str) -> None:
    # Prepare
    writer = ViewWriter(tmp_path / "view", tmp_path / "p", _params())

    # Execute / Assert
    with writer, pytest.raises(UsageError):
        writer.exclude(reason)


@pytest.mark.parametrize(
    "changes",
    [
        {"size": (0, 10)},
        {"dtype": "int8"},
        {"findings": ("a", "a")},
        {"job_salt_id": "salt with spaces"},
        {"ratios": (0.5, 0.5, 0.5)},
    ],
    ids=["size", "dtype", "findings", "job", "ratios"],
)
def test_invalid_parameters_are_refused(changes: dict[str, Any]) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError):
        _params(**changes)


def test_view_build_throughput_on_a_thousand_small_images(tmp_path: Path) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    images = [rng.random((64, 64), dtype=np.float32) for _ in range(1000)]
    params = _params(size=(64, 64))

    # Execute
    started = os.times()
    with ViewWriter(tmp_path / "view", tmp_path / "p", params) as writer:
        for n, image in enumerate(images):
            patient = f"MRN{n}"
            writer.add(
                ViewRecord(
                    record_id=f"{n:08x}",
                    split=assign_split(patient, SPLIT_KEY),
                    pixels=image,
                    meta={"modality": "DX"},
                    labels={"effusion": 1},
                    patient_pseudonym=patient,
                )
            )
        summary = writer.finish()
    elapsed = os.times().user - started.user

    # Assert: a generous bound; measured about 12k images/s on one core.
    assert summary.records == 1000
    assert elapsed < 10.0
