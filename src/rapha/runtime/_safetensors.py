"""Validate a safetensors file from its header alone, without torch and without unpickling.

Format (huggingface/safetensors, "Format"): an 8-byte little-endian unsigned header length
``N``; ``N`` bytes of UTF-8 JSON, an object mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``"__metadata__"``
object of strings; then the data buffer. We additionally require what the reference
implementation requires of a file it wrote: offsets that tile the buffer exactly (first at
0, each tensor starting where the previous ended, no gaps, no overlap) and no bytes after
the last tensor, and each tensor's byte length equal to ``prod(shape) * itemsize(dtype)``.

:func:`parse_header` is the one validator: bundle verification (:func:`read_weights_spec`,
which reads only the header of a file) and the output guard
(:mod:`rapha.runtime._guard_tensors`, on bytes already in memory) both call it, and turn
its :class:`HeaderError` into their own errors: a message for the company, a bare reason
code for the guard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rapha.errors import WeightsFormatError

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "Entry",
    "HeaderError",
    "WeightsSpec",
    "parse_header",
    "read_weights_spec",
]

MAX_HEADER_BYTES: Final = 100_000_000  # the reference implementation's own limit
DTYPE_SIZES: Final = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""Bytes per element of every dtype we accept."""

WeightsSpec = dict[str, tuple[str, tuple[int, ...]]]
"""Tensor name → (safetensors dtype, shape)."""

_TENSOR_KEYS: Final = frozenset({"dtype", "shape", "data_offsets"})


class HeaderError(Exception):
    """The header is not strict safetensors; ``code`` is the guard's reason code."""

    def __init__(self, message: str, code: str = "malformed_weights") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor of a header: dtype, shape, and its byte span in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise HeaderError("the safetensors header repeats a key")
    return dict(pairs)


def parse_header(raw: bytes, *, data_size: int) -> dict[str, Entry]:
    """The tensors of a header's JSON bytes ``raw``, for a data buffer of ``data_size``.

    Raises:
        HeaderError: not JSON, not an object, a repeated key, a bad ``__metadata__``, an
            entry without exactly dtype, shape and data_offsets, an unknown dtype, offsets
            that disagree with dtype and shape, overlap, leave gaps, or do not fill the
            buffer exactly.
    """
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(
            "not a safetensors file (its header is not JSON); save weights with "
            "safetensors.torch.save_file"
        ) from exc
    if not isinstance(header, dict):
        raise HeaderError("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    entries: dict[str, Entry] = {}
    for tensor, info in header.items():
        where = f"tensor {tensor!r}"
        if not tensor or not isinstance(info, dict) or set(info) != _TENSOR_KEYS:
            raise HeaderError(f"{where} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise HeaderError(f"{where} has a shape that is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise HeaderError(f"{where} has data_offsets that are not [begin, end]")
        begin, end = offsets
        if end < begin or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise HeaderError(f"{where}: its data_offsets do not match dtype and shape")
        entries[tensor] = Entry(dtype, tuple(shape), begin, end)
    position = 0
    for tensor, entry in sorted(entries.items(), key=lambda item: item[1].begin):
        if entry.begin != position:
            raise HeaderError(
                f"tensor {tensor!r} does not start where the previous one ends "
                "(overlapping or gapped data_offsets)"
            )
        position = entry.end
    if position != data_size:
        what = "past the end of the file" if position > data_size else "trailing bytes"
        raise HeaderError(f"the tensor data does not fill the file ({what})")
    return entries


def read_weights_spec(path: Path) -> WeightsSpec:
    """Return name → (dtype, shape) of a safetensors file, reading only its header.

    Raises :class:`WeightsFormatError` for anything that is not a well-formed safetensors
    file (see :func:`parse_header`; a pickle written by ``torch.save`` fails at the first
    check).
    """
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise WeightsFormatError(f"{name} is too short to be a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise WeightsFormatError(
                    f"{name} is not a safetensors file (its header length {header_len} "
                    f"does not fit a {size}-byte file); save weights with "
                    "safetensors.torch.save_file"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise WeightsFormatError(f"cannot read {name}: {exc.strerror}") from exc
    try:
        entries = parse_header(raw, data_size=size - 8 - header_len)
    except HeaderError as exc:
        raise WeightsFormatError(f"{name}: {exc}") from exc
    return {tensor: (e.dtype, e.shape) for tensor, e in entries.items()}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
