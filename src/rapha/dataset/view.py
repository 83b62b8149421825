"""The view: the only hospital data model code ever reads, written once, verifiable.

Layout (DESIGN.md, "Formats: View")::

    out/view.json                 schema version, parameters, counts, exclusions, digest
    out/{train,val,test}/images.npy     N x H x W, numpy format 1.0, little endian, C order
    out/{train,val,test}/records.jsonl  one canonical JSON object per image row, same order
    private_dir/test-labels.json  the test labels: node side, never under out/

Images are the display images of :func:`rapha.dataset.pixels.to_display` resampled to the
job's size and stored as :class:`PixelDType` (value / scale gives [0, 1], 0 = black);
``np.load(path, mmap_mode="r")`` maps them without reading. Row ``i`` of ``images.npy`` is
line ``i`` of ``records.jsonl``: ``{"index", "record_id", "meta", "labels"}`` for train and
val, and ``{"index", "record_id", "meta", "labels_commitment"}`` for test.

Everything is deterministic: records are sorted by record id within a split, JSON is RFC
8785 canonical, no time or host is written. Two builds of the same records, from different
sources and in any arrival order, are byte-identical. The digest is defined in
:mod:`rapha.dataset.merkle`. Exclusion counts are reported in ``view.json`` but are not in
the digest: they describe the source (a DICOMweb PACS may have refused a corrupt file a
folder still holds), not what the model sees; the node's audit log anchors them.

The writer streams: each image is resampled, quantised, hashed and appended to a per-split
temporary file as it arrives, so memory does not grow with pixels. ``finish()`` sorts,
assembles ``images.npy`` with its header, and renames the finished directory into place.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import numpy as np
from numpy.typing import NDArray

from rapha.crypto import canonical_json, digest_bytes
from rapha.dataset.merkle import (
    LABEL_VALUES,
    NAME_PATTERN,
    SCHEMA_VERSION,
    ViewParams,
    check_test_labels,
    label_commitment,
    label_salt,
    labels_field,
    leaf_hash,
    merkle_root,
    npy_header,
    read_canonical,
    read_image_digests,
    read_record_lines,
    row_bytes,
    view_digest,
    view_document,
)
from rapha.dataset.pixels import dequantize, quantize, resample
from rapha.dataset.splits import Split
from rapha.errors import ConfigError, DataError, IntegrityError, UsageError

__all__ = [
    "IMAGES_FILE",
    "RECORDS_FILE",
    "SCHEMA_VERSION",
    "TEST_LABELS_FILE",
    "VIEW_FILE",
    "ViewParams",
    "ViewRecord",
    "ViewSummary",
    "ViewWriter",
    "verify_view",
]

VIEW_FILE: Final = "view.json"
IMAGES_FILE: Final = "images.npy"
RECORDS_FILE: Final = "records.jsonl"
TEST_LABELS_FILE: Final = "test-labels.json"

_NAME: Final = NAME_PATTERN
_REASON: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ,.;:()/_+-]{0,99}")
_LABEL_VALUES: Final = LABEL_VALUES
_TOLERANCE: Final = 1e-6


# --- parameters, records, summary --------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ViewRecord:
    """One image on its way into the view.

    ``pixels`` is a display image (float, [0, 1], any H x W; resampled by the writer), or
    a uint8/uint16 image taken at full scale (255 or 65535 is white).
    ``meta`` holds allowlisted fields only and ``labels`` findings of the view's params.
    ``patient_pseudonym`` is the patient's stable pseudonym: it is never written under
    ``out/``; the writer uses it to refuse a patient in two splits and to salt the test
    label commitments.
    """

    record_id: str
    split: Split
    pixels: NDArray[Any]
    meta: Mapping[str, Any]
    labels: Mapping[str, int | None]
    patient_pseudonym: str


@dataclass(frozen=True)
class ViewSummary:
    """What a build produced. ``patients`` (stable pseudonyms) is for the node's own records."""

    out: Path
    digest: str
    counts: Mapping[str, int]
    exclusions: Mapping[str, int]
    test_labels: Path
    patients: frozenset[str]
    params: ViewParams

    @property
    def records(self) -> int:
        """Images written, over all splits."""
        return sum(self.counts.values())


@dataclass
class _Entry:
    record_id: str
    slot: int
    pixels_digest: str
    meta: dict[str, Any]
    labels: dict[str, int | None]
    salt: str | None = None
    commitment: str | None = None


@dataclass
class _SplitBuffer:
    path: Path
    raw: IO[bytes]
    entries: list[_Entry] = field(default_factory=list)


# --- the writer ----------------------------------------------------------------------------


class ViewWriter:
    """Stream records into a new view directory; ``finish()`` makes it appear atomically.

    The view is built in ``<out>.tmp`` and renamed to ``out`` at the end, so ``out`` is
    either absent, the previous view, or complete. An existing non-empty ``out`` (or an
    existing test-label file) is refused unless ``overwrite=True``. ``private_dir`` must
    not lie inside ``out``. Use as a context manager: leaving the block without
    ``finish()`` removes the temporary directory.
    """

    def __init__(
        self, out: Path, private_dir: Path, params: ViewParams, *, overwrite: bool = False
    ) -> None:
        self.out = Path(out).resolve()
        self.private_dir = Path(private_dir).resolve()
        self.params = params
        if self.private_dir == self.out or self.out in self.private_dir.parents:
            raise UsageError("the private directory for test labels must not be inside the view")
        occupied = self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir()))
        if occupied and not overwrite:
            raise UsageError(
                f"{self.out} exists and is not empty; choose a new view directory "
                "or allow overwriting it"
            )
        if (self.private_dir / TEST_LABELS_FILE).exists() and not overwrite:
            raise UsageError(
                f"{self.private_dir / TEST_LABELS_FILE} exists; use a fresh private directory "
                "or allow overwriting it"
            )
        self._tmp = self.out.with_name(self.out.name + ".tmp")
        if self._tmp.exists():
            shutil.rmtree(self._tmp)  # left by an interrupted build
        self._splits: dict[Split, _SplitBuffer] = {}
        for split in Split:
            folder = self._tmp / split.value
            folder.mkdir(parents=True)
            raw_path = folder / ".images.raw"
            self._splits[split] = _SplitBuffer(raw_path, raw_path.open("w+b"))
        self._seen: set[str] = set()
        self._patients: dict[str, Split] = {}
        self._exclusions: dict[str, int] = {}
        self._row_bytes = row_bytes(params)
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closed:
            self.abort()

    def add(self, record: ViewRecord) -> None:
        """Resample, quantise, hash and append one record's image; keep its small metadata.

        Raises :class:`UsageError` for a record the node should never have produced: a
        repeated record id, a patient already placed in another split, metadata outside
        the allowlist, labels outside the findings or 1/0/-1/None, pixels that are not a
        finite 2-D image in [0, 1]. Messages name fields, never values.
        """
        self._check_open()
        try:
            split = Split(record.split)
        except ValueError:
            raise UsageError("a record's split must be train, val or test") from None
        if not isinstance(record.record_id, str) or not _NAME.fullmatch(record.record_id):
            raise UsageError("a record id must be 1-128 letters, digits or _.:-")
        if record.record_id in self._seen:
            raise UsageError("the same record id was added twice")
        if not record.patient_pseudonym:
            raise UsageError("a record needs its patient's stable pseudonym")
        placed = self._patients.setdefault(record.patient_pseudonym, split)
        if placed is not split:
            raise UsageError(f"a patient already in {placed.value} was given to {split.value}")
        meta = self._check_meta(record.meta)
        labels = self._check_labels(record.labels)
        stored = quantize(self._check_pixels(record.pixels), self.params.dtype)
        data = np.ascontiguousarray(stored).tobytes()
        buffer = self._splits[split]
        entry = _Entry(record.record_id, len(buffer.entries), digest_bytes(data), meta, labels)
        if split is Split.TEST:
            entry.salt = label_salt(record.patient_pseudonym, record.record_id)
            entry.commitment = label_commitment(entry.salt, labels)
        buffer.raw.write(data)
        buffer.entries.append(entry)
        self._seen.add(record.record_id)

    def exclude(self, reason: str, count: int = 1) -> None:
        """Count ``count`` objects left out for ``reason``: a fixed, PHI-free phrase."""
        self._check_open()
        if not isinstance(reason, str) or not _REASON.fullmatch(reason):
            raise UsageError("an exclusion reason is a fixed phrase of up to 100 ASCII characters")
        if type(count) is not int or count < 0:
            raise UsageError("an exclusion count is a non-negative integer")
        self._exclusions[reason] = self._exclusions.get(reason, 0) + count

    def finish(self) -> ViewSummary:
        """Write the files, compute the digest, and move the view into place."""
        self._check_open()
        try:
            leaves: list[bytes] = []
            counts: dict[str, int] = {}
            for split, buffer in self._splits.items():
                buffer.entries.sort(key=lambda e: e.record_id)
                counts[split.value] = len(buffer.entries)
                self._write_images(buffer, self._tmp / split.value / IMAGES_FILE)
                self._write_records(split, buffer, self._tmp / split.value / RECORDS_FILE)
                leaves.extend(_leaf(split, e) for e in buffer.entries)
            params = self.params.to_json()
            digest = view_digest(params, merkle_root(leaves))
            document = view_document(self.params, counts, self._exclusions, digest)
            (self._tmp / VIEW_FILE).write_bytes(canonical_json(document) + b"\n")
            test_labels = self._write_test_labels(digest)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return ViewSummary(
            out=self.out,
            digest=digest,
            counts=counts,
            exclusions=dict(sorted(self._exclusions.items())),
            test_labels=test_labels,
            patients=frozenset(self._patients),
            params=self.params,
        )

    def abort(self) -> None:
        """Drop everything written so far; ``out`` is left as it was."""
        for buffer in self._splits.values():
            buffer.raw.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    # --- helpers ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this view writer is finished or aborted; start a new one")

    def _check_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        allowed = set(self.params.allowlist)
        for name in meta:
            if name not in allowed:
                raise UsageError(f"metadata field {name!r} is not in the view's allowlist")
        clean = dict(meta)
        try:
            canonical_json(clean)
        except DataError as exc:
            raise UsageError("metadata values must be JSON strings, numbers or null") from exc
        return clean

    def _check_labels(self, labels: Mapping[str, int | None]) -> dict[str, int | None]:
        findings = self.params.findings
        for name, value in labels.items():
            if name not in findings:
                raise UsageError(f"label {name!r} is not one of the view's findings")
            if isinstance(value, bool) or value not in _LABEL_VALUES:
                raise UsageError(f"label {name!r} must be 1, 0, -1 or None")
        return {name: labels.get(name) for name in findings}

    def _check_pixels(self, pixels: NDArray[Any]) -> NDArray[Any]:
        image = np.asarray(pixels)
        if image.dtype in (np.uint8, np.uint16):
            image = dequantize(image)
        ok = image.ndim == 2 and image.size > 0 and np.issubdtype(image.dtype, np.floating)
        if not ok or not np.all(np.isfinite(image)):
            raise UsageError("record pixels must be a finite, non-empty 2-D image")
        if float(image.min()) < -_TOLERANCE or float(image.max()) > 1 + _TOLERANCE:
            raise UsageError("record pixels must lie in [0, 1] (use pixels.to_display)")
        if image.shape != self.params.size:
            image = resample(image, self.params.size)
        return image

    def _write_images(self, buffer: _SplitBuffer, path: Path) -> None:
        buffer.raw.flush()
        header = npy_header(self.params, len(buffer.entries))
        with path.open("wb") as fh:
            fh.write(header)
            for entry in buffer.entries:
                buffer.raw.seek(entry.slot * self._row_bytes)
                row = buffer.raw.read(self._row_bytes)
                if len(row) != self._row_bytes:
                    raise DataError("view temporary image file is truncated")
                fh.write(row)
        buffer.raw.close()
        buffer.path.unlink()

    def _write_records(self, split: Split, buffer: _SplitBuffer, path: Path) -> None:
        with path.open("wb") as fh:
            for index, entry in enumerate(buffer.entries):
                fh.write(canonical_json(_record_line(split, index, entry)) + b"\n")

    def _write_test_labels(self, digest: str) -> Path:
        entries = self._splits[Split.TEST].entries
        document = {
            "schema_version": SCHEMA_VERSION,
            "view_digest": digest,
            "findings": list(self.params.findings),
            "records": {e.record_id: {"labels": e.labels, "salt": e.salt} for e in entries},
        }
        self.private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.private_dir / TEST_LABELS_FILE
        _write_private(path, canonical_json(document) + b"\n")
        return path

    def _move_into_place(self) -> None:
        old: Path | None = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            _remove(old)
            os.replace(self.out, old)
        os.replace(self._tmp, self.out)
        if old is not None:
            _remove(old)


def _leaf(split: Split, entry: _Entry) -> bytes:
    labels = labels_field(split, entry.labels, entry.commitment)
    meta_digest = digest_bytes(canonical_json(entry.meta))
    return leaf_hash(entry.record_id, split.value, labels, entry.pixels_digest, meta_digest)


def _record_line(split: Split, index: int, entry: _Entry) -> dict[str, Any]:
    line: dict[str, Any] = {"index": index, "record_id": entry.record_id, "meta": entry.meta}
    if split is Split.TEST:
        line["labels_commitment"] = entry.commitment
    else:
        line["labels"] = entry.labels
    return line


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- verification -------------------------------------------------------------------------


def verify_view(out: Path, private_dir: Path | None = None) -> str:
    """Recompute a view's digest from its files and return it.

    Raises :class:`IntegrityError` when a file is missing or added, a file is not in the
    exact form the writer produces, ``view.json`` disagrees with the files, or the
    recomputed digest differs from the recorded one: a changed byte in an image, a record
    line or the parameters is caught. Exclusion counts are only checked for form (they are
    not in the digest). With ``private_dir``, the test labels held there are checked
    against the view's commitments too. Compare the returned digest with the one a receipt
    or the audit log recorded: a view rewritten as a whole is consistent by itself.
    """
    out = Path(out)
    document = read_canonical(out / VIEW_FILE)
    try:
        params = ViewParams.from_json(document["params"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{VIEW_FILE}: the view parameters are malformed") from exc
    expected = {VIEW_FILE} | {s.value for s in Split}
    expected |= {f"{s.value}/{name}" for s in Split for name in (IMAGES_FILE, RECORDS_FILE)}
    found = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    if found != expected:
        raise IntegrityError(f"view {out} holds other files than the writer produced")
    leaves: list[bytes] = []
    counts: dict[str, int] = {}
    commitments: dict[str, str] = {}
    for split in Split:
        lines = read_record_lines(
            out / split.value / RECORDS_FILE,
            split,
            allowlist=params.allowlist,
            findings=params.findings,
        )
        digests = read_image_digests(
            out / split.value / IMAGES_FILE,
            header=npy_header(params, len(lines)),
            row_bytes=row_bytes(params),
            count=len(lines),
        )
        for line, pixels_digest in zip(lines, digests, strict=True):
            labels = labels_field(split, line.get("labels"), line.get("labels_commitment"))
            meta_digest = digest_bytes(canonical_json(line["meta"]))
            leaves.append(
                leaf_hash(line["record_id"], split.value, labels, pixels_digest, meta_digest)
            )
            if split is Split.TEST:
                commitments[line["record_id"]] = line["labels_commitment"]
        counts[split.value] = len(lines)
    digest = view_digest(params.to_json(), merkle_root(leaves))
    if document.get("digest") != digest:
        raise IntegrityError("the view's contents do not match its digest")
    exclusions = document.get("exclusions")
    if not isinstance(exclusions, dict) or not all(
        isinstance(k, str) and _REASON.fullmatch(k) and type(v) is int and v >= 0
        for k, v in exclusions.items()
    ):
        raise IntegrityError(f"{VIEW_FILE}: exclusions must map reasons to counts")
    if document != view_document(params, counts, exclusions, digest):
        raise IntegrityError(f"{VIEW_FILE} disagrees with the view's files")
    if private_dir is not None:
        check_test_labels(
            Path(private_dir) / TEST_LABELS_FILE,
            findings=params.findings,
            digest=digest,
            commitments=commitments,
        )
    return digest
