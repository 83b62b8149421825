"""Pixel Data in the archive's transfer syntaxes, file bytes, and the ways files get broken.

Transfer syntaxes (PS3.5 Section 10 and Annex A):

* Explicit VR Little Endian, ``1.2.840.10008.1.2.1`` (native pixels, most files);
* JPEG 2000 Image Compression (Lossless Only), ``1.2.840.10008.1.2.4.90``, encoded by
  OpenJPEG through pylibjpeg-openjpeg; monochrome images only, so the photometric
  interpretation is unchanged (an RGB image would become ``YBR_RCT``);
* RLE Lossless, ``1.2.840.10008.1.2.5`` (PS3.5 Annex G), pydicom's own encoder.

All three are lossless: decoding returns the stored values exactly.
"""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from rapha.demo.iods import Image
from rapha.demo.plan import Damage

__all__ = ["TRANSFER_SYNTAXES", "damage", "encode", "to_bytes"]

TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless)

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little endian
_PREAMBLE = bytes(128) + b"DICM"


def encode(image: Image, transfer_syntax: UID) -> Dataset:
    """Put ``image.pixels`` into its dataset in ``transfer_syntax`` and return the dataset.

    The dataset is modified in place; Lossy Image Compression, when present, stays ``00``.
    """
    ds = image.dataset
    pixels = image.pixels
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        data = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
        ds.add_new(0x7FE00010, "OW" if pixels.dtype.itemsize == 2 else "OB", data)
    # generate_instance_uid=False keeps the planted, seeded SOP Instance UID; pydicom would
    # otherwise mint a random one under its own root and break determinism.
    elif transfer_syntax == JPEG2000Lossless:
        if pixels.ndim != 2:
            raise ValueError("JPEG 2000 is only used for monochrome images in the archive")
        ds.compress(
            JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False
        )
    elif transfer_syntax == RLELossless:
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The DICOM file (PS3.10: preamble, ``DICM``, File Meta Information, data set)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def damage(data: bytes, kind: Damage, rng: np.random.Generator) -> bytes:
    """Break a DICOM file the way ``kind`` says; the result is deterministic in ``rng``.

    Every result fails to give pixels: pydicom either refuses the file or reads a data set
    whose Pixel Data is missing or shorter than Rows x Columns x samples needs.
    """
    pixel_tag = data.rfind(_PIXEL_DATA_TAG)
    if kind is Damage.TRUNCATED_PIXEL_DATA:
        # Explicit VR OB/OW header: tag 4, VR 2, reserved 2, length 4 (PS3.5 7.1.2).
        start = pixel_tag + 12
        return data[: start + int(rng.integers(1, max(2, (len(data) - start) // 2)))]
    if kind is Damage.TRUNCATED_HEADER:
        start = len(_PREAMBLE)
        return data[: start + int(rng.integers((pixel_tag - start) // 3, pixel_tag - start))]
    if kind is Damage.GARBAGE_AFTER_PREAMBLE:
        return _PREAMBLE + rng.bytes(max(256, len(data) - len(_PREAMBLE)))
    return b""
