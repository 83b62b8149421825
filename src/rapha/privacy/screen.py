"""Burned-in text screening, fail closed: the header rules, then OCR on the pixels.

Text burned into pixels (names, MRNs, dates) cannot be removed by header de-identification,
so an instance that may carry it is excluded. :func:`screen_header` applies the rules that
need only the header; :class:`OcrScreen` looks for text in the decoded image, the only
defence against text burned in without a flag. Every exclusion has an
:class:`Exclusion` reason: a fixed string, counted per view, that never names a patient.

Header rules, in the order :func:`screen_header` applies them (the first that holds wins,
so each instance is counted once, under the most basic reason):

1. ``NON_IMAGE_OBJECT``: the SOP class is not an image (Structured Report and Key Object
   Selection ``1.2.840.10008.5.1.4.1.1.88.*``, presentation states ``…1.1.11.*``,
   encapsulated documents ``…1.1.104.*``, waveforms ``…1.1.9.*``, raw data, registration
   and segmentation ``…1.1.66*``), the Modality is SR, KO or PR, or there is no Pixel
   Data, Float Pixel Data or Double Float Pixel Data.
2. ``BURNED_IN_FLAG``: Burned In Annotation (0028,0301) is present with any value but
   ``NO`` (PS3.3 C.7.6.1.1.4: ``YES`` means text is burned in; an empty or unknown value
   is not a denial).
3. ``MODALITY_US_SC_OT``: the SOP class is ultrasound (``…1.1.6*``, ``…1.1.3*``
   multi-frame), secondary capture (``…1.1.7``, ``…1.1.7.1`` to ``.4``) or visible light
   (``…1.1.77.*``: photographs, endoscopy, microscopy), or the Modality is one whose
   images routinely carry text or faces: US, IVUS, OT, SC, XC, ES, GM, SM, OP, DOC.
4. ``IMAGE_TYPE_SECONDARY``: a value of Image Type (0008,0008) is, or contains the word,
   SECONDARY, SCREEN or SAVE (``DERIVED\\SECONDARY``; ``SCREEN SAVE``). Value 2 is
   PRIMARY or SECONDARY (PS3.3 C.7.6.1.1.2); SECONDARY images are made after the fact,
   often as screenshots.
5. ``SC_DEVICE``: an attribute of the SC Equipment module (PS3.3 C.8.6.1) is present:
   Conversion Type, Secondary Capture Device ID/Manufacturer/Model/Software Versions,
   Date/Time of Secondary Capture, Video/Digital Image Format Acquired.
"""

from __future__ import annotations

import enum
import re
import shutil
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import numpy as np
import numpy.typing as npt
import pytesseract
from PIL import Image
from pydicom.dataset import Dataset

from rapha.errors import ConfigError, DataError, DependencyError, UsageError
from rapha.privacy._header import has_element, strings

__all__ = [
    "MIN_JUSTIFICATION_CHARS",
    "TESSERACT_INSTALL",
    "Exclusion",
    "OcrScreen",
    "screen_header",
]


class Exclusion(enum.StrEnum):
    """Why an instance was left out of a view. Values are fixed and never name anyone."""

    BURNED_IN_FLAG = "burned_in_annotation_flag"
    MODALITY_US_SC_OT = "ultrasound_secondary_capture_or_other"
    IMAGE_TYPE_SECONDARY = "image_type_secondary_or_screen_save"
    SC_DEVICE = "secondary_capture_device"
    NON_IMAGE_OBJECT = "non_image_object"
    OCR_TEXT = "text_found_by_ocr"
    OPTED_OUT = "patient_opted_out"
    OUT_OF_SCOPE = "out_of_scope"
    UNREADABLE = "unreadable_file"
    UNDECODABLE = "undecodable_pixels"
    MULTIFRAME = "multi_frame"
    COLOUR = "colour"


_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1."
_NON_IMAGE_FAMILIES: Final = ("88", "11", "104", "9", "66")
_TEXT_PRONE_FAMILIES: Final = ("6", "3", "7", "77")  # US, US multi-frame, SC, visible light
_NON_IMAGE_MODALITIES: Final = frozenset({"SR", "KO", "PR"})
_TEXT_PRONE_MODALITIES: Final = frozenset(
    {"US", "IVUS", "OT", "SC", "XC", "ES", "GM", "SM", "OP", "DOC"}
)
_SECONDARY_WORDS: Final = frozenset({"SECONDARY", "SCREEN", "SAVE"})
_WORD_SPLIT: Final = re.compile(r"[\s_\\]+")

_SOP_CLASS_UID: Final = 0x00080016
_MEDIA_SOP_CLASS_UID: Final = 0x00020002
_MODALITY: Final = 0x00080060
_IMAGE_TYPE: Final = 0x00080008
_BURNED_IN_ANNOTATION: Final = 0x00280301
_PIXEL_DATA_TAGS: Final = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_SC_EQUIPMENT_TAGS: Final = (
    0x00080064,  # Conversion Type
    0x00181010,  # Secondary Capture Device ID
    0x00181012,  # Date of Secondary Capture
    0x00181014,  # Time of Secondary Capture
    0x00181016,  # Secondary Capture Device Manufacturer
    0x00181018,  # Secondary Capture Device Manufacturer's Model Name
    0x00181019,  # Secondary Capture Device Software Versions
    0x00181022,  # Video Image Format Acquired
    0x00181023,  # Digital Image Format Acquired
)


def _family(sop_class: str) -> str | None:
    """The first component after ``…1.1.`` of an image storage SOP class, else ``None``."""
    if not sop_class.startswith(_IMAGE_STORAGE):
        return None
    return sop_class[len(_IMAGE_STORAGE) :].split(".", 1)[0]


def _sop_class(ds: Dataset) -> str:
    values = strings(ds, _SOP_CLASS_UID)
    if not values:
        meta = getattr(ds, "file_meta", None)
        values = strings(meta, _MEDIA_SOP_CLASS_UID) if isinstance(meta, Dataset) else None
    return values[0] if values else ""


def _upper(ds: Dataset, tag: int) -> tuple[str, ...]:
    return tuple(v.strip().upper() for v in strings(ds, tag) or ())


def screen_header(ds: Dataset, *, require_pixel_data: bool = True) -> Exclusion | None:
    """The first header rule (see the module docstring) that excludes ``ds``, else ``None``.

    ``require_pixel_data=False`` screens a header read without its pixels (``dcmread(...,
    stop_before_pixels=True)``); the full instance must still be screened again, or
    decoded, before it is used.
    """
    sop_class = _sop_class(ds)
    family = _family(sop_class)
    modality = _upper(ds, _MODALITY)
    if family in _NON_IMAGE_FAMILIES or _NON_IMAGE_MODALITIES.intersection(modality):
        return Exclusion.NON_IMAGE_OBJECT
    if require_pixel_data and not any(has_element(ds, t) for t in _PIXEL_DATA_TAGS):
        return Exclusion.NON_IMAGE_OBJECT
    flag = strings(ds, _BURNED_IN_ANNOTATION)
    if flag is not None and tuple(v.strip().upper() for v in flag) != ("NO",):
        return Exclusion.BURNED_IN_FLAG
    if family in _TEXT_PRONE_FAMILIES or _TEXT_PRONE_MODALITIES.intersection(modality):
        return Exclusion.MODALITY_US_SC_OT
    words = {w for v in _upper(ds, _IMAGE_TYPE) for w in _WORD_SPLIT.split(v)}
    if words & _SECONDARY_WORDS:
        return Exclusion.IMAGE_TYPE_SECONDARY
    if any(has_element(ds, t) for t in _SC_EQUIPMENT_TAGS):
        return Exclusion.SC_DEVICE
    return None


# --- OCR -----------------------------------------------------------------------------------

MIN_JUSTIFICATION_CHARS: Final = 10
TESSERACT_INSTALL: Final = "apt-get install tesseract-ocr tesseract-ocr-eng"
_CODE_STRING: Final = re.compile(r"[A-Z0-9 _]{1,16}")  # PS3.5 6.2, VR CS
_LANGUAGE: Final = "eng"
# PSM 3, fully automatic page segmentation (without orientation detection).
_TESSERACT_CONFIG: Final = "--psm 3"
# Between the image and its negative (see OcrScreen._prepare): white, so neither copy's
# text touches the other.
_GAP: Final = 16


class OcrScreen:
    """Looks for burned-in text with Tesseract; on for every modality unless disabled.

    Args:
        disabled: modality code -> the hospital's written justification for not running
            OCR on that modality (at least :data:`MIN_JUSTIFICATION_CHARS` characters).
            Every other modality, including ones nobody anticipated, is screened.
        min_confidence: Tesseract word confidence (0-100) from which a word counts.
        min_chars: how many alphanumeric characters, summed over counting words, mean
            "text found".
        working_size: images whose longer side exceeds this are downscaled (area average)
            to it first; smaller ones are never upscaled, which only adds noise words.
        timeout_s: per-image limit on Tesseract; exceeding it is an error, not a pass.

    Raises:
        ConfigError: a justification is missing or too short, or a modality is not a code.
        DependencyError: the ``tesseract`` binary or its English data is missing.

    The defaults were measured on the synthetic archive (tests/privacy/test_screen.py
    prints the catch and false-positive rates on a small one).
    """

    def __init__(
        self,
        *,
        disabled: Mapping[str, str] | None = None,
        min_confidence: float = 75.0,
        min_chars: int = 4,
        working_size: int = 1024,
        timeout_s: float = 60.0,
    ) -> None:
        checked: dict[str, str] = {}
        for modality, why in (disabled or {}).items():
            code = str(modality).strip().upper()
            if not _CODE_STRING.fullmatch(code):
                raise ConfigError("OCR can only be disabled per DICOM modality code (CT, MR, DX …)")
            if not isinstance(why, str) or len(why.strip()) < MIN_JUSTIFICATION_CHARS:
                raise ConfigError(
                    f"disabling OCR for {code} needs a written justification of at least "
                    f"{MIN_JUSTIFICATION_CHARS} characters in the node config"
                )
            checked[code] = why.strip()
        if not 0.0 <= min_confidence <= 100.0 or min_chars < 1 or working_size < 32:
            raise UsageError("min_confidence is 0-100, min_chars >= 1, working_size >= 32")
        self._disabled = MappingProxyType(checked)
        self._min_confidence = float(min_confidence)
        self._min_chars = int(min_chars)
        self._working_size = int(working_size)
        self._timeout_s = float(timeout_s)
        _check_tesseract()

    @property
    def disabled(self) -> Mapping[str, str]:
        """Modality -> written justification, for the view and the audit log."""
        return self._disabled

    def enabled_for(self, modality: str) -> bool:
        """Whether images of ``modality`` are screened (every modality not disabled)."""
        return modality.strip().upper() not in self._disabled

    def has_text(self, image: npt.NDArray[np.floating], modality: str) -> bool:
        """Whether Tesseract reads text in ``image`` (float in [0, 1], H x W, display sense).

        Returns ``False`` without looking when OCR is disabled for ``modality``.

        Raises:
            DataError: the image is not a finite 2-D array, or Tesseract failed on it
                (the caller excludes the instance: a failure is never a pass).
            DependencyError: Tesseract disappeared since construction.
        """
        if not self.enabled_for(modality):
            return False
        data = _run_tesseract(self._prepare(image), self._timeout_s)
        found = 0
        for text, conf in zip(data["text"], data["conf"], strict=True):
            if float(str(conf)) >= self._min_confidence:
                found += sum(ch.isalnum() for ch in str(text))
        return found >= self._min_chars

    def _prepare(self, image: npt.NDArray[np.floating]) -> Image.Image:
        """Downscale to the working size, stretch to 8 bits, and stack over its negative.

        One Tesseract run then sees the text in both polarities (light on dark and dark on
        light), and text at the image's bottom edge no longer touches an edge. Measured on
        the synthetic archive and drawn text: this layout with PSM 3 caught every case the
        alternatives caught (PSM 11, a plain or black-framed single image, two separate
        runs), and runs once instead of twice.
        """
        arr = np.asarray(image)
        if arr.ndim != 2 or min(arr.shape) < 1 or not np.issubdtype(arr.dtype, np.number):
            raise DataError("OCR needs a non-empty 2-D grey image")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise DataError("OCR needs finite pixel values")
        rows, cols = arr.shape
        scale = self._working_size / max(rows, cols)
        picture = Image.fromarray(arr)  # float32 -> mode "F"
        if scale < 1.0:
            size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
            picture = picture.resize(size, Image.Resampling.BOX)
        small = np.asarray(picture, dtype=np.float32)
        # Min-max, not percentiles: burned-in text is at the extremes, and clipping the
        # extremes merges dark text with a dark background.
        lo, hi = float(small.min()), float(small.max())
        span = max(hi - lo, 1e-6)
        grey = np.clip((small - lo) * (255.0 / span), 0.0, 255.0).astype(np.uint8)
        gap = np.full((_GAP, grey.shape[1]), 255, dtype=np.uint8)
        return Image.fromarray(np.vstack([grey, gap, 255 - grey]))  # uint8 -> mode "L"


def _check_tesseract() -> None:
    command = pytesseract.pytesseract.tesseract_cmd
    if shutil.which(command) is None:
        raise DependencyError(
            f"the OCR screen needs Tesseract, which is not installed; run: {TESSERACT_INSTALL}"
        )
    try:
        languages = pytesseract.get_languages(config="")
    except (OSError, pytesseract.TesseractError) as exc:
        raise DependencyError(
            f"Tesseract does not run; reinstall it with: {TESSERACT_INSTALL}"
        ) from exc
    if _LANGUAGE not in languages:
        raise DependencyError(
            f"Tesseract has no English data; install it with: {TESSERACT_INSTALL}"
        )


def _run_tesseract(picture: Image.Image, timeout_s: float) -> dict[str, list[object]]:
    try:
        data: dict[str, list[object]] = pytesseract.image_to_data(
            picture,
            lang=_LANGUAGE,
            config=_TESSERACT_CONFIG,
            output_type=pytesseract.Output.DICT,
            timeout=timeout_s,
        )
    except pytesseract.TesseractNotFoundError as exc:
        raise DependencyError(
            f"Tesseract is no longer installed; run: {TESSERACT_INSTALL}"
        ) from exc
    except (RuntimeError, OSError, pytesseract.TesseractError) as exc:
        # pytesseract signals its timeout with RuntimeError; the message holds no pixels.
        raise DataError("OCR could not finish on an image; it is excluded") from exc
    return data
