"""From a DICOM dataset to the grey-scale image a model sees, and how it is stored.

The display pipeline follows the DICOM grey-scale pipeline (PS3.4 N.2.1.1) up to the
presentation step:

1. decode the stored values of the first (only) frame, for every transfer syntax pydicom
   supports, through pydicom's native decoders and the pylibjpeg plugins (JPEG baseline,
   extended, lossless, JPEG-LS, JPEG 2000, RLE, deflate, big endian);
2. the Modality LUT or rescale slope/intercept (PS3.3 C.11.1), via
   :func:`pydicom.pixels.apply_modality_lut`;
3. the VOI LUT or window (PS3.3 C.11.2), via :func:`pydicom.pixels.apply_voi_lut` and its
   parts; with several windows the first valid one is used (C.11.2.1.2: the values are
   alternative views, the first is the default), and with none the data's own min/max;
4. MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2: the minimum value is displayed as white), so
   that MONOCHROME1 and MONOCHROME2 encodings of the same content give the same image.

The result is float32 in [0, 1], H x W, where 0 is black. Anything else is refused with a
:class:`~rapha.errors.DataError` whose message is one of the fixed, PHI-free
:class:`PixelReason` values, so a caller can count it as an exclusion reason and go on:
multi-frame and colour images are excluded (not guessed at), and a corrupt or undecodable
object never raises anything but ``DataError`` and never lets a warning escape.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing

from rapha.errors import DataError, UsageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "MAX_PIXELS",
    "PixelDType",
    "PixelReason",
    "dequantize",
    "quantize",
    "resample",
    "to_display",
]

MAX_PIXELS: Final = 1 << 27
"""Largest Rows x Columns decoded (134 M pixels, beyond any mammogram): a larger header is
treated as corrupt rather than allowed to exhaust memory."""

_Presence = Callable[[], NDArray[np.bool_]]
_MONOCHROME: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A probe this many window widths beyond the centre is on the window's flat part for
# LINEAR and LINEAR_EXACT and within 1e-69 of it for SIGMOID (exp(160) still fits a double).
_PROBE_WIDTHS: Final = 40.0


class PixelReason(StrEnum):
    """Why an object yields no image. Each value is the exact ``DataError`` message."""

    NO_PIXELS = "no pixel data"
    MULTIFRAME = "multi-frame image"
    COLOUR = "colour image"
    UNDECODABLE = "undecodable pixel data"


class PixelDType(StrEnum):
    """How view images are stored: the [0, 1] range scaled to the type's full range."""

    UINT8 = "uint8"
    UINT16 = "uint16"
    FLOAT16 = "float16"

    @property
    def numpy(self) -> np.dtype[Any]:
        """The little-endian numpy dtype, so files are identical on every platform."""
        return np.dtype({"uint8": "|u1", "uint16": "<u2", "float16": "<f2"}[self.value])

    @property
    def scale(self) -> int:
        """Stored value of full white: a reader divides by this to get [0, 1] back."""
        return {"uint8": 255, "uint16": 65535, "float16": 1}[self.value]


def _refuse(reason: PixelReason) -> DataError:
    return DataError(reason.value)


# --- display -----------------------------------------------------------------------------


def to_display(ds: Dataset) -> NDArray[np.float32]:
    """Return the display image of a single-frame grey-scale dataset: float32, [0, 1], H x W.

    Applies the Modality LUT / rescale (PS3.3 C.11.1), the VOI LUT or window (PS3.3 C.11.2;
    the first valid window when there are several, the data's min/max when there is none)
    and MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2). A MONOCHROME2 image whose Presentation
    LUT Shape (2050,0020) is INVERSE is inverted too (PS3.3 C.11.6.1).

    Raises :class:`DataError` with a :class:`PixelReason` message, and nothing else, for
    objects without pixels, multi-frame (NumberOfFrames > 1) and colour
    (SamplesPerPixel > 1 or a colour Photometric Interpretation) images, and for anything
    that cannot be decoded or yields non-finite values. Warnings raised while reading the
    dataset are silenced: they would name header values.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _to_display(ds)
        except DataError:
            raise
        except Exception as exc:  # any decoder or header failure is one counted reason
            raise _refuse(PixelReason.UNDECODABLE) from exc


def _to_display(ds: Dataset) -> NDArray[np.float32]:
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise _refuse(PixelReason.NO_PIXELS)
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise _refuse(PixelReason.MULTIFRAME)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if int(ds.get("SamplesPerPixel") or 1) != 1 or (photometric and photometric not in _MONOCHROME):
        raise _refuse(PixelReason.COLOUR)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not photometric or rows <= 0 or columns <= 0 or rows * columns > MAX_PIXELS:
        raise _refuse(PixelReason.UNDECODABLE)

    stored = _decode(ds)
    if stored.shape != (rows, columns):
        raise _refuse(PixelReason.UNDECODABLE)
    invert = photometric == "MONOCHROME1" or (
        str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE"
    )
    if stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2:
        # Every step is a function of the stored value alone, so it is applied once to
        # each of the 2**bits possible values and the image is one lookup in that table.
        index = stored.view(f"u{stored.dtype.itemsize}")
        inputs = np.arange(1 << (8 * stored.dtype.itemsize), dtype=index.dtype)

        def present() -> NDArray[np.bool_]:
            return np.bincount(index.ravel(), minlength=inputs.size) > 0

        table = _grey_pipeline(inputs.view(stored.dtype), ds, present, invert=invert)
        return np.take(table, index)
    return _grey_pipeline(stored, ds, None, invert=invert)


def _grey_pipeline(
    values: NDArray[Any], ds: Dataset, present: _Presence | None, *, invert: bool
) -> NDArray[np.float32]:
    """Modality LUT, VOI and inversion of ``values``.

    ``present`` tells which of ``values`` occur in the image (None: all of them); it is
    only asked for when there is no VOI and the image's own range is needed.
    """
    modality = np.asarray(apply_modality_lut(values, ds))
    if not np.all(np.isfinite(modality)):
        raise _refuse(PixelReason.UNDECODABLE)
    image = _apply_voi(modality, ds, present)
    if invert:
        image = 1.0 - image
    out = np.clip(image, 0.0, 1.0).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise _refuse(PixelReason.UNDECODABLE)
    return out


def _decode(ds: Dataset) -> NDArray[Any]:
    """Decode frame 0 with the decoder for the dataset's transfer syntax (no caching on ds)."""
    if "PixelData" not in ds:  # float pixel data is always native
        return np.asarray(ds.pixel_array)
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        raise _refuse(PixelReason.UNDECODABLE)
    array, _ = get_decoder(tsyntax).as_array(ds, index=0)
    stored = np.asarray(array)
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    return stored


def _apply_voi(values: NDArray[Any], ds: Dataset, present: _Presence | None) -> NDArray[np.float64]:
    """Map modality values to [0, 1] with the dataset's VOI (PS3.3 C.11.2).

    pydicom scales its VOI output to the LUT's entry range or, for windows, to the modality
    output range. Rather than restate those rules, the output range is read back from
    pydicom itself (the whole LUT, or two inputs far outside the window) and divided out.
    """
    if _has_voi_lut(ds):
        mapped = _voi_lut(values, ds)
        if mapped is not None:
            return mapped
    for index in range(_window_count(ds)):
        mapped = _window(values, ds, index)
        if mapped is not None:
            return mapped
    return _min_max(values, present)


def _has_voi_lut(ds: Dataset) -> bool:
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return False
    item = sequence[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _voi_lut(values: NDArray[Any], ds: Dataset) -> NDArray[np.float64] | None:
    """Apply the first VOI LUT (PS3.3 C.11.2.1.1) to integer inputs; None if it is unusable."""
    try:
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first = int(descriptor[0]) or 1 << 16, int(descriptor[1])
        table = np.asarray(apply_voi(np.arange(first, first + entries, dtype=np.int64), ds))
        mapped = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds), dtype=np.float64)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, NotImplementedError):
        return None
    # Scaled by the table's own largest entry: writers often declare 16 bits per entry for
    # a 12-bit table, which would otherwise give an almost black image.
    top = float(table.max()) if table.size else 0.0
    if top <= 0.0:
        return None
    return mapped / top


def _window_count(ds: Dataset) -> int:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None or centre == "" or width == "":
        return 0
    return max(len(_as_list(centre)), len(_as_list(width)))


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return [value]
    return list(value)


def _window(values: NDArray[Any], ds: Dataset, index: int) -> NDArray[np.float64] | None:
    """Apply window ``index`` (PS3.3 C.11.2.1.2, C.11.2.1.3); None if it is unusable."""
    centres, widths = _as_list(ds.WindowCenter), _as_list(ds.WindowWidth)
    try:
        centre = float(centres[index] if len(centres) > 1 else centres[0])
        width = float(widths[index] if len(widths) > 1 else widths[0])
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
        return None
    reach = _PROBE_WIDTHS * width + 1.0
    probe = np.array([centre - reach, centre + reach], dtype=np.float64)
    try:
        low, high = (float(v) for v in apply_windowing(probe, ds, index=index))
        mapped = np.asarray(apply_windowing(values, ds, index=index), dtype=np.float64)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, OverflowError):
        return None
    if not (math.isfinite(low) and math.isfinite(high)) or low == high:
        return None
    return (mapped - low) / (high - low)


def _min_max(values: NDArray[Any], present: _Presence | None) -> NDArray[np.float64]:
    """No VOI: the image's own range maps to [0, 1] (its modality min and max)."""
    data = values.astype(np.float64, copy=False)
    occurring = data if present is None else data[present()]
    low, high = float(occurring.min()), float(occurring.max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.float64)
    return (data - low) / (high - low)


# --- resampling and storage --------------------------------------------------------------


def resample(image: NDArray[Any], size: tuple[int, int]) -> NDArray[np.float32]:
    """Resize a 2-D image to ``size`` = (height, width), each axis on its own.

    An axis that shrinks is area-averaged: each output pixel is the exact mean of the input
    area it covers, fractional pixels weighted by their overlap, so no input pixel is
    skipped (no aliasing). An axis that grows is interpolated linearly between pixel
    centres (half-pixel convention, as ``torch.nn.functional.interpolate(...,
    mode="bilinear", align_corners=False)``). Both are convex combinations, so a [0, 1]
    image stays in [0, 1]. Pure numpy in float32 with fixed summation order: the result is
    deterministic.
    """
    height, width = _check_size(size)
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise UsageError("resample takes a non-empty 2-D image")
    data = np.asarray(image, dtype=np.float32)
    # Both passes run along the contiguous last axis (much faster than striding axis 0).
    data = _resize_last(data, width)
    data = _resize_last(np.ascontiguousarray(data.T), height)
    return np.ascontiguousarray(data.T)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(n, int) and 1 <= n <= 1 << 14 for n in size):
        raise UsageError("image size must be two integers between 1 and 16384")
    return size[0], size[1]


def _resize_last(data: NDArray[np.float32], out: int) -> NDArray[np.float32]:
    n = data.shape[-1]
    if out == n:
        return data
    return _area(data, out) if out < n else _linear(data, out)


def _area(data: NDArray[np.float32], out: int) -> NDArray[np.float32]:
    """Exact box-filter means along the last axis (output bins wider than one pixel).

    Bin ``j`` covers ``[e_j, e_j+1)`` with ``e_j = j * n / out``. The sums over
    ``[ceil(e_j), ceil(e_j+1))`` come from one ``reduceat``; the pixel cut by an interior
    edge ``e`` is then moved out of the bin on its right by the share ``ceil(e) - e`` that
    lies on the left of ``e``.
    """
    n = data.shape[-1]
    edges = np.arange(out + 1, dtype=np.float64) * n / out
    starts = np.ceil(edges[:-1]).astype(np.intp)
    sums = np.add.reduceat(data, starts, axis=-1).astype(np.float64)
    inner = edges[1:-1]
    cut = np.floor(inner).astype(np.intp)
    share = np.where(inner > cut, np.ceil(inner) - inner, 0.0)
    moved = data[..., cut] * share
    sums[..., :-1] -= moved
    sums[..., 1:] += moved
    means: NDArray[np.float32] = (sums * (out / n)).astype(np.float32)
    return means


def _linear(data: NDArray[np.float32], out: int) -> NDArray[np.float32]:
    """Linear interpolation along the last axis between pixel centres (half-pixel)."""
    n = data.shape[-1]
    source = np.clip((np.arange(out, dtype=np.float64) + 0.5) * n / out - 0.5, 0.0, n - 1.0)
    lower = np.floor(source).astype(np.intp)
    upper = np.minimum(lower + 1, n - 1)
    frac = (source - lower).astype(np.float32)
    result: NDArray[np.float32] = data[..., lower] * (1.0 - frac) + data[..., upper] * frac
    return result


def quantize(image: NDArray[Any], dtype: PixelDType) -> NDArray[Any]:
    """Store a [0, 1] image as ``dtype``: integers round to nearest, 1.0 is the type's max."""
    clipped = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if dtype is PixelDType.FLOAT16:
        return clipped.astype(dtype.numpy)
    return np.rint(clipped * dtype.scale).astype(dtype.numpy)


def dequantize(stored: NDArray[Any]) -> NDArray[np.float32]:
    """Inverse of :func:`quantize`: stored view pixels back to float32 in [0, 1]."""
    dtype = PixelDType(np.dtype(stored.dtype).name)
    return (np.asarray(stored, dtype=np.float32) / np.float32(dtype.scale)).astype(np.float32)
