"""Burned-in text screening: header rules on sample files and the archive, then OCR."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw, ImageFont

from rapha.errors import ConfigError, DataError
from rapha.privacy import Exclusion, OcrScreen, screen_header

from ._support import SAMPLES, Archive, display, make_archive, make_ds

PIXELS = b"\x00\x00" * 16
CT = "1.2.840.10008.5.1.4.1.1.2"
SAMPLE = {s.name: s for s in SAMPLES}


def _image(**attrs: Any) -> Any:
    base: dict[str, Any] = {"SOPClassUID": CT, "Modality": "CT", "PixelData": PIXELS}
    base.update(attrs)
    return make_ds(**{k: v for k, v in base.items() if v is not None})


def test_reasons_are_fixed_phi_free_strings() -> None:
    values = [e.value for e in Exclusion]

    assert len(set(values)) == len(values)
    assert all(re.fullmatch(r"[a-z_]+", v) for v in values)


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({}, None),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, None),
        ({"BurnedInAnnotation": "NO"}, None),
        ({"BurnedInAnnotation": "YES"}, Exclusion.BURNED_IN_FLAG),
        ({"BurnedInAnnotation": "yes "}, Exclusion.BURNED_IN_FLAG),
        ({"BurnedInAnnotation": ""}, Exclusion.BURNED_IN_FLAG),  # unknown is not a denial
        ({"Modality": "US"}, Exclusion.MODALITY_US_SC_OT),
        ({"Modality": "OT"}, Exclusion.MODALITY_US_SC_OT),
        ({"Modality": "SC"}, Exclusion.MODALITY_US_SC_OT),
        ({"Modality": "XC"}, Exclusion.MODALITY_US_SC_OT),
        ({"Modality": "DOC"}, Exclusion.MODALITY_US_SC_OT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1"}, Exclusion.MODALITY_US_SC_OT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.3.1"}, Exclusion.MODALITY_US_SC_OT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, Exclusion.MODALITY_US_SC_OT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.1"}, Exclusion.MODALITY_US_SC_OT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4"}, Exclusion.MODALITY_US_SC_OT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.4"}, Exclusion.MODALITY_US_SC_OT),
        ({"ImageType": ["DERIVED", "SECONDARY"]}, Exclusion.IMAGE_TYPE_SECONDARY),
        ({"ImageType": "DERIVED\\SECONDARY"}, Exclusion.IMAGE_TYPE_SECONDARY),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "SCREEN SAVE"]}, Exclusion.IMAGE_TYPE_SECONDARY),
        ({"ImageType": ["DERIVED", "PRIMARY", "SAVE"]}, Exclusion.IMAGE_TYPE_SECONDARY),
        ({"ConversionType": "WSD"}, Exclusion.SC_DEVICE),
        ({"ConversionType": ""}, Exclusion.SC_DEVICE),
        ({"SecondaryCaptureDeviceManufacturer": "ACME"}, Exclusion.SC_DEVICE),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, Exclusion.NON_IMAGE_OBJECT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.59"}, Exclusion.NON_IMAGE_OBJECT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.22"}, Exclusion.NON_IMAGE_OBJECT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.11.1"}, Exclusion.NON_IMAGE_OBJECT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.11.2"}, Exclusion.NON_IMAGE_OBJECT),
        ({"Modality": "KO"}, Exclusion.NON_IMAGE_OBJECT),
        ({"PixelData": None}, Exclusion.NON_IMAGE_OBJECT),
        # The order is documented: the most basic reason wins.
        ({"Modality": "US", "BurnedInAnnotation": "YES"}, Exclusion.BURNED_IN_FLAG),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "ConversionType": "WSD"},
            Exclusion.MODALITY_US_SC_OT,
        ),
    ],
)
def test_header_rules(attrs: dict[str, Any], expected: Exclusion | None) -> None:
    assert screen_header(_image(**attrs)) == expected


def test_a_header_without_pixels_can_be_screened_early() -> None:
    header = _image(PixelData=None)

    assert screen_header(header) == Exclusion.NON_IMAGE_OBJECT
    assert screen_header(header, require_pixel_data=False) is None
    assert screen_header(_image(PixelData=None, Modality="US"), require_pixel_data=False) == (
        Exclusion.MODALITY_US_SC_OT
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CT_small.dcm", None),
        ("RG1_UNCR.dcm", None),
        ("MR2_UNCR.dcm", None),
        ("US1_UNCR.dcm", Exclusion.MODALITY_US_SC_OT),
        ("OBXXXX1A.dcm", Exclusion.MODALITY_US_SC_OT),
        ("SC_rgb.dcm", Exclusion.MODALITY_US_SC_OT),
        ("MR_small.dcm", Exclusion.IMAGE_TYPE_SECONDARY),
        ("explicit_VR-UN.dcm", Exclusion.SC_DEVICE),
        ("test-SR.dcm", Exclusion.NON_IMAGE_OBJECT),
        ("waveform_ecg.dcm", Exclusion.NON_IMAGE_OBJECT),
        ("rtplan.dcm", Exclusion.NON_IMAGE_OBJECT),
        ("liver.dcm", Exclusion.NON_IMAGE_OBJECT),
    ],
)
def test_header_rules_on_sample_files(name: str, expected: Exclusion | None) -> None:
    assert screen_header(SAMPLE[name].ds) == expected


def test_every_sample_file_is_screened_without_error() -> None:
    reasons = {s.name: screen_header(s.ds) for s in SAMPLES}

    assert set(reasons.values()) <= {None, *Exclusion}
    assert sum(r is None for r in reasons.values()) >= 20


def test_header_rules_on_the_archive(small_archive: Archive) -> None:
    burned = {b["path"]: b for b in small_archive.truth["burned_in"]}

    reasons = {rel: screen_header(ds) for rel, ds in small_archive.readable()}

    for rel, info in burned.items():
        if info["flagged"] or info["modality"] in {"US", "OT"}:
            assert reasons[rel] is not None, rel
        else:
            assert reasons[rel] is None, "an unflagged radiograph is OCR's job"
    kinds = {s["index"]: s["modality"] for s in small_archive.truth["studies"]}
    assert set(kinds.values()) >= {"CR", "DX", "CT", "MR", "US", "OT"}
    for rel, ds in small_archive.readable():
        if rel not in burned and str(ds.Modality) not in {"US", "OT"}:
            assert reasons[rel] is None, "a plain CR/DX/CT/MR image passes the header rules"


# --- OCR ------------------------------------------------------------------------------------


def _text_image(
    text: str, *, light_on_dark: bool = True, size: tuple[int, int] = (320, 480)
) -> npt.NDArray[np.float32]:
    rows, cols = size
    y = np.linspace(0.35, 0.65, rows, dtype=np.float32)[:, None]
    background = np.broadcast_to(y, (rows, cols)).copy()
    mask = Image.new("L", (cols, rows), 0)
    ImageDraw.Draw(mask).text((20, 20), text, fill=255, font=ImageFont.load_default(size=28))
    ink = np.asarray(mask) >= 128
    background[ink] = 1.0 if light_on_dark else 0.0
    return background


@pytest.fixture(scope="module")
def ocr() -> OcrScreen:
    return OcrScreen()


@pytest.mark.parametrize("light_on_dark", [True, False])
def test_ocr_finds_text_in_either_polarity(ocr: OcrScreen, light_on_dark: bool) -> None:
    image = _text_image("DOE, JANE  MRN 0012345", light_on_dark=light_on_dark)

    assert ocr.has_text(image, "CR")


def test_ocr_finds_text_at_the_image_edge(ocr: OcrScreen) -> None:
    image = _text_image("SMITH", size=(64, 110))

    assert ocr.has_text(image, "DX")


def test_ocr_finds_text_in_a_large_downscaled_image(ocr: OcrScreen) -> None:
    small = _text_image("PATIENT NAME 1234", size=(320, 480))
    large = np.kron(small, np.ones((5, 5), dtype=np.float32))  # 1600 x 2400

    assert ocr.has_text(large, "CR")


def test_ocr_ignores_a_smooth_image(ocr: OcrScreen) -> None:
    blank = _text_image("")

    assert not ocr.has_text(blank, "CR")
    assert not ocr.has_text(np.zeros((100, 100), np.float32), "CR")


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm"])
def test_ocr_reads_the_text_of_real_ultrasound_images(ocr: OcrScreen, name: str) -> None:
    assert ocr.has_text(display(SAMPLE[name].ds), "US")


@pytest.mark.parametrize(
    "name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "MR2_UNCR.dcm", "693_UNCR.dcm", "CT_small.dcm"]
)
def test_ocr_passes_real_images_without_text(ocr: OcrScreen, name: str) -> None:
    ds = SAMPLE[name].ds

    assert not ocr.has_text(display(ds), str(ds.Modality))


def test_ocr_catches_burned_in_text_on_the_archive(tmp_path: Path, ocr: OcrScreen) -> None:
    """Catch rate on every burned-in file, false positives on every clean file that passes
    the header screen, at the generator's default image sizes (256-512 pixels)."""
    archive = make_archive(tmp_path / "a", studies=40, seed=5)
    burned = {b["path"] for b in archive.truth["burned_in"]}
    caught: list[bool] = []
    false_pos: list[bool] = []
    start = time.perf_counter()

    for rel, ds in archive.readable():
        if rel not in burned and screen_header(ds) is not None:
            continue
        found = ocr.has_text(display(ds), str(ds.Modality))
        (caught if rel in burned else false_pos).append(found)

    seconds = (time.perf_counter() - start) / (len(caught) + len(false_pos))
    print(
        f"OCR: caught {sum(caught)}/{len(caught)} burned-in, flagged "
        f"{sum(false_pos)}/{len(false_pos)} clean, {seconds * 1000:.0f} ms per image"
    )
    assert len(caught) >= 2
    assert all(caught)
    assert not any(false_pos)


def test_ocr_can_be_disabled_per_modality_in_writing() -> None:
    ocr = OcrScreen(disabled={"ct": "CT reconstructions here never carry burned-in text."})
    image = _text_image("DOE, JANE  MRN 0012345")

    assert ocr.disabled == {"CT": "CT reconstructions here never carry burned-in text."}
    assert not ocr.enabled_for("CT")
    assert ocr.enabled_for("MR")
    assert not ocr.has_text(image, "CT")
    assert ocr.has_text(image, "MR")


@pytest.mark.parametrize("why", ["", "   ", "ok", "approved"])
def test_disabling_ocr_without_a_justification_is_refused(why: str) -> None:
    with pytest.raises(ConfigError, match="justification"):
        OcrScreen(disabled={"CT": why})


def test_disabling_ocr_needs_a_modality_code() -> None:
    with pytest.raises(ConfigError, match="modality"):
        OcrScreen(disabled={"C/T": "no text on these, signed off by the DPO"})


@pytest.mark.parametrize(
    "image",
    [np.zeros((4, 4, 3), np.float32), np.zeros((0, 4), np.float32), np.full((4, 4), np.nan)],
    ids=["colour", "empty", "nan"],
)
def test_ocr_refuses_what_it_cannot_read(ocr: OcrScreen, image: npt.NDArray[Any]) -> None:
    with pytest.raises(DataError):
        ocr.has_text(image, "CR")


def test_missing_tesseract_fails_closed(tmp_path: Path) -> None:
    code = (
        "from rapha.errors import DependencyError\n"
        "from rapha.privacy import OcrScreen\n"
        "try:\n"
        "    OcrScreen()\n"
        "except DependencyError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no tesseract on it

    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout
    assert "apt-get install tesseract-ocr" in result.stdout
