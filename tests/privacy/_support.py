"""Inputs for the privacy tests: pydicom's and pydicom-data's sample files, a synthetic archive.

Sample files are listed from the two local stores directly: ``get_testdata_files("*")``
would also try to download the files pydicom knows of but neither store holds, and warn.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.data
from pydicom import config
from pydicom.data import data_manager
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

HAVE_ARCHIVE = importlib.util.find_spec("rapha.demo.archive") is not None


def sample_paths() -> list[Path]:
    """Every file in pydicom's own test data and in pydicom-data, sorted by name."""
    local = Path(pydicom.data.__file__).parent / "test_files"
    paths = [p for p in local.rglob("*") if p.is_file()]
    external = data_manager.external_data_sources().get("pydicom-data")
    if external is not None:
        paths += [Path(p) for p in external.get_paths("*")]
    return sorted(paths, key=lambda p: (p.name, str(p)))


def read_sample(path: Path) -> Dataset | None:
    """The dataset in ``path``, or ``None`` when it is not DICOM.

    Some sample files are deliberately malformed, and pydicom warns while reading them
    (invalid VR values, odd lengths, deflate quirks). The warnings are silenced here, for
    reading only: the code under test runs outside this block, with warnings as errors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, KeyError, TypeError, EOFError):
            return None
    return ds if "SOPClassUID" in ds or "PixelData" in ds else None


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    ds: Dataset


def _load_samples() -> list[Sample]:
    out = []
    for path in sample_paths():
        ds = read_sample(path)
        if ds is not None:
            out.append(Sample(path.name, path, ds))
    return out


SAMPLES: list[Sample] = _load_samples()


def display(ds: Dataset) -> npt.NDArray[np.float32]:
    """Grey display image in [0, 1] (PS3.3 C.11.1 Modality LUT, C.11.2 VOI, MONOCHROME1).

    A minimal stand-in for the view's decoder, enough to hand OCR what a viewer shows:
    colour is averaged to grey and only the first frame of multi-frame images is used.
    """
    with warnings.catch_warnings():
        # pydicom notes "VOI LUT Function" values it does not know; irrelevant here.
        warnings.simplefilter("ignore", UserWarning)
        arr = ds.pixel_array
        if int(ds.get("SamplesPerPixel", 1)) > 1:
            grey = arr.astype(np.float32).mean(axis=-1)
            if grey.ndim == 3:
                grey = grey[0]
            top = float(grey.max()) or 1.0
            out: npt.NDArray[np.float32] = (grey / top).astype(np.float32)
            return out
        if arr.ndim == 3:
            arr = arr[0]
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds, prefer_lut=True)
    img = np.asarray(values, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        img = 1.0 - img
    return img


@dataclass(frozen=True)
class Archive:
    root: Path
    truth: dict[str, Any]

    def readable(self) -> Iterator[tuple[str, Dataset]]:
        """(path relative to root, dataset) of every file that is not deliberately damaged."""
        corrupt = set(self.truth["corrupt_files"])
        for path in sorted((self.root / "dicom").rglob("*.dcm")):
            rel = path.relative_to(self.root).as_posix()
            if rel not in corrupt:
                yield rel, pydicom.dcmread(path)


def make_archive(root: Path, *, studies: int, seed: int, **kwargs: Any) -> Archive:
    from rapha.demo.archive import generate_archive

    generate_archive(root, studies=studies, seed=seed, **kwargs)
    return Archive(root, json.loads((root / "truth.json").read_text()))


def make_ds(**attrs: Any) -> Dataset:
    """A dataset with these attributes, set without pydicom's value validation (which
    would warn on the deliberately invalid values the tests feed in)."""
    ds = Dataset()
    for keyword, value in attrs.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        vr = dictionary_VR(tag).split(" or ")[-1]  # "OB or OW" -> OW
        ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    return ds
