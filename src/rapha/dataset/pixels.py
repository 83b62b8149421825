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

For 8- and 16-bit stored values the steps 2 to 4 are computed in one of two ways. When
they are linear in the stored value (a rescale, no Modality LUT Sequence, no VOI LUT
Sequence, and a LINEAR or LINEAR_EXACT window or none), the image is
``clip(scale * (stored - zero), 0, 1)`` computed directly in float32, with the ramp
checked against pydicom inside the window. Otherwise pydicom applies the steps once to
each of the 2**bits possible values and the image is one lookup in that table. Both give
the same image to within 1e-6 (a test holds the first to the second).

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
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import numpy as np
from numpy.typing import NDArray
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import UID

from rapha.dataset._resample import resample
from rapha.errors import DataError

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
# Rescale and window values beyond these are left to the table path, which refuses what
# does not stay finite.
_HUGE: Final = 1e300
_RAMP_LIMITS: Final = (1e-30, 1e30)
# Up to this |scale * zero| the ramp is computed as s * scale - scale * zero in float32
# (four roundings of values up to 2 where the result is in [0, 1]: error < 5e-7); above
# it the whole part of the zero is taken off first, exactly, and a fractional part less
# than _NEGLIGIBLE of the output range is left out.
_SHIFT_FIRST: Final = 1.0
_NEGLIGIBLE: Final = 1e-9
# Native pixel data as a view on the dataset's bytes, high bits as stored (checked after).
_VIEW_OPTIONS: Final[dict[str, Any]] = {"view_only": True, "correct_unused_bits": False}


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
        ramp = _ramp(stored, ds, invert=invert)
        if ramp is not None:
            return ramp.apply(stored)
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
    """Decode frame 0 with the decoder for the dataset's transfer syntax (no caching on ds).

    Native (uncompressed) pixel data is read as a view on the dataset's bytes when that
    gives the same values as pydicom's default decoding, which clears the bits above
    Bits Stored (PS3.5 8.1.1) in a copy: only when one of them is set is that copy made.
    """
    if "PixelData" not in ds:  # float pixel data is always native
        return np.asarray(ds.pixel_array)
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        raise _refuse(PixelReason.UNDECODABLE)
    decoder = get_decoder(tsyntax)
    stored: NDArray[Any] | None = None
    whole_bytes = ds.get("BitsAllocated") in (8, 16)  # not bit-packed (1-bit) data
    if decoder.is_native and UID(tsyntax).is_little_endian and whole_bytes:
        view, _ = decoder.as_array(ds, index=0, **_VIEW_OPTIONS)
        stored = np.asarray(view)
        if not _within_bits_stored(stored, ds):
            stored = None
    if stored is None:
        array, _ = decoder.as_array(ds, index=0)
        stored = np.asarray(array)
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    return stored


def _within_bits_stored(stored: NDArray[Any], ds: Dataset) -> bool:
    """Whether every value of an integer array already fits in Bits Stored (0028,0101)."""
    if stored.dtype.kind not in "ui" or stored.size == 0:
        return True
    bits = int(ds.BitsStored)
    if bits >= 8 * stored.dtype.itemsize:
        return True
    if stored.dtype.kind == "u":
        return int(stored.max()) < 1 << bits
    half = 1 << (bits - 1)
    return -half <= int(stored.min()) and int(stored.max()) < half


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


class _Window(NamedTuple):
    """A usable window, as probed through pydicom.

    ``low`` and ``high`` are pydicom's outputs far below and far above the window. Probed
    for a linear VOI LUT Function, ``middle`` and ``span`` are the ramp's middle and width
    (PS3.3 C.11.2.1.2.1 for LINEAR, C.11.2.1.3.2 for LINEAR_EXACT) and ``inside`` is
    pydicom's output, scaled to [0, 1], a quarter of the span each side of the middle.
    """

    low: float
    high: float
    middle: float = 0.0
    span: float = 0.0
    inside: tuple[float, ...] = ()


def _window(values: NDArray[Any], ds: Dataset, index: int) -> NDArray[np.float64] | None:
    """Apply window ``index`` (PS3.3 C.11.2.1.2, C.11.2.1.3); None if it is unusable."""
    window = _probe_window(ds, index)
    if window is None:
        return None
    try:
        mapped = np.asarray(apply_windowing(values, ds, index=index), dtype=np.float64)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, OverflowError):
        return None
    return (mapped - window.low) / (window.high - window.low)


def _probe_window(ds: Dataset, index: int, function: str | None = None) -> _Window | None:
    """Window ``index`` if pydicom applies it and its output range is not empty.

    ``function`` ("LINEAR" or "LINEAR_EXACT", as pydicom reads (0028,1056)) adds the
    ramp's middle, width and two points inside it to the same probe.
    """
    centres, widths = _as_list(ds.WindowCenter), _as_list(ds.WindowWidth)
    try:
        centre = float(centres[index] if len(centres) > 1 else centres[0])
        width = float(widths[index] if len(widths) > 1 else widths[0])
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
        return None
    reach = _PROBE_WIDTHS * width + 1.0
    points = [centre - reach, centre + reach]
    middle, span = (centre - 0.5, width - 1.0) if function == "LINEAR" else (centre, width)
    if function is not None:
        points += [middle - span / 4, middle + span / 4]
    try:
        low, high, *inside = (
            float(v) for v in apply_windowing(np.array(points, dtype=np.float64), ds, index=index)
        )
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, OverflowError):
        return None
    if not (math.isfinite(low) and math.isfinite(high)) or low == high:
        return None
    shown = tuple((v - low) / (high - low) for v in inside)
    return _Window(low, high, middle, span, shown)


def _min_max(values: NDArray[Any], present: _Presence | None) -> NDArray[np.float64]:
    """No VOI: the image's own range maps to [0, 1] (its modality min and max)."""
    data = values.astype(np.float64, copy=False)
    occurring = data if present is None else data[present()]
    low, high = float(occurring.min()), float(occurring.max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.float64)
    return (data - low) / (high - low)


# --- the linear case ---------------------------------------------------------------------


class _Ramp(NamedTuple):
    """A display image that is ``clip(scale * (stored - zero), 0, 1)``."""

    scale: float
    zero: float

    def apply(self, stored: NDArray[Any]) -> NDArray[np.float32]:
        """Compute the image in float32: one new array, then two or three in-place steps."""
        scale, zero = self.scale, self.zero
        if abs(scale * zero) <= _SHIFT_FIRST:
            out: NDArray[np.float32] = np.multiply(stored, np.float32(scale), dtype=np.float32)
            out -= np.float32(scale * zero)
        else:  # a large offset is taken off exactly first (integers below 2**24)
            whole = float(np.rint(zero)) if abs(zero) < 1 << 24 else 0.0
            out = np.subtract(stored, np.float32(whole), dtype=np.float32)
            if abs((zero - whole) * scale) > _NEGLIGIBLE:  # not a rounding error's worth
                out -= np.float32(zero - whole)
            out *= np.float32(scale)
        np.clip(out, 0.0, 1.0, out=out)
        return out


def _ramp(stored: NDArray[Any], ds: Dataset, *, invert: bool) -> _Ramp | None:
    """The display map as a :class:`_Ramp` when it is linear in the stored value, else None.

    Linear means: a rescale or none (no Modality LUT Sequence), no VOI LUT Sequence, and
    the window the table path would choose is LINEAR or LINEAR_EXACT, or there is none
    and the image's own range is used. That is the same map as the table path's, computed
    directly on the pixels; everything else (and anything odd) takes the table path.
    """
    rescale = _rescale(ds)
    if rescale is None or _has_voi_lut(ds):
        return None
    slope, intercept = rescale
    function = _linear_function(ds)
    windows = range(_window_count(ds))
    if windows and function is None:
        return None
    probes = (_probe_window(ds, index, function) for index in windows)
    window = next((w for w in probes if w is not None), None)
    ramp = _range_ramp(stored, slope) if window is None else _window_ramp(window, slope, intercept)
    if ramp is not None and invert:
        ramp = _Ramp(-ramp.scale, ramp.zero + 1.0 / ramp.scale)
    if ramp is None or not _RAMP_LIMITS[0] < abs(ramp.scale) < _RAMP_LIMITS[1]:
        return None
    return ramp if abs(ramp.zero) < _RAMP_LIMITS[1] else None


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    """Rescale slope and intercept as pydicom applies them (PS3.3 C.11.1); None for a LUT."""
    if ds.get("ModalityLUTSequence"):
        return None
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return 1.0, 0.0
    values = (ds.RescaleSlope, ds.RescaleIntercept)
    if not all(isinstance(v, int | float) for v in values):
        return None
    slope, intercept = (float(v) for v in values)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        return None
    if not (0.0 < abs(slope) <= _HUGE and abs(intercept) <= _HUGE):
        return None
    return slope, intercept


def _linear_function(ds: Dataset) -> str | None:
    """VOI LUT Function (0028,1056) as pydicom reads it, if LINEAR or LINEAR_EXACT."""
    function = getattr(ds, "VOILUTFunction", "LINEAR")
    if not isinstance(function, str) or function.upper() not in {"LINEAR", "LINEAR_EXACT"}:
        return None
    return function.upper()


def _window_ramp(window: _Window, slope: float, intercept: float) -> _Ramp | None:
    """The window's ramp on stored values, if pydicom agrees with it inside the window."""
    if window.span <= 0.0:  # LINEAR with width 1 is a step
        return None
    if len(window.inside) != 2 or not all(
        abs(got - want) <= 1e-7 for got, want in zip(window.inside, (0.25, 0.75), strict=True)
    ):
        return None
    zero = (window.middle - window.span / 2 - intercept) / slope
    return _Ramp(slope / window.span, zero)


def _range_ramp(stored: NDArray[Any], slope: float) -> _Ramp | None:
    """No VOI: the image's own modality range to [0, 1]; None for a constant image."""
    low, high = float(stored.min()), float(stored.max())
    if high <= low:
        return None
    if slope > 0:
        return _Ramp(1.0 / (high - low), low)
    return _Ramp(-1.0 / (high - low), high)


# --- storage -----------------------------------------------------------------------------


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
