"""The image objects of one study, IOD by IOD, headers and stored pixels.

Each builder returns :class:`Image` objects whose dataset holds every attribute but Pixel
Data; :mod:`rapha.demo.archive` encodes the pixels in the chosen transfer syntax. Module
and attribute rules are cited from PS3.3 where they decide a value.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

from rapha.demo import pixels as px
from rapha.demo.burnin import burn_text
from rapha.demo.headers import SeriesInfo, StudyInfo, base_dataset
from rapha.demo.identities import random_uid
from rapha.demo.phantom import render_radiograph

__all__ = ["Burn", "Image", "chest_images", "ct_images", "mr_images", "sc_images", "us_images"]

PixelArray = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
PixelRng = Callable[[int], np.random.Generator]


@dataclass(frozen=True)
class Burn:
    """Burned-in text for a study: the text layouts to draw and whether to admit it."""

    layouts: tuple[tuple[str, ...], ...]
    flagged: bool


@dataclass(frozen=True)
class Image:
    """One image object before encoding.

    ``pixels`` are the stored values: ``(rows, cols)`` monochrome in the sense of the
    dataset's Photometric Interpretation, or ``(rows, cols, 3)`` RGB (Planar Configuration
    0). ``burned_lines``/``font_px`` describe burned-in text, if any.
    """

    dataset: Dataset
    pixels: PixelArray
    view: str | None
    burned_lines: tuple[str, ...] | None = None
    font_px: int | None = None


def _code(code: Code) -> Dataset:
    """A Code Sequence item (PS3.3 Table 8.8-1, Basic Code Sequence Macro)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _later(time: str, seconds: int) -> str:
    t = dt.datetime.strptime(time, "%H%M%S") + dt.timedelta(seconds=seconds)
    return t.strftime("%H%M%S")


def _series(
    rng: np.random.Generator,
    study: StudyInfo,
    number: int,
    what: str,
    *,
    frame_of_reference: bool = False,
) -> SeriesInfo:
    """A series whose description and protocol name mention the patient, as typed."""
    p = study.patient
    return SeriesInfo(
        uid=random_uid(rng),
        number=number,
        description=f"{what} {p.family_name}^{p.given_name}",
        protocol=f"{what} ({p.given_name} {p.family_name})",
        time=_later(study.time, 60 * number + int(rng.integers(0, 50))),
        frame_of_reference_uid=random_uid(rng) if frame_of_reference else None,
    )


def _comments(study: StudyInfo, note: str) -> str:
    p = study.patient
    return f"{note}. Patient {p.given_name} {p.family_name}, {p.mrn}."


def _image_pixel(ds: Dataset, pixels: PixelArray, bits_stored: int, photometric: str) -> None:
    """Image Pixel module, C.7.6.3, except Pixel Data."""
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def _voi(ds: Dataset, stored: PixelArray, slope: float = 1.0, intercept: float = 0.0) -> None:
    """VOI LUT module, C.11.2: one window over the body of the histogram."""
    center, width = px.window(stored, slope, intercept)
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = "DEFAULT"


def _burn(
    pixels: PixelArray, burn: Burn | None, white: int, corner: int
) -> tuple[PixelArray, tuple[str, ...] | None, int | None]:
    if burn is None:
        return pixels, None, None
    out, size, lines = burn_text(pixels, burn.layouts, white=white, corner=corner)
    return out, lines, size


def _shape(
    rng: np.random.Generator, size_range: tuple[int, int], portrait: float
) -> tuple[int, int]:
    """Rows and columns: the longer side in ``size_range``, aspect 0.78-1.0."""
    long = int(rng.integers(size_range[0], size_range[1] + 1))
    short = max(16, round(long * rng.uniform(0.78, 1.0)))
    return (long, short) if rng.random() < portrait else (short, long)


_CHEST_VIEWS: Mapping[str, tuple[str, str, str, Code]] = {
    # view -> (Patient Orientation row\\column, C.7.6.1.1.1; description; distance in mm;
    # View Code, CID 4010)
    "PA": ("L\\F", "CHEST PA", "1800", codes.SCT.PosteroAnterior),
    "AP": ("L\\F", "CHEST AP PORTABLE", "1000", codes.SCT.AnteroPosterior),
    "LL": ("P\\F", "CHEST LATERAL", "1800", codes.SCT.LeftLateral),
}


def chest_images(
    rng: np.random.Generator,
    pixel_rng: PixelRng,
    study: StudyInfo,
    *,
    findings: Mapping[str, bool],
    burn: Burn | None,
    size_range: tuple[int, int],
) -> list[Image]:
    """A chest radiograph study: PA, PA + lateral, or portable AP; DX or CR.

    DX follows the DX IOD for presentation (A.26.1; DX Image C.8.11.3, DX Detector
    C.8.11.4, DX Anatomy Imaged C.8.11.5); CR the CR IOD (A.2; CR Series C.8.1.1, CR Image
    C.8.1.2). The true ``findings`` are drawn into every view.
    """
    dx = study.modality == "DX"
    frontal = "PA" if rng.random() < 0.7 else "AP"
    views = [frontal, "LL"] if frontal == "PA" and rng.random() < 0.45 else [frontal]
    bits = int(rng.choice([12, 14, 16])) if dx else int(rng.choice([12, 12, 16]))
    mono1 = rng.random() < (0.25 if dx else 0.5)
    photometric = "MONOCHROME1" if mono1 else "MONOCHROME2"
    cr_rescale = (not dx) and rng.random() < 0.5
    cr_flag_absent = (not dx) and rng.random() < 0.5
    corner = int(rng.integers(3))
    rows, cols = _shape(rng, size_range, portrait=0.75)
    spacing = round(430.0 / max(rows, cols), 4)
    max_value = 2**bits - 1
    images: list[Image] = []
    for number, view in enumerate(views, start=1):
        orientation, what, distance, view_code = _CHEST_VIEWS[view]
        series = _series(rng, study, number, f"XR {what}")
        content_time = _later(series.time, int(rng.integers(5, 40)))
        sop_class = (
            DigitalXRayImageStorageForPresentation if dx else ComputedRadiographyImageStorage
        )
        ds = base_dataset(
            study,
            series,
            sop_class_uid=sop_class,
            sop_instance_uid=random_uid(rng),
            instance_number=1,
            content_time=content_time,
            image_comments=_comments(
                study, f"{what}, {rng.choice(['inspiration', 'erect', 'seated'])}"
            ),
        )
        raw = render_radiograph(
            pixel_rng(number), rows=rows, cols=cols, findings=findings, bits_stored=bits
        )
        burned, lines, font_px = _burn(raw, burn, max_value, corner)
        stored = (max_value - burned).astype(np.uint16) if mono1 else burned
        _image_pixel(ds, stored, bits, photometric)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ViewPosition = view
        ds.PatientOrientation = orientation
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.KVP = "125" if view != "AP" else "90"
        ds.ExposureTime = int(rng.integers(4, 20))
        ds.XRayTubeCurrent = int(rng.integers(200, 500))
        ds.DistanceSourceToDetector = distance
        ds.AcquisitionDateTime = f"{study.date:%Y%m%d}{content_time}"
        if dx:
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImageLaterality = "U"
            ds.AnatomicRegionSequence = DicomSequence([_code(codes.SCT.Chest)])  # CID 4009
            ds.ViewCodeSequence = DicomSequence([_code(view_code)])
            ds.PositionerType = ""  # DX Positioning, Type 2: a chest stand is none of the terms
            # Sign: +1 when higher stored values mean more X-ray intensity (C.8.11.3.1.2).
            ds.PixelIntensityRelationship = "LIN"
            ds.PixelIntensityRelationshipSign = 1 if mono1 else -1
            ds.RescaleIntercept = 0  # DX Image: shall be 0 and 1 (C.8.11.3.1.4)
            ds.RescaleSlope = 1
            ds.RescaleType = "US"
            ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
            ds.LossyImageCompression = "00"
            ds.BurnedInAnnotation = "YES" if burn is not None and burn.flagged else "NO"
            ds.DetectorType = study.device.detector_type
            ds.AcquisitionContextSequence = DicomSequence([])
        else:
            if cr_rescale:  # optional Modality LUT module, C.11.1
                ds.RescaleIntercept = 0
                ds.RescaleSlope = 1
                ds.RescaleType = "US"
            if burn is not None:
                if burn.flagged:
                    ds.BurnedInAnnotation = "YES"
            elif not cr_flag_absent:
                ds.BurnedInAnnotation = "NO"
        _voi(ds, stored)
        images.append(Image(ds, stored, view, lines, font_px))
    return images


_CT_PROTOCOLS: Mapping[str, tuple[str, float, float]] = {
    # body part -> (description, window center, width)
    "CHEST": ("CT CHEST WO CONTRAST", -600.0, 1500.0),
    "ABDOMEN": ("CT ABDOMEN PELVIS", 50.0, 350.0),
    "HEAD": ("CT HEAD WO CONTRAST", 40.0, 80.0),
}


def ct_images(
    rng: np.random.Generator,
    pixel_rng: PixelRng,
    study: StudyInfo,
    *,
    size_range: tuple[int, int],
) -> list[Image]:
    """A short axial CT series (3-5 slices) in the CT Image IOD (A.3; CT Image C.8.2.1,
    Image Plane C.7.6.2), Hounsfield rescale ``stored - 1024``."""
    what, center, width = _CT_PROTOCOLS[study.body_part]
    side = int(rng.integers(size_range[0], size_range[1] + 1))
    count = int(rng.integers(3, 6))
    bits = int(rng.choice([12, 16]))
    thickness = float(rng.choice([1.0, 2.5, 5.0]))
    spacing = round(float(rng.uniform(320.0, 420.0)) / side, 4)
    series = _series(rng, study, 2, what, frame_of_reference=True)
    z0 = float(rng.uniform(-200.0, 0.0))
    images: list[Image] = []
    for n in range(count):
        content_time = _later(series.time, 2 + n)
        ds = base_dataset(
            study,
            series,
            sop_class_uid=CTImageStorage,
            sop_instance_uid=random_uid(rng),
            instance_number=n + 1,
            content_time=content_time,
            image_comments=_comments(study, f"{what}, slice {n + 1}"),
        )
        stored = px.ct_slice(
            pixel_rng(n + 1), side=side, body_part=study.body_part, z=n / count, bits_stored=bits
        )
        _image_pixel(ds, stored, bits, "MONOCHROME2")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"  # General Series, Type 2C for CT and MR
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = round(z0 + n * thickness, 2)
        ds.ImagePositionPatient = [round(-spacing * side / 2, 2), round(-spacing * side / 2, 2), z]
        ds.SliceThickness = thickness
        ds.SliceLocation = z
        ds.RescaleIntercept = px.CT_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.ConvolutionKernel = "B30f"
        ds.WindowCenter = center
        ds.WindowWidth = width
        ds.AcquisitionDateTime = f"{study.date:%Y%m%d}{content_time}"
        images.append(Image(ds, stored, None))
    return images


_MR_PROTOCOLS: Mapping[str, tuple[str, Sequence[float]]] = {
    # body part -> (description, Image Orientation (Patient))
    "HEAD": ("MR BRAIN T2 AX", (1, 0, 0, 0, 1, 0)),
    "KNEE": ("MR KNEE PD COR", (1, 0, 0, 0, 0, -1)),
    "LSPINE": ("MR LSPINE T2 SAG", (0, 1, 0, 0, 0, -1)),
}


def mr_images(
    rng: np.random.Generator,
    pixel_rng: PixelRng,
    study: StudyInfo,
    *,
    size_range: tuple[int, int],
) -> list[Image]:
    """A short 2D spin-echo MR series (3-4 slices) in the MR Image IOD (A.4; MR Image
    C.8.3.1)."""
    what, orientation = _MR_PROTOCOLS[study.body_part]
    side = int(rng.integers(size_range[0], size_range[1] + 1))
    count = int(rng.integers(3, 5))
    spacing = round(float(rng.uniform(200.0, 260.0)) / side, 4)
    series = _series(rng, study, 3, what, frame_of_reference=True)
    field = float(rng.choice([1.5, 3.0]))
    laterality = "L" if rng.random() < 0.5 else "R"
    images: list[Image] = []
    for n in range(count):
        content_time = _later(series.time, 30 + 20 * n)
        ds = base_dataset(
            study,
            series,
            sop_class_uid=MRImageStorage,
            sop_instance_uid=random_uid(rng),
            instance_number=n + 1,
            content_time=content_time,
            image_comments=_comments(study, f"{what}, slice {n + 1}"),
        )
        stored = px.mr_slice(pixel_rng(n + 1), side=side, body_part=study.body_part, z=n / count)
        _image_pixel(ds, stored, 12, "MONOCHROME2")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        if study.body_part == "KNEE":  # General Series: Type 2C for paired body parts
            ds.Laterality = laterality
        ds.PatientPosition = "HFS" if study.body_part != "KNEE" else "FFS"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 4000
        ds.EchoTime = 100 if "T2" in what else 30
        ds.EchoTrainLength = 16
        ds.MagneticFieldStrength = field
        ds.ImagedNucleus = "1H"
        ds.ImagingFrequency = round(42.577 * field, 4)
        ds.SliceThickness = 4
        ds.SpacingBetweenSlices = 4.4
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [
            round(-spacing * side / 2, 2),
            round(-spacing * side / 2, 2),
            round(4.4 * n, 2),
        ]
        ds.SliceLocation = round(4.4 * n, 2)
        _voi(ds, stored)
        images.append(Image(ds, stored, None))
    return images


def us_images(
    rng: np.random.Generator,
    pixel_rng: PixelRng,
    study: StudyInfo,
    *,
    burn: Burn | None,
    size_range: tuple[int, int],
) -> list[Image]:
    """One or two 8-bit abdominal ultrasound frames, RGB or MONOCHROME2, in the US Image
    IOD (A.6; US Image C.8.5.6). Burned In Annotation is ``YES`` on burned frames."""
    rgb = rng.random() < 0.5
    count = int(rng.integers(1, 3))
    cols = int(rng.integers(size_range[0], size_range[1] + 1))
    rows = max(16, round(cols * 0.75))
    series = _series(rng, study, 1, "US ABDOMEN COMPLETE")
    images: list[Image] = []
    for n in range(count):
        content_time = _later(series.time, 15 + 30 * n)
        ds = base_dataset(
            study,
            series,
            sop_class_uid=UltrasoundImageStorage,
            sop_instance_uid=random_uid(rng),
            instance_number=n + 1,
            content_time=content_time,
            image_comments=_comments(study, "Liver and gallbladder"),
        )
        raw = px.ultrasound(pixel_rng(n + 1), rows=rows, cols=cols, rgb=rgb)
        stored, lines, font_px = _burn(raw, burn, 255, 0)
        _image_pixel(ds, stored, 8, "RGB" if rgb else "MONOCHROME2")
        # Value 3 is the region, value 4 the hex mode bits: 0001 = 2D imaging (C.8.5.6.1.1).
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "YES" if burn is not None else "NO"
        ds.TransducerData = ["C5-1", "", ""]
        ds.PatientOrientation = ""  # General Image, Type 2C: unknown for a free-hand probe
        images.append(Image(ds, stored, None, lines, font_px))
    return images


def sc_images(
    rng: np.random.Generator,
    pixel_rng: PixelRng,
    study: StudyInfo,
    *,
    burn: Burn | None,
    size_range: tuple[int, int],
) -> list[Image]:
    """A workstation screenshot of a chest radiograph in the Secondary Capture IOD
    (A.8.1; SC Equipment C.8.6.1 with Conversion Type ``WSD``, SC Image C.8.6.2).

    Burned In Annotation is never written: screenshots rarely admit to it.
    """
    rows, cols = _shape(rng, size_range, portrait=0.5)
    base = render_radiograph(pixel_rng(1), rows=rows, cols=cols, findings={}, bits_stored=12)
    raw = px.screen_capture(base)
    stored, lines, font_px = _burn(raw, burn, 255, 2)
    series = _series(rng, study, 99, "SCREEN CAPTURE")
    content_time = _later(series.time, 5)
    ds = base_dataset(
        study,
        series,
        sop_class_uid=SecondaryCaptureImageStorage,
        sop_instance_uid=random_uid(rng),
        instance_number=1,
        content_time=content_time,
        image_comments=_comments(study, "Key image saved from viewer"),
    )
    _image_pixel(ds, stored, 8, "MONOCHROME2")
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = study.device.manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = study.device.model
    ds.SecondaryCaptureDeviceSoftwareVersions = study.device.software_versions
    ds.DateOfSecondaryCapture = f"{study.date:%Y%m%d}"
    ds.TimeOfSecondaryCapture = content_time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    _voi(ds, stored)
    return [Image(ds, stored, None, lines, font_px)]
