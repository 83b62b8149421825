"""Reading the few header values the privacy rules need, without pydicom's value conversion.

Values are taken from the raw element bytes when pydicom has not converted them yet. This
is faster than conversion, needs no global warning filters (which are not thread-safe),
and never triggers pydicom's read-time validation warnings, whose messages quote the
offending value: a malformed PatientName must not end up in a log line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = ["has_element", "strings", "unsigned_short"]

_SPECIFIC_CHARACTER_SET: Final = 0x00080005
_PADDING: Final = " \x00"


def _element(ds: Dataset, tag: int) -> DataElement | RawDataElement | None:
    elem = ds.get_item(tag)
    if isinstance(elem, DataElement | RawDataElement):
        return elem
    return None  # absent, or a slice/sequence-shaped answer we never ask for


def has_element(ds: Dataset, tag: int) -> bool:
    """Whether the top-level dataset holds ``tag`` at all (even with an empty value)."""
    return tag in ds


def _utf8(ds: Dataset) -> bool:
    charset = strings(ds, _SPECIFIC_CHARACTER_SET, utf8=False)
    return charset is not None and "ISO_IR 192" in charset


def strings(ds: Dataset, tag: int, *, utf8: bool | None = None) -> tuple[str, ...] | None:
    """The values of a string element, each without its padding; ``None`` when absent.

    A present element with an empty value gives ``()``. Raw bytes are decoded as UTF-8
    when the Specific Character Set (0008,0005) says ISO_IR 192 and as ISO 8859-1
    otherwise, which never fails and keeps the default repertoire (PS3.5 6.1.2) intact.
    """
    elem = _element(ds, tag)
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return ()
    if isinstance(elem, RawDataElement) or isinstance(value, bytes | bytearray):
        if not isinstance(value, bytes | bytearray):
            return ()  # a buffered raw value: only Pixel Data is ever buffered
        if utf8 is None:
            utf8 = _utf8(ds)
        text = bytes(value).decode("utf-8", "replace") if utf8 else bytes(value).decode("latin-1")
        parts: Sequence[object] = text.split("\\")
    elif isinstance(value, MultiValue | list | tuple):
        parts = list(value)
    else:
        parts = [value]
    out = tuple(str(p).strip(_PADDING) for p in parts if p is not None)
    return () if out == ("",) else out


def unsigned_short(ds: Dataset, tag: int) -> int | None:
    """A single US value (PS3.5 6.2), or ``None`` when absent, empty or multi-valued."""
    elem = _element(ds, tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(elem, RawDataElement):
        if not isinstance(value, bytes) or len(value) != 2:
            return None
        return int.from_bytes(value, "little" if elem.is_little_endian else "big")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None
