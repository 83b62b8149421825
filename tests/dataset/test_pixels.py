"""Display pipeline, resampling and storage of view images (rapha.dataset.pixels)."""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from rapha.dataset.pixels import (
    PixelDType,
    PixelReason,
    dequantize,
    quantize,
    resample,
    to_display,
)
from rapha.demo.archive import generate_archive
from rapha.errors import DataError


def _sample_files() -> list[Path]:
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        # pydicom warns that files it could download are missing: we use what is installed.
        warnings.simplefilter("ignore")
        found = get_testdata_files("*")
    return sorted((Path(f) for f in found if Path(f).is_file()), key=lambda p: p.name)


SAMPLES = _sample_files()


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def _outcome(ds: Dataset) -> NDArray[np.float32] | DataError:
    """to_display's result or its DataError; asserts nothing else escapes, warnings included."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result: NDArray[np.float32] | DataError = to_display(ds)
        except DataError as exc:
            result = exc
    assert caught == [], [str(w.message) for w in caught]
    return result


def _grey(
    pixels: NDArray[np.integer],
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    **attributes: object,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.set_pixel_data(pixels, photometric, bits_stored)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _roundtrip(ds: Dataset, syntax: UID) -> Dataset:
    """Write ``ds`` in ``syntax`` and read it back, as a PACS export would deliver it."""
    if syntax.is_compressed:
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


RAMP = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 2) % 4096


# --- every sample file -----------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_sample_file_gives_a_unit_image_or_a_counted_reason(path: Path) -> None:
    # Prepare
    ds = _read(path)

    # Execute
    outcome = _outcome(ds)

    # Assert
    if isinstance(outcome, DataError):
        assert str(outcome) in {r.value for r in PixelReason}
    else:
        assert outcome.dtype == np.float32
        assert outcome.ndim == 2
        assert outcome.shape == (ds.Rows, ds.Columns)
        assert np.all(np.isfinite(outcome))
        assert outcome.min() >= 0.0
        assert outcome.max() <= 1.0


def test_sample_files_cover_every_grey_transfer_syntax() -> None:
    # Prepare
    expected = {
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.1",  # explicit VR little endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.5",  # RLE lossless
        "1.2.840.10008.1.2.4.51",  # JPEG extended (12-bit)
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    }

    # Execute
    decoded = set()
    for path in SAMPLES:
        ds = _read(path)
        if isinstance(_outcome(ds), np.ndarray):
            decoded.add(str(ds.file_meta.TransferSyntaxUID))

    # Assert
    assert expected <= decoded


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SC_rgb.dcm", PixelReason.COLOUR),
        ("OT-PAL-8-face.dcm", PixelReason.COLOUR),
        ("SC_ybr_full_uncompressed.dcm", PixelReason.COLOUR),
        ("emri_small.dcm", PixelReason.MULTIFRAME),
        ("rtplan.dcm", PixelReason.NO_PIXELS),
        ("MR_truncated.dcm", PixelReason.UNDECODABLE),
    ],
)
def test_unusable_objects_are_refused_with_their_reason(name: str, reason: PixelReason) -> None:
    # Prepare
    path = next(p for p in SAMPLES if p.name == name)

    # Execute
    outcome = _outcome(_read(path))

    # Assert
    assert isinstance(outcome, DataError)
    assert str(outcome) == reason.value


def test_corrupt_compressed_pixels_are_undecodable() -> None:
    # Prepare
    ds = _roundtrip(_grey(RAMP), JPEG2000Lossless)
    fragment = b"\xff\x4f\xff\x51" + bytes(range(256)) * 4
    ds.PixelData = encapsulate([fragment])

    # Execute
    outcome = _outcome(ds)

    # Assert
    assert isinstance(outcome, DataError)
    assert str(outcome) == PixelReason.UNDECODABLE.value


def test_header_disagreeing_with_the_pixels_is_undecodable() -> None:
    # Prepare
    ds = _grey(RAMP)
    ds.Rows = 4000

    # Execute
    outcome = _outcome(ds)

    # Assert
    assert isinstance(outcome, DataError)


# --- transfer syntaxes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless],
    ids=lambda s: s.name,
)
def test_lossless_encodings_give_the_same_display_image(syntax: UID) -> None:
    # Prepare
    reference = to_display(_grey(RAMP))
    encoded = _roundtrip(_grey(RAMP), syntax)

    # Execute
    image = to_display(encoded)

    # Assert
    assert encoded.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(image, reference)


def test_jpeg_baseline_grey_image_decodes_through_the_plugins() -> None:
    # Prepare
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    jpeg = io.BytesIO()
    Image.fromarray(ramp, mode="L").save(jpeg, format="JPEG", quality=95)
    ds = _grey(ramp, bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"

    # Execute
    image = to_display(ds)

    # Assert
    assert image.shape == ramp.shape
    np.testing.assert_allclose(image, ramp / 252.0, atol=0.03)


# --- grey-scale pipeline --------------------------------------------------------------------


def test_missing_window_stretches_the_image_range() -> None:
    # Prepare
    pixels = np.full((8, 8), 700, dtype=np.uint16)
    pixels[0, 0], pixels[7, 7] = 100, 1300

    # Execute
    image = to_display(_grey(pixels))

    # Assert
    assert image[0, 0] == 0.0
    assert image[7, 7] == 1.0
    assert image[3, 3] == pytest.approx(0.5)


def test_linear_window_clips_as_ps3_3_c_11_2_1_2_says() -> None:
    # Prepare: centre 1000, width 200 -> 0 at or below 900, 1 above 1099.
    ds = _grey(RAMP, WindowCenter=1000, WindowWidth=200)

    # Execute
    image = to_display(ds)

    # Assert
    values = RAMP.astype(np.float64)
    assert np.all(image[values <= 900] == 0.0)
    assert np.all(image[values > 1099] == 1.0)
    inside = (values > 900) & (values <= 1099)
    expected = (values[inside] - 999.5) / 199 + 0.5
    np.testing.assert_allclose(image[inside], expected, atol=1e-6)


def test_window_applies_to_rescaled_values() -> None:
    # Prepare: Hounsfield units = 2 * stored - 1024; window on HU 0 +- 50.
    ds = _grey(
        RAMP,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=0,
        WindowWidth=100,
        VOILUTFunction="LINEAR_EXACT",
    )

    # Execute
    image = to_display(ds)

    # Assert
    hu = RAMP * 2.0 - 1024
    assert np.all(image[hu <= -50] == 0.0)
    assert np.all(image[hu > 50] == 1.0)
    middle = np.abs(hu) < 40
    np.testing.assert_allclose(image[middle], hu[middle] / 100 + 0.5, atol=1e-6)


def test_first_of_several_windows_is_used() -> None:
    # Prepare
    ds = _grey(RAMP, WindowCenter=[1000, 3000], WindowWidth=[200, 400])
    first = to_display(_grey(RAMP, WindowCenter=1000, WindowWidth=200))

    # Execute
    image = to_display(ds)

    # Assert
    np.testing.assert_array_equal(image, first)


def test_unusable_first_window_falls_back_to_the_next() -> None:
    # Prepare
    ds = _grey(RAMP, WindowCenter=[1000, 3000], WindowWidth=[0, 400])
    second = to_display(_grey(RAMP, WindowCenter=3000, WindowWidth=400))

    # Execute
    image = to_display(ds)

    # Assert
    np.testing.assert_array_equal(image, second)


def test_sigmoid_window_is_one_half_at_the_centre() -> None:
    # Prepare
    pixels = np.array([[0, 2000, 4000]], dtype=np.uint16)
    ds = _grey(pixels, WindowCenter=2000, WindowWidth=400, VOILUTFunction="SIGMOID")

    # Execute
    image = to_display(ds)

    # Assert
    assert image[0, 1] == pytest.approx(0.5, abs=1e-6)
    assert image[0, 0] < 1e-6
    assert image[0, 2] > 1 - 1e-6


def test_voi_lut_sequence_is_applied() -> None:
    # Prepare: a 256-entry LUT that inverts 8-bit input (PS3.3 C.11.2.1.1).
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = _grey(pixels, bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(255, -1, -1))
    ds.VOILUTSequence = Sequence([item])

    # Execute
    image = to_display(ds)

    # Assert
    np.testing.assert_allclose(image, (255 - pixels) / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    ("window", "function"),
    [(None, None), ((1400, 600), "LINEAR_EXACT"), ((1400, 600), "LINEAR")],
)
def test_monochrome1_and_monochrome2_of_the_same_content_look_the_same(
    window: tuple[int, int] | None, function: str | None
) -> None:
    # Prepare: MONOCHROME1 stores M - v for MONOCHROME2's v; its window is mirrored too
    # (LINEAR's centre is offset by one: PS3.3 C.11.2.1.2 centres on c - 0.5).
    top = 4095
    mono2 = _grey(RAMP)
    mono1 = _grey((top - RAMP).astype(np.uint16), photometric="MONOCHROME1")
    if window is not None and function is not None:
        centre, width = window
        mono2.WindowCenter, mono2.WindowWidth, mono2.VOILUTFunction = centre, width, function
        mirrored = top - centre + (1 if function == "LINEAR" else 0)
        mono1.WindowCenter, mono1.WindowWidth, mono1.VOILUTFunction = mirrored, width, function

    # Execute
    image2 = to_display(mono2)
    image1 = to_display(mono1)

    # Assert
    np.testing.assert_allclose(image1, image2, atol=1e-6)
    assert image2[0, 0] == 0.0  # the smallest MONOCHROME2 value is black


def test_signed_pixels_use_their_sign() -> None:
    # Prepare
    pixels = np.array([[-1000, 0, 1000]], dtype=np.int16)

    # Execute
    image = to_display(_grey(pixels, bits_stored=16))

    # Assert
    np.testing.assert_allclose(image, [[0.0, 0.5, 1.0]], atol=1e-6)


# --- the direct (linear) path against the table path ----------------------------------------


def _through_the_table(ds: Dataset) -> Dataset:
    """A copy of ``ds`` with an all-zero VOI LUT item, which is unusable and so ignored.

    The image is the same by definition, but such a dataset is displayed through the
    table path (one lookup per stored value) instead of the direct per-pixel arithmetic
    used for a rescale and a linear window.
    """
    routed = copy.deepcopy(ds)
    item = Dataset()
    item.LUTDescriptor = [2, 0, 16]
    item.LUTData = [0, 0]
    routed.VOILUTSequence = Sequence([item])
    return routed


REAL_GREY = [
    "RG1_UNCR.dcm",  # MONOCHROME1 CR, window, 15 of 16 bits stored
    "RG3_UNCR.dcm",  # MONOCHROME1 CR, 10 bits stored
    "RG1_J2KR.dcm",  # MONOCHROME1, JPEG 2000
    "MR2_UNCR.dcm",  # fractional rescale slope and intercept
    "693_UNCR.dcm",  # signed CT, rescale and window
    "CT_small.dcm",  # rescale, no window: the image's own range
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "image_dfl.dcm",  # 8-bit, deflated, no window
    "JPGExtended.dcm",
    "liver_1frame.dcm",
]


@pytest.mark.parametrize("name", REAL_GREY)
def test_real_images_look_the_same_through_the_table(name: str) -> None:
    # Prepare
    path = next((p for p in SAMPLES if p.name == name), None)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    ds = _read(path)
    routed = _through_the_table(ds)

    # Execute
    direct = to_display(ds)
    table = to_display(routed)

    # Assert
    assert direct.dtype == table.dtype == np.float32
    np.testing.assert_allclose(direct, table, rtol=0, atol=1e-6)
    assert 0.0 <= direct.min() <= direct.max() <= 1.0


SIGNED = RAMP.astype(np.int16) - 2000
TABLE_CASES: list[tuple[str, NDArray[np.integer], dict[str, object]]] = [
    ("range", RAMP, {}),
    ("range, MONOCHROME1", RAMP, {"PhotometricInterpretation": "MONOCHROME1"}),
    ("range, negative slope", RAMP, {"RescaleSlope": -0.5, "RescaleIntercept": 7}),
    ("linear", RAMP, {"WindowCenter": 1000, "WindowWidth": 200}),
    (
        "linear, MONOCHROME1",
        RAMP,
        {"WindowCenter": 1000, "WindowWidth": 201, "PhotometricInterpretation": "MONOCHROME1"},
    ),
    (
        "linear, inverse shape",
        RAMP,
        {"WindowCenter": 2000, "WindowWidth": 3000, "PresentationLUTShape": "INVERSE"},
    ),
    (
        "linear exact",
        RAMP,
        {"WindowCenter": 1000.25, "WindowWidth": 0.5, "VOILUTFunction": "LINEAR_EXACT"},
    ),
    ("narrow window far from zero", RAMP, {"WindowCenter": 3000.3, "WindowWidth": 7}),
    (
        "rescaled, signed",
        SIGNED,
        {
            "RescaleSlope": 0.37,
            "RescaleIntercept": -1024.6,
            "WindowCenter": -1500,
            "WindowWidth": 400,
        },
    ),
    (
        "rescaled, negative slope",
        RAMP,
        {
            "RescaleSlope": -2,
            "RescaleIntercept": 100,
            "WindowCenter": -3000,
            "WindowWidth": 900,
            "VOILUTFunction": "LINEAR_EXACT",
        },
    ),
    ("second window", RAMP, {"WindowCenter": [1000, 3000], "WindowWidth": [0, 400]}),
    ("window beyond the data", RAMP, {"WindowCenter": 9000, "WindowWidth": 100}),
    ("step (width 1)", RAMP, {"WindowCenter": 2000, "WindowWidth": 1}),
    ("sigmoid", RAMP, {"WindowCenter": 2000, "WindowWidth": 400, "VOILUTFunction": "SIGMOID"}),
    ("8-bit", (RAMP % 256).astype(np.uint8), {"WindowCenter": 100, "WindowWidth": 50}),
]


@pytest.mark.parametrize(
    ("pixels", "attributes"),
    [(pixels, attributes) for _, pixels, attributes in TABLE_CASES],
    ids=[case for case, _, _ in TABLE_CASES],
)
def test_rescale_and_window_variants_look_the_same_through_the_table(
    pixels: NDArray[np.integer], attributes: dict[str, object]
) -> None:
    # Prepare
    ds = _grey(pixels, bits_stored=8 if pixels.dtype.itemsize == 1 else 12)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)

    # Execute
    direct = to_display(ds)
    table = to_display(_through_the_table(ds))

    # Assert
    np.testing.assert_allclose(direct, table, rtol=0, atol=1e-6)
    assert 0.0 <= direct.min() <= direct.max() <= 1.0


@pytest.mark.parametrize(
    ("clean", "bits"),
    [(RAMP, 12), ((RAMP.astype(np.int16) - 2048), 12)],
    ids=["unsigned", "signed"],
)
def test_bits_above_bits_stored_are_ignored(clean: NDArray[np.integer], bits: int) -> None:
    # Prepare: the same values with the 4 unused high bits flipped (PS3.5 8.1.1).
    reference = _grey(clean, bits_stored=bits, WindowCenter=100, WindowWidth=3000)
    dirty = _grey(clean, bits_stored=bits, WindowCenter=100, WindowWidth=3000)
    dirty.PixelData = (clean.view(np.uint16) ^ np.uint16(0xF000)).tobytes()

    # Execute
    image = to_display(dirty)

    # Assert
    np.testing.assert_array_equal(image, to_display(reference))


# --- resampling and storage -----------------------------------------------------------------


def test_downscale_by_an_integer_factor_is_the_block_mean() -> None:
    # Prepare
    image = np.arange(16, dtype=np.float32).reshape(4, 4) / 15

    # Execute
    small = resample(image, (2, 2))

    # Assert
    expected = image.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(small, expected, atol=1e-7)


def test_downscale_by_a_fraction_weights_cut_pixels_by_their_overlap() -> None:
    # Prepare: 3 -> 2 pixels; each output covers 1.5 input pixels.
    row = np.array([[0.0, 0.6, 0.9]], dtype=np.float32)

    # Execute
    out = resample(row, (1, 2))

    # Assert
    np.testing.assert_allclose(out, [[(0.0 + 0.5 * 0.6) / 1.5, (0.5 * 0.6 + 0.9) / 1.5]], atol=1e-7)


def test_upscale_is_bilinear_between_pixel_centres() -> None:
    # Prepare
    row = np.array([[0.0, 1.0]], dtype=np.float32)

    # Execute
    out = resample(row, (1, 4))

    # Assert
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]], atol=1e-7)


def test_upscale_matches_torch_bilinear() -> None:
    # Prepare
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(7).random((23, 31), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None, None], size=(50, 64), mode="bilinear", align_corners=False
    )[0, 0].numpy()

    # Execute
    out = resample(image, (50, 64))

    # Assert
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_resample_is_deterministic_and_keeps_the_unit_range() -> None:
    # Prepare
    image = np.random.default_rng(3).random((517, 389), dtype=np.float32)

    # Execute
    first = resample(image, (64, 80))
    second = resample(image.copy(), (64, 80))

    # Assert
    assert first.tobytes() == second.tobytes()
    assert first.dtype == np.float32
    assert first.min() >= 0.0
    assert first.max() <= 1.0
    assert first.mean() == pytest.approx(image.mean(), abs=1e-3)


def _area_reference(n: int, out: int) -> NDArray[np.float64]:
    """The exact area weights: overlap of each input pixel with each output bin, in float64."""
    edges = np.arange(out + 1) * n / out
    pixel = np.arange(n)
    overlap = np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel)
    weights: NDArray[np.float64] = np.clip(overlap, 0.0, None) * out / n
    return weights


def test_downscale_by_integer_factors_matches_torch_area() -> None:
    # Prepare
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(11).random((448, 672), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None, None], size=(224, 224), mode="area"
    )[0, 0].numpy()

    # Execute
    out = resample(image, (224, 224))

    # Assert
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1955, 1841), (224, 224)),
        ((517, 389), (64, 80)),
        ((2000, 300), (7, 250)),
        ((1760, 1760), (3, 1)),
    ],
    ids=["radiograph", "small", "mixed", "more-than-15x"],
)
def test_downscale_is_the_exact_area_mean(shape: tuple[int, int], size: tuple[int, int]) -> None:
    # Prepare
    image = np.random.default_rng(5).random(shape, dtype=np.float32)
    rows, columns = _area_reference(shape[0], size[0]), _area_reference(shape[1], size[1])

    # Execute
    out = resample(image, size)

    # Assert
    expected = rows @ image.astype(np.float64) @ columns.T
    assert out.shape == size
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(224, 224), (97, 301), (1, 1), (300, 2)])
def test_white_stays_white_and_nothing_leaves_the_unit_range(size: tuple[int, int]) -> None:
    # Prepare: saturated areas are where rounding could overshoot 1.
    ones = np.ones((1955, 1841), dtype=np.float32)
    half = ones.copy()
    half[:, ::2] = 0.0

    # Execute
    white = resample(ones, size)
    mixed = resample(half, size)

    # Assert
    assert np.all(white == 1.0)
    assert 0.0 <= mixed.min() <= mixed.max() <= 1.0


def test_resample_to_the_same_size_returns_a_copy() -> None:
    # Prepare
    image = np.random.default_rng(2).random((40, 30), dtype=np.float32)

    # Execute
    out = resample(image, (40, 30))

    # Assert
    np.testing.assert_array_equal(out, image)
    assert not np.shares_memory(out, image)


@pytest.mark.parametrize("dtype", list(PixelDType))
def test_quantize_round_trips_within_half_a_step(dtype: PixelDType) -> None:
    # Prepare
    image = np.linspace(0.0, 1.0, 1001, dtype=np.float32).reshape(7, 143)

    # Execute
    stored = quantize(image, dtype)
    back = dequantize(stored)

    # Assert
    assert stored.dtype == dtype.numpy
    assert stored.max() == dtype.scale
    tolerance = 0.5 / dtype.scale if dtype is not PixelDType.FLOAT16 else 1e-3
    np.testing.assert_allclose(back, image, atol=tolerance)


def test_quantize_rejects_nothing_but_clips_out_of_range_values() -> None:
    # Prepare
    image = np.array([[-0.5, 0.5, 1.5]], dtype=np.float32)

    # Execute
    stored = quantize(image, PixelDType.UINT8)

    # Assert
    assert stored.tolist() == [[0, 128, 255]]


def test_display_then_resample_of_real_radiograph_is_a_unit_image() -> None:
    # Prepare
    path = next((p for p in SAMPLES if p.name == "RG1_UNCR.dcm"), None)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    image = to_display(_read(path))

    # Execute
    small = resample(image, (224, 224))

    # Assert
    assert small.shape == (224, 224)
    assert 0.0 <= small.min() < small.max() <= 1.0


def test_synthetic_archive_images_decode_or_are_counted(tmp_path: Path) -> None:
    # Prepare
    summary = generate_archive(tmp_path / "archive", studies=20, seed=5, size_range=(64, 128))
    truth = json.loads(summary.truth_json.read_text())
    corrupt = {tmp_path / "archive" / p for p in truth["corrupt_files"]}
    paths = sorted((tmp_path / "archive" / "dicom").rglob("*.dcm"))

    # Execute
    outcomes: dict[Path, NDArray[np.float32] | DataError] = {}
    for path in paths:
        try:
            ds = _read(path)
        except Exception:  # unreadable files are the source's to count
            assert path in corrupt
            continue
        outcomes[path] = _outcome(ds)

    # Assert
    decoded = [o for o in outcomes.values() if isinstance(o, np.ndarray)]
    assert len(decoded) >= len(paths) // 2
    for path, outcome in outcomes.items():
        if path in corrupt:
            assert isinstance(outcome, DataError)
        elif isinstance(outcome, np.ndarray):
            assert np.all(np.isfinite(outcome))
            assert 0.0 <= outcome.min() <= outcome.max() <= 1.0
