"""Pixels for the studies that are not chest radiographs, and display windows for all.

Chest radiographs come from :mod:`rapha.demo.phantom`. This module draws the rest: a few
CT slices in Hounsfield units, MR slices, an ultrasound sector, and a workstation screen
capture of a radiograph. These only need to look plausible and exercise decoders and
scoping; no finding is drawn into them.

Every function is a pure function of the ``rng`` passed in.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "ct_slice",
    "mr_slice",
    "screen_capture",
    "ultrasound",
    "window",
]

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
F32 = npt.NDArray[np.float32]

CT_INTERCEPT = -1024  # stored value 0 is -1024 HU, as most CT scanners write it


def _grid(rows: int, cols: int) -> tuple[F32, F32]:
    """Normalised coordinates in [-1, 1], x to the right and y downwards."""
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :]
    return np.broadcast_to(x, (rows, cols)), np.broadcast_to(y, (rows, cols))


def _ellipse(x: F32, y: F32, cx: float, cy: float, rx: float, ry: float) -> npt.NDArray[np.bool_]:
    return ((x - np.float32(cx)) / np.float32(rx)) ** 2 + (
        (y - np.float32(cy)) / np.float32(ry)
    ) ** 2 <= 1.0


def ct_slice(
    rng: np.random.Generator, *, side: int, body_part: str, z: float, bits_stored: int
) -> U16:
    """One axial CT slice as stored values; Hounsfield units are ``stored - 1024``.

    ``body_part`` is ``CHEST``, ``ABDOMEN`` or ``HEAD``; ``z`` in [0, 1] moves through
    the volume so neighbouring slices differ a little.
    """
    x, y = _grid(side, side)
    hu = np.full((side, side), -1000.0, dtype=np.float32)
    if body_part == "HEAD":
        hu[_ellipse(x, y, 0, 0, 0.72, 0.86)] = 900.0  # skull
        hu[_ellipse(x, y, 0, 0, 0.64, 0.78)] = 35.0  # brain
        vent = 0.10 + 0.06 * z
        hu[_ellipse(x, y, -0.12, -0.05, vent, 0.22)] = 8.0
        hu[_ellipse(x, y, 0.12, -0.05, vent, 0.22)] = 8.0
    else:
        rx, ry = 0.88 - 0.05 * z, 0.62
        hu[_ellipse(x, y, 0, 0.05, rx, ry)] = -100.0  # subcutaneous fat
        hu[_ellipse(x, y, 0, 0.05, rx - 0.06, ry - 0.06)] = 40.0  # soft tissue
        hu[_ellipse(x, y, 0, 0.48, 0.10, 0.10)] = 700.0  # vertebral body
        if body_part == "CHEST":
            lung_r = 0.30 + 0.05 * z
            hu[_ellipse(x, y, -0.40, 0.02, lung_r, 0.42)] = -850.0
            hu[_ellipse(x, y, 0.40, 0.02, lung_r, 0.42)] = -850.0
            hu[_ellipse(x, y, 0.05, 0.0, 0.22, 0.20)] = 45.0  # heart
            hu[_ellipse(x, y, -0.05, 0.30, 0.07, 0.07)] = 180.0  # aorta with contrast
        else:
            hu[_ellipse(x, y, -0.35, -0.05, 0.35, 0.30 + 0.05 * z)] = 60.0  # liver
            hu[_ellipse(x, y, 0.40, 0.25, 0.10, 0.14)] = 30.0  # kidney
            hu[_ellipse(x, y, -0.38, 0.25, 0.10, 0.14)] = 30.0
            for _ in range(3):  # bowel gas
                cx, cy = rng.uniform(-0.3, 0.4), rng.uniform(-0.3, 0.2)
                hu[_ellipse(x, y, cx, cy, 0.05, 0.04)] = -950.0
    hu += rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
    stored = np.rint(hu - CT_INTERCEPT)
    return np.clip(stored, 0, 2**bits_stored - 1).astype(np.uint16)


def mr_slice(rng: np.random.Generator, *, side: int, body_part: str, z: float) -> U16:
    """One MR slice as 12-bit stored values (no physical unit, as in MR)."""
    x, y = _grid(side, side)
    img = np.zeros((side, side), dtype=np.float32)
    if body_part == "HEAD":
        img[_ellipse(x, y, 0, 0, 0.74, 0.88)] = 1400.0  # scalp fat
        img[_ellipse(x, y, 0, 0, 0.68, 0.82)] = 150.0  # skull
        img[_ellipse(x, y, 0, 0, 0.63, 0.77)] = 900.0  # grey matter
        img[_ellipse(x, y, 0, 0, 0.48, 0.60)] = 700.0  # white matter
        img[_ellipse(x, y, 0, -0.05, 0.10 + 0.05 * z, 0.25)] = 2200.0  # CSF (T2)
    elif body_part == "KNEE":
        img[_ellipse(x, y, 0, 0, 0.70, 0.95)] = 600.0
        img[_ellipse(x, y, 0, -0.45, 0.40, 0.45)] = 1100.0  # femur marrow
        img[_ellipse(x, y, 0, 0.50, 0.36, 0.40)] = 1100.0  # tibia marrow
        img[np.abs(y) < 0.04] = 300.0  # joint space
    else:  # LSPINE, sagittal
        img[_ellipse(x, y, 0.1, 0, 0.85, 0.98)] = 500.0
        for k in range(5):
            img[_ellipse(x, y, 0.15, -0.75 + 0.37 * k, 0.22, 0.13)] = 1000.0  # vertebrae
        img[_ellipse(x, y, -0.22, 0, 0.06 + 0.02 * z, 0.95)] = 1800.0  # CSF
    img *= np.float32(rng.uniform(0.85, 1.15))
    img += np.abs(rng.normal(0.0, 40.0, size=img.shape)).astype(np.float32)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def ultrasound(rng: np.random.Generator, *, rows: int, cols: int, rgb: bool) -> U8:
    """An abdominal ultrasound sector: speckle in a fan, black outside; RGB adds Doppler."""
    yy = np.arange(rows, dtype=np.float32)[:, None]
    xx = np.arange(cols, dtype=np.float32)[None, :] - np.float32(cols / 2)
    radius = np.hypot(xx, yy)
    angle = np.arctan2(xx, yy)
    fan = (np.abs(angle) < 0.62) & (radius > rows * 0.06) & (radius < rows * 0.95)
    speckle = rng.rayleigh(0.35, size=(rows, cols)).astype(np.float32)
    depth_gain = np.float32(1.0) - radius / np.float32(rows * 1.3)
    img = np.clip(speckle * depth_gain * 255.0, 0, 255) * fan
    organ = ((xx / (cols * 0.18)) ** 2 + ((yy - rows * 0.55) / (rows * 0.12)) ** 2) <= 1.0
    img[organ] *= 0.25  # an anechoic structure (gallbladder-like)
    gray: U8 = img.astype(np.uint8)
    if not rgb:
        return gray
    out: U8 = np.repeat(gray[:, :, None], 3, axis=2)
    vessel = ((xx / (cols * 0.05)) ** 2 + ((yy - rows * 0.35) / (rows * 0.04)) ** 2) <= 1.0
    out[vessel] = (200, 30, 30) if rng.random() < 0.5 else (30, 60, 210)
    return out


def screen_capture(radiograph: U16) -> U8:
    """A workstation screenshot of a radiograph: windowed to 8 bits inside a dark frame."""
    lo, hi = np.percentile(radiograph, [1.0, 99.0])
    scaled = (radiograph.astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1.0))
    img: U8 = np.clip(scaled * 255.0, 0, 255).astype(np.uint8)
    border = max(2, radiograph.shape[0] // 24)
    img[:border, :] = 24
    img[-border:, :] = 24
    img[:, :border] = 24
    img[:, -border:] = 24
    return img


def window(
    values: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    slope: float = 1.0,
    intercept: float = 0.0,
) -> tuple[float, float]:
    """Window Center and Width (0028,1050/1051) covering the 1st-99th percentile of the
    modality values ``stored * slope + intercept`` (PS3.3 C.11.2.1.2)."""
    lo, hi = np.percentile(values.astype(np.float32), [1.0, 99.0])
    lo, hi = float(lo) * slope + intercept, float(hi) * slope + intercept
    width = max(hi - lo, 2.0)
    return round((lo + hi) / 2.0, 1), round(width, 1)
