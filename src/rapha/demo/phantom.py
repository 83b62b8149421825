"""Synthetic chest radiographs with planted findings.

:func:`render_radiograph` draws one frontal chest radiograph as stored pixel values in the
MONOCHROME2 sense (PS3.3 C.7.6.3.1.2: the minimum value is displayed black), so a higher
value means more attenuation: bone and soft tissue are bright, lung and air are dark.

Anatomy (body outline, shoulders, mediastinum and heart, two lung fields, diaphragm domes,
ribs, clavicles, lung markings) is drawn in a normalised frame that is shifted, scaled and
rotated a little per image, then passed through a random detector response curve and
quantum noise. Findings are faint patterns drawn on top:

``effusion``
    a homogeneous fill at one or both lung bases under a meniscus that rises towards the
    chest wall, blunting the costophrenic angle;
``pneumothorax``
    a darker band without lung markings along the apical/lateral edge of one lung, bounded
    by a thin bright pleural line;
``nodule``
    a small round brighter blob inside a lung field.

A present finding is sometimes occult (too small to show; nothing is drawn), as on real
frontal radiographs, so no model can reach an AUROC of 1.

Contracts callers rely on:

* Every random draw comes from the ``rng`` passed in, in an order that does not depend on
  which findings are present: the same generator state renders the same patient, image and
  noise with or without findings.
* The global mean and standard deviation of the stored values are set per image from
  random draws that do not depend on the findings (the image is renormalised after the
  findings are drawn), so the findings cannot be read from global pixel statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rapha.errors import UsageError

__all__ = ["FINDINGS", "render_radiograph"]

FINDINGS: tuple[str, ...] = ("effusion", "pneumothorax", "nodule")

_F32 = npt.NDArray[np.float32]

# How often a present finding is occult: too small to show on a frontal radiograph, so
# nothing is drawn. This caps what any model can reach at an AUROC of 1 - p/2.
_OCCULT: Mapping[str, float] = {"effusion": 0.10, "pneumothorax": 0.35, "nodule": 0.30}
# Peak attenuation each finding adds, in the units of the anatomy map (air 0, lung ~0.2,
# soft tissue ~0.55, bone ~0.7), and the range of its size in the normalised frame. Tuned
# with tests/demo/test_signal.py: a tiny CNN on 64 px images learns effusion, the easiest
# finding, to an AUROC near 0.88 in a few epochs, pneumothorax to about 0.65 and nodule
# barely. The effusion is faint but sharp-edged: a broad bright finding would shift what
# any CNN computes, so one trained on shuffled labels would rank effusions by chance.
_EFFUSION_CONTRAST = 0.065
_EFFUSION_HEIGHT = (0.08, 0.20)
_PNEUMOTHORAX_CONTRAST = 0.05
_PLEURAL_LINE_CONTRAST = 0.08
_PNEUMOTHORAX_DEPTH = (0.03, 0.12)
_NODULE_CONTRAST = 0.18
_NODULE_RADIUS = (0.04, 0.065)

_MEDIAL = 0.09  # where the lung fields meet the mediastinum, in the normalised frame


@dataclass(frozen=True)
class _Chest:
    """A normal chest: attenuation map plus the geometry findings are drawn against."""

    att: _F32
    markings: _F32
    outward: tuple[_F32, _F32]  # distance from the midline towards each lung's lateral side
    lungs: tuple[_F32, _F32]  # soft masks, patient's right lung (image left) first
    apex: float
    dome: float
    width: float


def render_radiograph(
    rng: np.random.Generator,
    *,
    rows: int,
    cols: int,
    findings: Mapping[str, bool],
    bits_stored: int,
) -> npt.NDArray[np.uint16]:
    """Render one chest radiograph.

    Args:
        rng: the only source of randomness; the result is a function of its state.
        rows: image height in pixels (at least 16).
        cols: image width in pixels (at least 16).
        findings: which findings to draw; names must come from :data:`FINDINGS`, missing
            names count as absent.
        bits_stored: Bits Stored (0028,0101), 8 to 16.

    Returns:
        ``uint16`` array of shape ``(rows, cols)``: MONOCHROME2 stored values in
        ``[0, 2**bits_stored - 1]``.

    Raises:
        UsageError: a size, bit depth or finding name is out of range.
    """
    if rows < 16 or cols < 16:
        raise UsageError(f"image size {rows}x{cols} is too small; use at least 16x16")
    if not 8 <= bits_stored <= 16:
        raise UsageError(f"bits_stored must be in 8..16, not {bits_stored}")
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise UsageError(f"unknown findings {unknown}; known: {list(FINDINGS)}")

    # Anatomy and findings are smooth, so above 256 px they are drawn on every other pixel
    # and interpolated; the noise is drawn at full resolution.
    row_step, col_step = (2 if rows > 256 else 1), (2 if cols > 256 else 1)
    x, y = _frame(rng, rows, cols, row_step, col_step)
    edge = np.float32(max(0.01, 1.2 / min(x.shape[1], y.shape[0])))
    chest = _anatomy(rng, x, y, edge)
    att = chest.att

    # Every parameter is drawn whether or not its finding is present, so the rest of the
    # image does not depend on which findings are drawn.
    effusion = _effusion(rng, y, chest, edge)
    pneumothorax, pleural_line = _pneumothorax(rng, y, chest, edge)
    nodule = _nodule(rng, x, y, chest)
    occult = rng.random(len(FINDINGS)) < np.array([_OCCULT[name] for name in FINDINGS])
    drawn = {
        name: bool(findings.get(name, False)) and not hidden
        for name, hidden in zip(FINDINGS, occult, strict=True)
    }
    curve = np.float32(rng.uniform(-0.3, 0.3))
    target_mean = rng.uniform(0.40, 0.52)
    target_std = rng.uniform(0.12, 0.17)
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    noise_sigma = np.float32(rng.uniform(0.010, 0.018))

    if drawn["pneumothorax"]:
        att = att - (chest.markings + np.float32(_PNEUMOTHORAX_CONTRAST)) * pneumothorax
        att = att + np.float32(_PLEURAL_LINE_CONTRAST) * pleural_line
    if drawn["effusion"]:
        att = att + np.float32(_EFFUSION_CONTRAST) * effusion
    if drawn["nodule"]:
        att = att + np.float32(_NODULE_CONTRAST) * nodule

    # Detector response and exposure: a random monotone response curve, quantum noise that
    # grows with the signal, then global statistics reset to values drawn independently of
    # the findings.
    att = np.clip(att, np.float32(0.0), np.float32(1.0), out=att)
    att += curve * att * (np.float32(1.0) - att)
    att = _upsample(_upsample(att, rows, axis=0), cols, axis=1)
    att += noise * noise_sigma * np.sqrt(att + np.float32(0.05))
    max_value = float(2**bits_stored - 1)
    scale = target_std * max_value / (float(att.std()) or 1.0)
    offset = target_mean * max_value - float(att.mean()) * scale
    out = np.rint(att * np.float32(scale) + np.float32(offset))
    stored: npt.NDArray[np.uint16] = np.clip(out, 0.0, max_value).astype(np.uint16)
    return stored


def _upsample(image: _F32, size: int, *, axis: int) -> _F32:
    """Linear interpolation of samples taken at every other pixel back to ``size`` pixels."""
    if image.shape[axis] == size:
        return image
    moved = np.moveaxis(image, axis, 0)
    full = np.empty((size, *moved.shape[1:]), dtype=np.float32)
    full[0::2] = moved
    inner = moved[:-1] + moved[1:]
    inner *= np.float32(0.5)
    full[1 : 2 * len(inner) : 2] = inner
    if size % 2 == 0:
        full[-1] = moved[-1]
    return np.moveaxis(full, 0, axis)


def _frame(
    rng: np.random.Generator, rows: int, cols: int, row_step: int, col_step: int
) -> tuple[_F32, _F32]:
    """Normalised coordinates with a random shift, scale and rotation of the patient.

    ``x`` runs left to right and ``y`` top to bottom over [-1, 1], sampled at every
    ``row_step``-th row and ``col_step``-th column.
    """
    shift_x, shift_y = rng.uniform(-0.06, 0.06, size=2)
    zoom = rng.uniform(0.88, 1.05)
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    u = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, ::col_step] - np.float32(shift_x)
    v = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[::row_step, None] - np.float32(shift_y)
    cos, sin = np.float32(np.cos(angle) / zoom), np.float32(np.sin(angle) / zoom)
    return cos * u + sin * v, cos * v - sin * u


def _f32(array: npt.NDArray[Any]) -> _F32:
    """The same array, typed as float32 (numpy's stubs lose the dtype of mixed arithmetic)."""
    return array.astype(np.float32, copy=False)


def _ramp(z: _F32) -> _F32:
    """A soft step from 0 to 1 over ``z`` in [-2, 2]: a cheap, piecewise linear sigmoid."""
    z = z * np.float32(0.25) + np.float32(0.5)
    return np.minimum(np.maximum(z, np.float32(0.0), out=z), np.float32(1.0), out=z)


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, grid: int) -> _F32:
    """Roughly unit-variance noise, bilinearly upsampled from a ``grid`` x ``grid`` lattice."""
    lattice = rng.standard_normal((grid, grid), dtype=np.float32)
    return _f32(_interp_matrix(rows, grid) @ lattice @ _interp_matrix(cols, grid).T)


def _interp_matrix(n: int, grid: int) -> _F32:
    pos = np.linspace(0.0, grid - 1.0, n)
    lo = np.minimum(pos.astype(np.int64), grid - 2)
    frac = (pos - lo).astype(np.float32)
    weights = np.zeros((n, grid), dtype=np.float32)
    idx = np.arange(n)
    weights[idx, lo] = 1.0 - frac
    weights[idx, lo + 1] = frac
    return weights


def _lateral_edge(y: _F32, apex: float, width: float) -> _F32:
    """How far out each lung reaches at height ``y``: round at the apex, widest at the base."""
    t = np.clip((y - np.float32(apex)) / np.float32(0.55), 0.0, 1.0)
    return _f32(np.float32(_MEDIAL - 0.02) + np.float32(width - _MEDIAL + 0.02) * np.sqrt(t))


def _diaphragm(outward: _F32, dome: float) -> _F32:
    """Height of a hemidiaphragm: a dome peaking mid-lung, lowest at the costophrenic angle."""
    return (
        np.float32(dome) + np.float32(0.28) * ((outward - np.float32(0.42)) / np.float32(0.36)) ** 2
    )


def _anatomy(rng: np.random.Generator, x: _F32, y: _F32, edge: np.float32) -> _Chest:
    """Attenuation map of a normal chest, with the geometry findings are drawn against."""
    body_half_width = np.float32(rng.uniform(0.84, 0.96))
    shoulder = np.float32(rng.uniform(-0.92, -0.80))
    apex = float(rng.uniform(-0.74, -0.64))
    dome = float(rng.uniform(0.16, 0.28))
    width = float(rng.uniform(0.72, 0.80))
    heart_rx, heart_ry = rng.uniform(0.26, 0.33), rng.uniform(0.19, 0.25)
    rib_phase = rng.uniform(0.0, 1.0)
    rib_freq = rng.uniform(5.0, 6.0)
    soft = np.float32(rng.uniform(0.50, 0.60))
    lung_density = np.float32(rng.uniform(0.16, 0.24))
    rows, cols = x.shape
    texture = _smooth_noise(rng, rows, cols, 24)
    fine = _smooth_noise(rng, rows, cols, 48)
    shading = _smooth_noise(rng, rows, cols, 3)

    ax = np.abs(x)
    top = _f32(shoulder + np.float32(0.30) * x * x)
    neck = _ramp((np.float32(0.20) - ax) / edge)
    body = _ramp((body_half_width - ax) / edge) * np.maximum(_ramp((y - top) / edge), neck)

    mediastinum = _ramp((np.float32(_MEDIAL + 0.02) - ax) / edge)
    heart_q = ((x - np.float32(0.08)) / np.float32(heart_rx)) ** 2 + (
        (y - np.float32(dome + 0.05)) / np.float32(heart_ry)
    ) ** 2
    heart = _f32(np.clip(np.float32(1.5) - heart_q, 0.0, 1.0))
    central = np.maximum(mediastinum, heart)

    lateral = _lateral_edge(y, apex, width)
    outward = (-x, x)
    not_central = np.float32(1.0) - central
    lungs = tuple(
        _f32(
            _ramp(_f32(lateral - out) / edge)
            * _ramp((out - np.float32(_MEDIAL)) / edge)
            * _ramp((_diaphragm(out, dome + 0.03 * side) - y) / edge)
            * not_central
        )
        for side, out in enumerate(outward)
    )
    lung = _f32(lungs[0] + lungs[1])

    # Posterior ribs: arcs that droop laterally, repeating down the thorax.
    arc = y - np.float32(0.15) * x * x + np.float32(0.10) * ax
    ribs = (
        np.float32(0.5)
        + np.float32(0.5)
        * np.cos(np.float32(2.0 * np.pi) * (arc * np.float32(rib_freq) + np.float32(rib_phase)))
    ) ** 3
    clavicle_y = np.float32(-0.62) - np.float32(0.22) * ax
    clavicles = np.exp(-(((y - clavicle_y) / np.float32(0.04)) ** 2)) * _ramp(
        (np.float32(0.60) - ax) / edge
    )
    hilum = np.exp(
        -(((ax - np.float32(0.16)) / np.float32(0.14)) ** 2)
        - ((y - np.float32(-0.05)) / np.float32(0.25)) ** 2
    )
    markings = _f32(
        lung
        * (np.float32(0.03) * texture + np.float32(0.03) * np.abs(fine) + np.float32(0.08) * hilum)
    )

    thorax = _ramp((np.float32(dome + 0.3) - y) / np.float32(0.05))
    att = body * (soft + (np.float32(0.04) + np.float32(0.06) * thorax) * central)
    att -= lung * (soft - lung_density)
    att += markings
    att += body * (np.float32(0.05) * thorax * ribs + np.float32(0.10) * clavicles)
    att += np.float32(0.03) * shading
    return _Chest(
        att=att,
        markings=markings,
        outward=(outward[0], outward[1]),
        lungs=(lungs[0], lungs[1]),
        apex=apex,
        dome=dome,
        width=width,
    )


def _effusion(rng: np.random.Generator, y: _F32, chest: _Chest, edge: np.float32) -> _F32:
    """Fluid at one or both lung bases, its sharp meniscus rising towards the chest wall."""
    sides = int(rng.choice(3, p=[0.4, 0.4, 0.2]))  # right, left, both
    heights = rng.uniform(*_EFFUSION_HEIGHT, size=2)
    fill = np.zeros_like(y)
    for side in range(2):
        if sides not in (side, 2):
            continue
        out = chest.outward[side]
        lateral = np.clip((out - np.float32(0.25)) / np.float32(0.5), 0.0, 1.0)
        depth = np.float32(heights[side]) * (np.float32(0.3) + np.float32(0.7) * lateral)
        level = _diaphragm(out, chest.dome + 0.03 * side) - depth
        fill += chest.lungs[side] * _ramp((y - level) / edge)
    return fill


def _pneumothorax(
    rng: np.random.Generator, y: _F32, chest: _Chest, edge: np.float32
) -> tuple[_F32, _F32]:
    """Air between chest wall and a collapsed lung at one apex/lateral edge, and its pleura."""
    side = int(rng.integers(2))
    depth = float(rng.uniform(*_PNEUMOTHORAX_DEPTH))
    extent = np.float32(rng.uniform(0.45, 0.80))
    out = chest.outward[side]
    # The collapsed lung: the lung outline moved down and in by ``depth``.
    collapsed = _lateral_edge(y, chest.apex + depth, chest.width - depth)
    gap = (out - collapsed) / edge
    lower = _ramp(
        (np.float32(chest.apex) + extent * np.float32(chest.dome - chest.apex) - y)
        / np.float32(0.06)
    )
    # A pleural line right at the chest wall cannot be told apart from it.
    visible = chest.lungs[side] * lower * np.float32(min(1.0, depth / 0.06))
    band = visible * _ramp(gap)
    line = visible * np.exp(-(gap * gap))
    return band, line


def _nodule(rng: np.random.Generator, x: _F32, y: _F32, chest: _Chest) -> _F32:
    """A round blob well inside one lung field."""
    side = int(rng.integers(2))
    across = rng.uniform(0.25, 0.85)
    down = rng.uniform(0.2, 0.85)
    radius = np.float32(rng.uniform(*_NODULE_RADIUS))
    sign = np.float32(2 * side - 1)
    cx = sign * np.float32(_MEDIAL + across * (chest.width - _MEDIAL))
    cy = np.float32(chest.apex + down * (chest.dome - chest.apex))
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / (radius * radius)
    blob = np.maximum(np.float32(1.0) - d2, np.float32(0.0))
    return blob * np.sqrt(blob) * chest.lungs[side]
