"""Benchmark: synthetic archive generation against the floor of writing the same files.

Rapha: :func:`rapha.demo.generate_archive` (phantom pixels, full headers with planted PHI,
burned-in text, JPEG 2000 and RLE compression, labels CSV and truth JSON).

Baseline: plain pydicom ``dcmwrite`` of the same number of files, each a minimal dataset
with uncompressed random pixels of the same size and dtype as the corresponding archive
file: the cost of putting those bytes on disk with pydicom and nothing else.

Prints one Markdown section to stdout (collected by ``bench/run.py``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from _summary import summary_line  # bench/ is the script's directory
from rapha.demo import generate_archive

STUDIES = 100
SEED = 1
SIZE_RANGE = (256, 512)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _baseline(files: list[dict[str, Any]], out: Path) -> float:
    """Write one plain file per archive file; return the seconds taken."""
    rng = np.random.default_rng(0)
    out.mkdir()
    t0 = time.perf_counter()
    for n, record in enumerate(files):
        rgb = record["photometric"] == "RGB"
        bits = int(record["bits_stored"])
        dtype = np.uint8 if bits <= 8 else np.uint16
        shape = (
            (record["rows"], record["columns"], 3) if rgb else (record["rows"], record["columns"])
        )
        pixels = rng.integers(0, 2**bits, size=shape, dtype=dtype)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns = shape[0], shape[1]
        ds.SamplesPerPixel = 3 if rgb else 1
        ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
        if rgb:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8 * pixels.itemsize
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        dcmwrite(out / f"{n:05d}.dcm", ds, enforce_file_format=True)
    return time.perf_counter() - t0


def main() -> int:
    studies = int(sys.argv[1]) if len(sys.argv) > 1 else STUDIES
    with tempfile.TemporaryDirectory(prefix="rapha-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        summary = generate_archive(
            root / "archive", studies=studies, seed=SEED, size_range=SIZE_RANGE
        )
        ours = time.perf_counter() - t0
        ours_bytes = _tree_bytes(root / "archive")
        truth = json.loads(summary.truth_json.read_text(encoding="utf-8"))
        files = [f for s in truth["studies"] for f in s["files"] if f["corrupt"] is None]

        base = _baseline(files, root / "baseline")
        base_bytes = _tree_bytes(root / "baseline")

    mb = 1024 * 1024
    rows = [
        ("Rapha `generate_archive`", ours, summary.files, ours_bytes),
        ("baseline: pydicom `dcmwrite`, random pixels", base, len(files), base_bytes),
    ]
    print("## Archive generation\n")
    print(
        f"{studies} studies, seed {SEED}, longer image side {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px. "
        "Rapha renders phantom radiographs and CT/MR/US/SC pixels, writes full headers with "
        "planted PHI, burns in text, compresses some files (JPEG 2000 Lossless, RLE "
        "Lossless), and writes `labels.csv` and `truth.json`. The baseline writes the same "
        "number of uncompressed files of the same sizes with random pixels and minimal "
        "headers: the floor of writing the files with pydicom.\n"
    )
    print("| writer | wall s | studies/s | files/s | MB written | MB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, n_files, n_bytes in rows:
        print(
            f"| {name} | {seconds:.2f} | {studies / seconds:.1f} | {n_files / seconds:.1f} "
            f"| {n_bytes / mb:.1f} | {n_bytes / mb / seconds:.1f} |"
        )
    print(
        f"\nRatio, Rapha wall time / baseline wall time: **{ours / base:.1f}x** (files/s: "
        f"{summary.files / ours:.1f} vs {len(files) / base:.1f}). The difference is pixel "
        "synthesis, header building, compression and the truth file."
    )
    print()
    print(
        summary_line(
            f"synthetic archive generation, {studies} studies, wall time",
            rapha=f"`generate_archive`: {ours:.2f} s ({summary.files / ours:.1f} files/s)",
            peer=f"pydicom `dcmwrite` of the same files, random pixels: {base:.2f} s "
            f"({len(files) / base:.1f} files/s)",
            ratio=f"{ours / base:.1f}x slower",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
