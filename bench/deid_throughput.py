"""Benchmark: de-identification throughput on one core, against dicognito, deid and pydicom.

Header path
    Rapha: parse, :func:`rapha.node.deidentify_header` (burned-in screen, HMAC pseudonyms
    of the patient and the three UIDs, the allowlisted facts), no OCR. Peers: dicognito
    ``Anonymizer().anonymize(ds)`` and deid ``replace_identifiers([ds], deid=<its default
    recipe>)``, each on a dataset freshly parsed from the same bytes.

Full path
    Rapha: the header path on the whole file plus :func:`rapha.node.prepare_pixels` (decode,
    Modality LUT, VOI, MONOCHROME1, resample to 224 x 224). Floor: a bare pydicom
    ``dcmread(...).pixel_array`` of the same bytes.

OCR
    :meth:`rapha.privacy.OcrScreen.has_text` on chest radiographs, timed on its own.

Every tool reads the same in-memory bytes (each file is read from disk once) in the same
run. The script pins itself to one CPU and to one thread per numeric library, re-executing
itself when the environment was not set before numpy was imported. It prints one Markdown
section to stdout (collected by ``bench/run.py``) and its progress to stderr.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

_ONE_THREAD: Final = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "MESSAGELEVEL": "0",  # deid's logger: quiet (it prints to stdout otherwise)
}


def _pin_one_core() -> int:
    """Run on the first allowed CPU, with one thread per library (re-exec if needed)."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    if any(os.environ.get(k) != v for k, v in _ONE_THREAD.items()):
        env = {**os.environ, **_ONE_THREAD}
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve())], env)
    return cpu


if __name__ == "__main__":
    _pin_one_core()  # before numpy (and its thread pools) is imported below

import pydicom  # noqa: E402
import pydicom.data  # noqa: E402
from pydicom.uid import UID  # noqa: E402

from _deid_report import (  # noqa: E402  (bench/ is the script's directory)
    Item,
    Timings,
    corpus_section,
    full_section,
    header_section,
    ocr_section,
    summary_lines,
)
from rapha.dataset import resample, to_display  # noqa: E402
from rapha.demo.archive import generate_archive  # noqa: E402
from rapha.errors import DataError  # noqa: E402
from rapha.node import deidentify_header, prepare_pixels  # noqa: E402
from rapha.pacs.source import read_dataset  # noqa: E402
from rapha.privacy import OcrScreen, Pseudonymizer  # noqa: E402

#: The fixed corpus: pydicom's test files and pydicom-data's files, by name
#: (``pydicom.data.get_testdata_file``). Single- and multi-frame, grey and colour, every
#: transfer syntax pydicom decodes; the largest files of pydicom-data are included.
CORPUS: Final = (
    # Explicit VR Little Endian
    "RG1_UNCR.dcm",
    "RG3_UNCR.dcm",
    "MR2_UNCR.dcm",
    "693_UNCR.dcm",
    "CT_small.dcm",
    "MR_small.dcm",
    "US1_UNCR.dcm",
    "SC_rgb.dcm",
    "vlut_04.dcm",
    "eCT_Supplemental.dcm",
    # Implicit VR Little Endian
    "MR_small_implicit.dcm",
    "rtdose_1frame.dcm",
    "gdcm-US-ALOKA-16.dcm",
    # Explicit VR Big Endian
    "MR_small_bigendian.dcm",
    "rtdose_expb_1frame.dcm",
    "OBXXXX1A_expb.dcm",
    "emri_small_big_endian.dcm",
    # Deflated Explicit VR Little Endian
    "image_dfl.dcm",
    # RLE Lossless
    "MR_small_RLE.dcm",
    "rtdose_rle_1frame.dcm",
    "OBXXXX1A_rle.dcm",
    "emri_small_RLE.dcm",
    # JPEG Baseline
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_jpeg_no_color_transform.dcm",
    "color3d_jpeg_baseline.dcm",
    # JPEG Extended
    "JPGExtended.dcm",
    # JPEG Lossless SV1
    "JPEG-LL.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "bad_sequence.dcm",
    # JPEG-LS lossless and near-lossless
    "MR_small_jpeg_ls_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm",
    # JPEG 2000 Lossless
    "RG1_J2KR.dcm",
    "RG3_J2KR.dcm",
    "MR2_J2KR.dcm",
    "693_J2KR.dcm",
    "US1_J2KR.dcm",
    "MR_small_jp2klossless.dcm",
    # JPEG 2000
    "RG1_J2KI.dcm",
    "RG3_J2KI.dcm",
    "MR2_J2KI.dcm",
    "693_J2KI.dcm",
)
#: Plus every readable file of a small synthetic archive (default image sizes).
SYNTHETIC_STUDIES: Final = 6
SYNTHETIC_SEED: Final = 11
ARCHIVE: Final = f"generate_archive(studies={SYNTHETIC_STUDIES}, seed={SYNTHETIC_SEED})"
SIZE: Final = (224, 224)
MIN_SECONDS: Final = 1.0
REPEATS: Final = 3
OCR_MODALITIES: Final = frozenset({"CR", "DX"})


def _log(message: str) -> None:
    print(f"deid_throughput: {message}", file=sys.stderr, flush=True)


def _item(name: str, origin: str, raw: bytes) -> Item:
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    syntax = str(UID(ds.file_meta.TransferSyntaxUID).name)
    return Item(name, origin, syntax, str(ds.get("Modality") or ""), raw)


def load_corpus(synthetic_root: Path) -> list[Item]:
    """Read every corpus file into memory once."""
    local = Path(pydicom.data.__file__).parent / "test_files"
    items = []
    for name in CORPUS:
        path = pydicom.data.get_testdata_file(name)
        if not isinstance(path, str):
            raise SystemExit(f"corpus file {name} is missing; install pydicom-data")
        origin = "pydicom" if Path(path).is_relative_to(local) else "pydicom-data"
        items.append(_item(name, origin, Path(path).read_bytes()))
    generate_archive(synthetic_root, studies=SYNTHETIC_STUDIES, seed=SYNTHETIC_SEED)
    truth = json.loads((synthetic_root / "truth.json").read_text())
    corrupt = set(truth["corrupt_files"])
    for file in sorted((synthetic_root / "dicom").rglob("*.dcm")):
        rel = file.relative_to(synthetic_root).as_posix()
        if rel not in corrupt:
            items.append(_item(f"synthetic:{rel}", "synthetic", file.read_bytes()))
    return items


# --- the tools --------------------------------------------------------------------------

Tool = Callable[[bytes], object]


def _tools(pseudonymizer: Pseudonymizer) -> tuple[dict[str, Tool], dict[str, Tool]]:
    from deid.config import DeidRecipe
    from deid.dicom import replace_identifiers
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="rapha-bench")
    recipe = DeidRecipe()  # deid's default recipe (deid.dicom), loaded once

    def rapha_header(raw: bytes) -> object:
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        return deidentify_header(ds, pseudonymizer, require_pixel_data=False)

    def rapha_whole(raw: bytes) -> object:
        return deidentify_header(pydicom.dcmread(io.BytesIO(raw)), pseudonymizer)

    def rapha_settled(raw: bytes) -> object:
        return deidentify_header(read_dataset(io.BytesIO(raw)), pseudonymizer)

    def dicognito(raw: bytes) -> object:
        ds = pydicom.dcmread(io.BytesIO(raw))
        anonymizer.anonymize(ds)
        return ds

    def deid(raw: bytes) -> object:
        return replace_identifiers([pydicom.dcmread(io.BytesIO(raw))], deid=recipe)

    def rapha_full(raw: bytes) -> object:
        ds = pydicom.dcmread(io.BytesIO(raw))
        deidentify_header(ds, pseudonymizer)
        return prepare_pixels(ds, SIZE)

    def floor(raw: bytes) -> object:
        return pydicom.dcmread(io.BytesIO(raw)).pixel_array

    header: dict[str, Tool] = {
        "rapha": rapha_header,
        "rapha, whole file parsed": rapha_whole,
        "rapha, read_dataset (settled)": rapha_settled,
        "dicognito": dicognito,
        "deid": deid,
    }
    return header, {"rapha": rapha_full, "pydicom pixel_array": floor}


def _failures(tool: Tool, items: Sequence[Item]) -> list[str]:
    failed = []
    for item in items:
        try:
            tool(item.raw)
        except Exception as exc:  # a peer failing on a file is counted, not fatal
            failed.append(f"{item.name} ({type(exc).__name__})")
    return failed


# --- timing -----------------------------------------------------------------------------


def _one_measurement(tool: Tool, items: Sequence[Item]) -> list[float]:
    """Seconds per file: passes over ``items`` until at least MIN_SECONDS have passed."""
    totals = [0.0] * len(items)
    passes = 0
    gc.collect()
    start = time.perf_counter()
    while True:
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            tool(item.raw)
            totals[i] += time.perf_counter() - t0
        passes += 1
        if time.perf_counter() - start >= MIN_SECONDS:
            return [t / passes for t in totals]


def measure(tools: dict[str, Tool], items: list[Item], label: str) -> Timings:
    runs: dict[str, list[list[float]]] = {name: [] for name in tools}
    for tool in tools.values():  # warm-up: imports, caches, lazy tables
        for item in items:
            tool(item.raw)
    for repeat in range(REPEATS):
        for name, tool in tools.items():  # interleaved, so drift hits every tool alike
            _log(f"{label}: repeat {repeat + 1}/{REPEATS}, {name}")
            runs[name].append(_one_measurement(tool, items))
    return Timings(items, runs)


# --- main -------------------------------------------------------------------------------


def _by_raw(values: dict[int, Any], fn: Callable[[Any], object]) -> Tool:
    """A tool that applies ``fn`` to the value prepared beforehand for these bytes."""
    return lambda raw: fn(values[id(raw)])


def _decodes(item: Item) -> bool:
    try:
        prepare_pixels(pydicom.dcmread(io.BytesIO(item.raw)), SIZE)
    except DataError:
        return False
    return True


def main() -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing a library prints may end up in the report
    warnings.simplefilter("ignore")  # sample files are deliberately odd; same for every tool
    logging.disable(logging.CRITICAL)
    started = time.perf_counter()
    cpu = sorted(os.sched_getaffinity(0))
    torch = sys.modules.get("torch")  # none of the tools imports it; if one did, one thread
    if torch is not None:
        torch.set_num_threads(1)
    pseudonymizer = Pseudonymizer(bytes(range(32)))
    header_tools, full_tools = _tools(pseudonymizer)

    with tempfile.TemporaryDirectory() as tmp:
        items = load_corpus(Path(tmp) / "archive")
    _log(f"corpus: {len(items)} files, {sum(i.mb for i in items):.1f} MB")

    failures = {name: _failures(tool, items) for name, tool in header_tools.items()}
    bad = {f.split(" (")[0] for fs in failures.values() for f in fs}
    header_items = [i for i in items if i.name not in bad]
    passing = {
        i.name
        for i in header_items
        if deidentify_header(pydicom.dcmread(io.BytesIO(i.raw)), pseudonymizer).exclusion is None
    }
    header = measure(header_tools, header_items, "header")

    full_items = [i for i in items if _decodes(i) and not _failures(full_tools["rapha"], [i])]
    full_items = [i for i in full_items if not _failures(full_tools["pydicom pixel_array"], [i])]
    full = measure(full_tools, full_items, "full")
    parsed = {id(i.raw): pydicom.dcmread(io.BytesIO(i.raw)) for i in full_items}
    shown = {id(i.raw): to_display(ds) for i, ds in zip(full_items, parsed.values(), strict=True)}
    stage_tools: dict[str, Tool] = {
        "floor (pixel_array)": full_tools["pydicom pixel_array"],
        "parse": lambda raw: pydicom.dcmread(io.BytesIO(raw)),
        "deidentify_header": _by_raw(parsed, lambda ds: deidentify_header(ds, pseudonymizer)),
        "to_display": _by_raw(parsed, to_display),
        "resample": _by_raw(shown, lambda img: resample(img, SIZE)),
    }
    stages = measure(stage_tools, full_items, "stages")

    screen = OcrScreen()
    chest = [
        i
        for i in full_items
        if i.modality in OCR_MODALITIES
        and (i.origin == "synthetic" or i.name in {"RG1_UNCR.dcm", "RG3_UNCR.dcm"})
    ]
    modality = {id(i.raw): i.modality for i in chest}

    def has_text(raw: bytes) -> bool:
        return screen.has_text(shown[id(raw)], modality[id(raw)])

    found = {i.name: has_text(i.raw) for i in chest}
    shapes = {i.name: shown[id(i.raw)].shape for i in chest}
    ocr = measure({"has_text": has_text}, chest, "ocr")

    took = time.perf_counter() - started
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    libs = ", ".join(
        f"{p} {version(p)}" for p in ("pydicom", "numpy", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg")
    )
    print(
        "## De-identification throughput\n\n"
        f"One core (CPU {cpu}, `sched_setaffinity`; `OMP_NUM_THREADS`, "
        "`OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS` = 1, set before numpy loads); "
        f"{'torch not loaded' if 'torch' not in sys.modules else 'torch loaded'}; {libs}. "
        "Each file is read from disk once; every tool parses the same in-memory bytes "
        "(`io.BytesIO`) in every iteration, in the same run. Timing: `time.perf_counter` "
        f"around each file; one measurement is as many passes over the files as take "
        f"≥ {MIN_SECONDS:g} s; the tools are measured interleaved, {REPEATS} times, and "
        "each figure is the median (per transfer syntax: the median of the summed "
        f"per-file times). Total run {took:.0f} s; load average at the end {load} "
        f"(1/5/15 min) on {os.cpu_count()} CPUs: other work on the machine shows as noise.\n\n"
        + corpus_section(items, CORPUS, ARCHIVE)
        + "\n"
        + header_section(header, failures, passing)
        + "\n"
        + full_section(full, stages)
        + "\n"
        + ocr_section(ocr, full, found, shapes),
        file=out,
    )
    print("\n" + "\n".join(summary_lines(header, full)), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
