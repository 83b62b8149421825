"""Inline SVG line charts for the results report (:mod:`rapha.client.report`).

One function, :func:`line_chart`, draws axes, a grid, an optional diagonal, shaded bands
and polylines, and returns SVG markup meant to sit inside an HTML page (no ``xmlns``, no
external reference of any kind, no script). Every piece of text is HTML-escaped here, so
callers pass plain strings. Curves are ``<path class="curve" data-label=…>``, one per
series, so a test can find and measure them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Final

__all__ = ["PALETTE", "Axis", "Band", "Series", "line_chart", "nice_axis"]

#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
PALETTE: Final = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255")

_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 56, 16, 28, 44
_LEGEND_LINE = 18

Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Axis:
    """An axis from ``low`` to ``high`` (``low < high``) with tick values inside that range."""

    label: str
    low: float
    high: float
    ticks: tuple[float, ...]
    tick_format: str = ".1f"


@dataclass(frozen=True, slots=True)
class Series:
    """One curve: ``segments`` are polylines drawn unconnected (a gap is a missing value)."""

    label: str
    legend: str
    color: str
    segments: tuple[tuple[Point, ...], ...]
    markers: bool = False


@dataclass(frozen=True, slots=True)
class Band:
    """A shaded vertical band from ``x_low`` to ``x_high`` with a rotated caption."""

    x_low: float
    x_high: float
    caption: str
    tooltip: str


@dataclass(frozen=True, slots=True)
class _Frame:
    width: int
    height: int
    x: Axis
    y: Axis

    def px(self, value: float) -> float:
        span = self.width - _MARGIN_LEFT - _MARGIN_RIGHT
        return _MARGIN_LEFT + span * (_clamp(value, self.x) - self.x.low) / (
            self.x.high - self.x.low
        )

    def py(self, value: float) -> float:
        span = self.height - _MARGIN_TOP - _MARGIN_BOTTOM
        return (
            self.height
            - _MARGIN_BOTTOM
            - span * (_clamp(value, self.y) - self.y.low) / (self.y.high - self.y.low)
        )


def nice_axis(label: str, low: float, high: float, *, ticks: int = 5) -> Axis:
    """An axis covering ``[low, high]`` with about ``ticks`` round ticks (1, 2 or 5 x 10^n)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high <= low:
        pad = abs(low) * 0.1 or 0.5
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, ticks)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start, stop = math.floor(low / step) * step, math.ceil(high / step) * step
    count = round((stop - start) / step)
    values = tuple(start + i * step for i in range(count + 1))
    decimals = max(0, -math.floor(math.log10(step)))
    return Axis(label, start, stop, values, f".{decimals}f")


def line_chart(
    *,
    chart_id: str,
    kind: str,
    title: str,
    x: Axis,
    y: Axis,
    series: Sequence[Series],
    width: int = 520,
    height: int = 380,
    diagonal: str | None = None,
    bands: Sequence[Band] = (),
    verticals: Sequence[tuple[float, str]] = (),
) -> str:
    """An SVG chart; ``diagonal`` (its legend text) draws the dashed line y = x.

    ``verticals`` are dashed vertical rules with a caption at the top (epoch starts). The
    legend, one line per series (and the diagonal), goes below the plot and adds to
    ``height``.
    """
    frame = _Frame(width, height, x, y)
    legend_lines = len(series) + (diagonal is not None)
    total = height + legend_lines * _LEGEND_LINE + (8 if legend_lines else 0)
    title_id = f"{chart_id}-title"
    parts = [
        f'<svg id="{escape(chart_id)}" data-chart="{escape(kind)}" class="chart" role="img" '
        f'aria-labelledby="{escape(title_id)}" width="{width}" height="{total}" '
        f'viewBox="0 0 {width} {total}">',
        f'<title id="{escape(title_id)}">{escape(title)}</title>',
        f'<rect class="background" x="0" y="0" width="{width}" height="{total}" fill="#ffffff"/>',
        f'<text x="{_MARGIN_LEFT}" y="18" class="chart-title">{escape(title)}</text>',
    ]
    parts += _bands(frame, bands)
    parts += _grid(frame)
    parts += _verticals(frame, verticals)
    if diagonal is not None:
        low, high = max(x.low, y.low), min(x.high, y.high)
        parts.append(
            f'<line class="diagonal" x1="{frame.px(low):.1f}" y1="{frame.py(low):.1f}" '
            f'x2="{frame.px(high):.1f}" y2="{frame.py(high):.1f}" stroke="#888888" '
            'stroke-width="1" stroke-dasharray="5 4"/>'
        )
    for s in series:
        parts += _series(frame, s)
    parts += _legend(frame, series, diagonal)
    parts.append("</svg>")
    return "\n".join(parts)


def _clamp(value: float, axis: Axis) -> float:
    return min(axis.high, max(axis.low, value))


def _grid(frame: _Frame) -> list[str]:
    left, right = _MARGIN_LEFT, frame.width - _MARGIN_RIGHT
    top, bottom = _MARGIN_TOP, frame.height - _MARGIN_BOTTOM
    out = []
    for t in frame.x.ticks:
        px = frame.px(t)
        out.append(
            f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#e6e6e6"/>'
            f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle" class="tick">'
            f"{format(t, frame.x.tick_format)}</text>"
        )
    for t in frame.y.ticks:
        py = frame.py(t)
        out.append(
            f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#e6e6e6"/>'
            f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end" class="tick">'
            f"{format(t, frame.y.tick_format)}</text>"
        )
    out.append(
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
        'fill="none" stroke="#555555"/>'
    )
    middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
    out.append(
        f'<text x="{middle_x:.1f}" y="{bottom + 34}" text-anchor="middle" class="axis-label">'
        f"{escape(frame.x.label)}</text>"
    )
    out.append(
        f'<text x="14" y="{middle_y:.1f}" text-anchor="middle" class="axis-label" '
        f'transform="rotate(-90 14 {middle_y:.1f})">{escape(frame.y.label)}</text>'
    )
    return out


def _bands(frame: _Frame, bands: Sequence[Band]) -> list[str]:
    top, bottom = _MARGIN_TOP, frame.height - _MARGIN_BOTTOM
    out = []
    for band in bands:
        x0, x1 = frame.px(band.x_low), frame.px(band.x_high)
        middle = (x0 + x1) / 2
        out.append(
            f'<g class="band"><rect x="{x0:.1f}" y="{top}" width="{max(0.0, x1 - x0):.1f}" '
            f'height="{bottom - top}" fill="#d9d9d9" fill-opacity="0.7">'
            f"<title>{escape(band.tooltip)}</title></rect>"
            f'<text x="{middle:.1f}" y="{bottom - 6}" class="band-caption" '
            f'transform="rotate(-90 {middle:.1f} {bottom - 6})">{escape(band.caption)}</text></g>'
        )
    return out


def _verticals(frame: _Frame, verticals: Sequence[tuple[float, str]]) -> list[str]:
    top, bottom = _MARGIN_TOP, frame.height - _MARGIN_BOTTOM
    out = []
    for value, caption in verticals:
        px = frame.px(value)
        out.append(
            f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#aaaaaa" '
            f'stroke-dasharray="2 3"/><text x="{px + 3:.1f}" y="{top + 12}" class="tick">'
            f"{escape(caption)}</text>"
        )
    return out


def _series(frame: _Frame, s: Series) -> list[str]:
    drawn = [seg for seg in s.segments if seg]
    if not drawn:
        return []
    d = " ".join(
        "M" + " L".join(f"{frame.px(px):.1f} {frame.py(py):.1f}" for px, py in seg) for seg in drawn
    )
    out = [
        f'<path class="curve" data-label="{escape(s.label)}" d="{d}" fill="none" '
        f'stroke="{escape(s.color)}" stroke-width="2" stroke-linejoin="round">'
        f"<title>{escape(s.legend)}</title></path>"
    ]
    if s.markers:
        out += [
            f'<circle cx="{frame.px(px):.1f}" cy="{frame.py(py):.1f}" r="3" '
            f'fill="{escape(s.color)}"/>'
            for seg in drawn
            for px, py in seg
        ]
    return out


def _legend(frame: _Frame, series: Sequence[Series], diagonal: str | None) -> list[str]:
    entries = [(s.color, s.legend, "") for s in series]
    if diagonal is not None:
        entries.append(("#888888", diagonal, ' stroke-dasharray="5 4"'))
    out = []
    for i, (color, text, dash) in enumerate(entries):
        y = frame.height + 8 + i * _LEGEND_LINE
        out.append(
            f'<g class="legend-entry"><line x1="{_MARGIN_LEFT}" y1="{y:.1f}" '
            f'x2="{_MARGIN_LEFT + 22}" y2="{y:.1f}" stroke="{escape(color)}" '
            f'stroke-width="2"{dash}/><text x="{_MARGIN_LEFT + 28}" y="{y + 4:.1f}" '
            f'class="legend">{escape(text)}</text></g>'
        )
    return out
