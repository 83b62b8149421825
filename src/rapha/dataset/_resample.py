"""Resizing a 2-D image, one axis at a time (the implementation of ``pixels.resample``).

An axis that shrinks is area-averaged, one that grows is interpolated linearly. Both are
banded linear maps along one axis, applied to whole rows: the rows of the image are the
contiguous axis, so the first pass (along axis 0) reads the full image once, row by row,
and the second pass runs on the transpose of the already reduced image.

An area pass computes each output row as the weighted sum of the few input rows it covers
(at most ``ceil(n / out) + 1``), one ``numpy.dot`` per output row. For bins of up to 16
pixels this runs in float32 with weights that are multiples of 2**-24 summing to exactly
1, so every partial sum of them is exact; since rounding is monotone, a weighted sum of
values in [0, 1] then never leaves [0, 1], whatever order the BLAS kernel adds in. Wider
bins (a reduction by more than 15x) are summed in float64, where the weights' sum is
within 1e-15 of 1 and the final rounding to float32 keeps the result in [0, 1].
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from rapha.errors import UsageError

__all__ = ["resample"]

_MAX_SIDE: Final = 1 << 14
_WEIGHT_ONE: Final = 1 << 24  # weights are integers over 2**24: exact in float32
_F32_SPAN: Final = 16  # widest area bin (in input pixels) summed in float32


def resample(image: NDArray[Any], size: tuple[int, int]) -> NDArray[np.float32]:
    """Resize a 2-D image to ``size`` = (height, width), each axis on its own.

    An axis that shrinks is area-averaged: each output pixel is the mean of the input area
    it covers, fractional pixels weighted by their overlap, so no input pixel is skipped
    (no aliasing). An axis that grows is interpolated linearly between pixel centres
    (half-pixel convention, as ``torch.nn.functional.interpolate(..., mode="bilinear",
    align_corners=False)``). Both are convex combinations, and a [0, 1] image stays in
    [0, 1]. Computed in float32, within 1e-6 of the exact means (wide area bins are
    summed in float64); the area sums run through numpy's BLAS, so the result is the same
    on every run on one machine but may differ in the last bit on another CPU. The result
    is a new C-contiguous array.
    """
    height, width = _check_size(size)
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise UsageError("resample takes a non-empty 2-D image")
    data = np.ascontiguousarray(image, dtype=np.float32)
    rows = _resize_rows(data, height)
    if width != rows.shape[1]:
        rows = np.ascontiguousarray(_resize_rows(np.ascontiguousarray(rows.T), width).T)
    if np.may_share_memory(rows, image):  # both sides unchanged: never return the input
        rows = rows.copy()
    return rows


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(n, int) and 1 <= n <= _MAX_SIDE for n in size):
        raise UsageError("image size must be two integers between 1 and 16384")
    return size[0], size[1]


def _resize_rows(data: NDArray[np.float32], out: int) -> NDArray[np.float32]:
    """Resize along axis 0 of a C-contiguous float32 image."""
    n = data.shape[0]
    if out == n:
        return data
    return _area(data, out) if out < n else _linear(data, out)


def _area(data: NDArray[np.float32], out: int) -> NDArray[np.float32]:
    """Box-filter means along axis 0 (output bins taller than one pixel)."""
    bins = _area_weights(data.shape[0], out)
    result = np.empty((out, data.shape[1]), dtype=np.float32)
    if bins[0][1].dtype == np.float32:
        for j, (first, weights) in enumerate(bins):
            np.dot(weights, data[first : first + weights.size], out=result[j])
        return result
    row = np.empty(data.shape[1], dtype=np.float64)
    for j, (first, weights) in enumerate(bins):
        np.dot(weights, data[first : first + weights.size].astype(np.float64), out=row)
        result[j] = row
    return result


@lru_cache(maxsize=64)
def _area_weights(n: int, out: int) -> tuple[tuple[int, NDArray[np.floating[Any]]], ...]:
    """Per output bin: its first input pixel and the weights of the pixels it covers.

    Bin ``j`` covers ``[e_j, e_j+1)`` with ``e_j = j * n / out``; pixel ``p`` has the weight
    ``|[p, p+1) & [e_j, e_j+1)| * out / n``. Bins of at most :data:`_F32_SPAN` pixels get
    float32 weights rounded to multiples of 2**-24, the largest one in each bin absorbing
    the rounding so that each bin sums to exactly 1 (at most ``span * 2**-25`` from the
    exact mean). Wider bins get exact float64 weights and are summed in float64.
    """
    edges = np.arange(out + 1, dtype=np.float64) * n / out
    first = np.floor(edges[:-1]).astype(np.intp)
    stop = np.minimum(np.ceil(edges[1:]).astype(np.intp), n)
    span = int((stop - first).max())
    cells = first[:, None] + np.arange(span)
    overlap = np.minimum(edges[1:, None], cells + 1.0) - np.maximum(edges[:-1, None], cells)
    exact = np.clip(overlap, 0.0, None) * (out / n)
    if span <= _F32_SPAN:
        ticks = np.rint(exact * _WEIGHT_ONE).astype(np.int64)
        ticks[np.arange(out), ticks.argmax(axis=1)] += _WEIGHT_ONE - ticks.sum(axis=1)
        weights: NDArray[np.floating[Any]] = (ticks / _WEIGHT_ONE).astype(np.float32)
    else:
        weights = exact
    weights.flags.writeable = False
    return tuple(
        (int(f), weights[j, : int(s - f)]) for j, (f, s) in enumerate(zip(first, stop, strict=True))
    )


def _linear(data: NDArray[np.float32], out: int) -> NDArray[np.float32]:
    """Linear interpolation along axis 0 between pixel centres (half-pixel)."""
    n = data.shape[0]
    source = np.clip((np.arange(out, dtype=np.float64) + 0.5) * n / out - 0.5, 0.0, n - 1.0)
    lower = np.floor(source).astype(np.intp)
    upper = np.minimum(lower + 1, n - 1)
    frac = (source - lower).astype(np.float32)[:, None]
    result: NDArray[np.float32] = data[lower] * (1.0 - frac) + data[upper] * frac
    return result
