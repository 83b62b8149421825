"""Safetensors for the output guard: a strict parser, a comparison, and the node's encoder.

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian
``N``, then ``N`` bytes of a UTF-8 JSON object, then the data buffer. Each key but
``__metadata__`` names a tensor ``{"dtype", "shape", "data_offsets": [begin, end]}`` with
offsets relative to the buffer.

The parser is stricter than the reference one, because the bytes come from untrusted
code: duplicate keys, unknown fields, holes or overlaps between tensors, bytes after the
last tensor and boolean bytes other than 0 and 1 are all refused (each could carry data
the re-encoding would otherwise have to reason about). It works on bytes already in memory
and never touches a path.

The encoder writes what the node decides: tensor names, dtypes and shapes from the
*submitted* weights, and only each tensor's data bytes from the sandbox. No
``__metadata__`` is ever written. BF16 is handled without numpy's help (numpy has no
bfloat16): finiteness is checked on the raw 16-bit patterns.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from rapha.runtime._safetensors import MAX_HEADER_BYTES, HeaderError, parse_header

__all__ = ["Tensor", "TensorError", "check_finite", "compare", "encode", "parse", "summary"]

#: dtype -> (bytes per element, numpy dtype for the finiteness check or None).
_DTYPES: Final[dict[str, tuple[int, str | None]]] = {
    "BOOL": (1, None),
    "U8": (1, None),
    "I8": (1, None),
    "U16": (2, None),
    "I16": (2, None),
    "F16": (2, "<f2"),
    "BF16": (2, None),
    "U32": (4, None),
    "I32": (4, None),
    "F32": (4, "<f4"),
    "U64": (8, None),
    "I64": (8, None),
    "F64": (8, "<f8"),
}
_BF16_EXPONENT: Final = 0x7F80


class TensorError(Exception):
    """A parse or comparison failure: ``code`` is a guard reason code (never a name)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Tensor:
    """One tensor: its dtype, shape and its bytes (a view into the file's buffer)."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview


def parse(raw: bytes) -> dict[str, Tensor]:
    """The tensors of a safetensors file held in ``raw``; :class:`TensorError` otherwise.

    The header is checked by :func:`rapha.runtime._safetensors.parse_header`, the same
    validator bundle verification uses. Codes: ``malformed_weights`` (not safetensors, or
    not strictly so) and ``unsupported_dtype`` (a dtype the guard cannot check, such as
    the FP8 types).
    """
    if len(raw) < 8:
        raise TensorError("malformed_weights")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(raw):
        raise TensorError("malformed_weights")
    try:
        entries = parse_header(raw[8 : 8 + size], data_size=len(raw) - 8 - size)
    except HeaderError as exc:
        raise TensorError(exc.code) from exc
    buffer = memoryview(raw)[8 + size :]
    tensors: dict[str, Tensor] = {}
    for name, entry in entries.items():
        if entry.dtype not in _DTYPES:
            raise TensorError("unsupported_dtype")
        tensors[name] = Tensor(entry.dtype, entry.shape, buffer[entry.begin : entry.end])
        if entry.dtype == "BOOL" and np.any(np.frombuffer(tensors[name].data, np.uint8) > 1):
            raise TensorError("malformed_weights")
    return tensors


def compare(expected: dict[str, Tensor], actual: dict[str, Tensor]) -> list[str]:
    """Reason codes for differences in names, shapes and dtypes (empty when equal)."""
    codes: list[str] = []
    if set(actual) - set(expected):
        codes.append("extra_tensor")
    if set(expected) - set(actual):
        codes.append("missing_tensor")
    common = set(expected) & set(actual)
    if any(expected[n].dtype != actual[n].dtype for n in common):
        codes.append("dtype_mismatch")
    if any(expected[n].shape != actual[n].shape for n in common):
        codes.append("shape_mismatch")
    return codes


def check_finite(tensors: dict[str, Tensor]) -> bool:
    """Whether every floating-point value is finite (no NaN, no infinity)."""
    for tensor in tensors.values():
        if tensor.dtype == "BF16":
            bits = np.frombuffer(tensor.data, dtype="<u2")
            if np.any((bits & _BF16_EXPONENT) == _BF16_EXPONENT):
                return False
            continue
        numpy_dtype = _DTYPES[tensor.dtype][1]
        if (
            numpy_dtype is not None
            and not np.isfinite(np.frombuffer(tensor.data, dtype=numpy_dtype)).all()
        ):
            return False
    return True


def encode(expected: dict[str, Tensor], actual: dict[str, Tensor]) -> bytes:
    """A new safetensors file: ``expected``'s names, dtypes and shapes, ``actual``'s data.

    Tensors are laid out in sorted name order with no ``__metadata__``; the header is
    padded with spaces to a multiple of 8 bytes, as the reference writer does.
    """
    header: dict[str, Any] = {}
    position = 0
    names = sorted(expected)
    for name in names:
        spec, data = expected[name], actual[name].data
        header[name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [position, position + data.nbytes],
        }
        position += data.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *(actual[n].data for n in names)])


def summary(tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Counts for the output policy: tensors, parameters and the dtypes used."""
    return {
        "tensors": len(tensors),
        "parameters": sum(math.prod(t.shape) for t in tensors.values()),
        "dtypes": sorted({t.dtype for t in tensors.values()}),
    }
