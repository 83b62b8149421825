"""Burned-in annotation: identifying text drawn into the pixels, as some modalities do.

The text is white on a dark box, in the font that ships with Pillow (``load_default`` at a
size, Pillow >= 10.1, no system fonts), with a cap height of at least 5 % of the image
height so that an OCR engine such as Tesseract can read it. Whether the DICOM header admits
to it, Burned In Annotation (0028,0301) per PS3.3 C.7.6.1.1.4 and C.8.11.7, is the
caller's business: the archive writes ``YES`` on some such files and leaves the attribute
out on others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

__all__ = ["MIN_TEXT_FRACTION", "burn_text"]

MIN_TEXT_FRACTION = 0.05  # text height as a fraction of the image height, at least
_TARGET_FRACTION = 0.075  # font size; capitals are about 0.7 of it
_CAP_HEIGHT = 0.7


def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    assert isinstance(font, ImageFont.FreeTypeFont)  # Pillow has FreeType since 10.1
    return font


def _width(font: ImageFont.FreeTypeFont, lines: Sequence[str]) -> int:
    return max(int(font.getbbox(line)[2]) for line in lines)


def _fit(
    layouts: Sequence[Sequence[str]], rows: int, cols: int
) -> tuple[ImageFont.FreeTypeFont, int, Sequence[str]]:
    """The first layout that fits across the image at the target size, else the last one
    at the largest size that fits (never below the 5 % floor)."""
    size = max(10, math.ceil(_TARGET_FRACTION * rows))
    font = _font(size)
    for lines in layouts:
        if _width(font, lines) + size <= cols:
            return font, size, lines
    lines = layouts[-1]
    floor = max(8, math.ceil(MIN_TEXT_FRACTION * rows / _CAP_HEIGHT))
    while size > floor and _width(font, lines) + size > cols:
        size -= 1
        font = _font(size)
    return font, size, lines


def burn_text(
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    layouts: Sequence[Sequence[str]],
    *,
    white: int,
    corner: int,
) -> tuple[npt.NDArray[np.uint8] | npt.NDArray[np.uint16], int, tuple[str, ...]]:
    """Draw text in a dark box into one corner of an image.

    Args:
        pixels: ``(rows, cols)`` grey values where higher is brighter (MONOCHROME2 sense),
            or ``(rows, cols, 3)`` RGB.
        layouts: alternative ways to lay out the same text, one string per line, best
            first (for example the name on one line, then split over two); the first that
            fits across the image at the target size is drawn.
        white: the value used for the text (the box is 0).
        corner: 0 top-left, 1 top-right, 2 bottom-left.

    Returns:
        A new array of the same shape and dtype, the font size in pixels, and the lines
        drawn. Capital letters are at least 5 % of the image height tall unless even the
        last layout does not fit across the image at that size.
    """
    rows, cols = pixels.shape[0], pixels.shape[1]
    font, size, lines = _fit(layouts, rows, cols)
    pad = max(2, size // 4)
    line_height = size + pad
    box_w = min(cols, _width(font, lines) + 2 * pad)
    box_h = min(rows, line_height * len(lines) + pad)
    left = 0 if corner in (0, 2) else cols - box_w
    top = 0 if corner in (0, 1) else rows - box_h

    box = Image.new("L", (cols, rows), 0)
    ImageDraw.Draw(box).rectangle((left, top, left + box_w - 1, top + box_h - 1), fill=255)
    text = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(text)
    for n, line in enumerate(lines):
        draw.text((left + pad, top + pad + n * line_height), line, fill=255, font=font)
    box_mask = np.asarray(box) > 0
    # Antialiased glyph edges are thresholded so the text stays two-level (box and white).
    text_mask = np.asarray(text) >= 128

    out = pixels.copy()
    out[box_mask] = 0
    out[text_mask] = white
    return out, size, tuple(lines)
