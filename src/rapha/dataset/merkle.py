"""The view's parameters and digest, and the readers that recompute the digest from files.

:class:`ViewParams` is what the model sees besides the records (size, dtype, findings,
ratios, job id, allowlist, PS3.15 options); it is written to ``view.json`` and bound into
the digest. The digest is a Merkle root over the records with the parameters bound in.
Every hash is SHA-256 (:func:`rapha.crypto.digest_bytes`); every structured value is
hashed as RFC 8785 canonical JSON (:func:`rapha.crypto.canonical_json`); every
concatenation ``a ‖ b ‖ …`` is length-prefixed (8-byte big-endian length before each
field), so no two different field lists hash alike.

* **Leaf** of a record: ``H(0x00 ‖ lp(record id, split, labels, H(pixels), H(meta)))``
  where ``pixels`` are the exact bytes stored in ``images.npy`` for that row and ``meta``
  the canonical JSON of its allowlisted metadata.
* **labels** is the canonical JSON of the record's labels for train and val. For test it
  is ``canonical({"commitment": C})`` with ``C = H(lp("rapha-test-labels-v1", salt,
  canonical(labels)))``: the test labels are part of what was chosen, so they are in the
  digest, but a plain hash of a few 1/0/-1/None values could be reversed by trying all
  combinations, and the view (which a predict sandbox reads) must not reveal them. The
  salt is derived from the patient's stable pseudonym, which never leaves the node, and
  the record id; it is kept next to the labels in the node's private directory.
* **Tree**: RFC 6962 section 2.1 (``H(0x01 ‖ left ‖ right)``, split at the largest power
  of two), over the leaves sorted by (split in train, val, test order; record id).
* **Digest**: ``H(lp("rapha-view-v1", H(canonical(params)), root))``: the digest pins what
  the model saw (size, dtype, findings, ratios, allowlist, options, job id), not only
  which records were chosen.

The readers check that each file is exactly what the writer produces and raise
:class:`~rapha.errors.IntegrityError` naming the file, never a value, otherwise.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from rapha.crypto import canonical_json, digest_bytes
from rapha.dataset.pixels import PixelDType
from rapha.dataset.splits import DEFAULT_RATIOS, Split, check_ratios
from rapha.errors import ConfigError, DataError, IntegrityError

__all__ = [
    "DEFAULT_ALLOWLIST",
    "LABEL_VALUES",
    "NAME_PATTERN",
    "SCHEMA_VERSION",
    "VIEW_DOMAIN",
    "ViewParams",
    "check_test_labels",
    "label_commitment",
    "label_salt",
    "labels_field",
    "leaf_hash",
    "merkle_root",
    "npy_header",
    "read_canonical",
    "read_image_digests",
    "read_record_lines",
    "row_bytes",
    "view_digest",
    "view_document",
]

SCHEMA_VERSION: Final = 1
VIEW_DOMAIN: Final = b"rapha-view-v1"
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
"""Record ids, finding names, allowlist fields, option codes, job ids."""
LABEL_VALUES: Final = (1, 0, -1, None)
DEFAULT_ALLOWLIST: Final = (
    "modality",
    "body_part",
    "view_position",
    "laterality",
    "sex",
    "age_band",
    "manufacturer",
    "model",
    "pixel_spacing",
    "rows",
    "columns",
    "photometric_interpretation",
)
"""The metadata fields the issue allows into a view (the node passes its own list)."""
_SALT_DOMAIN: Final = b"rapha-test-label-salt-v1"
_COMMIT_DOMAIN: Final = b"rapha-test-labels-v1"


# --- parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewParams:
    """What the model sees, bound into the digest.

    ``size`` is (height, width). ``job_salt_id`` is a public name for the job's salt (the
    job id, or a digest of the salt), never the salt. ``allowlist`` names the metadata
    fields records may carry (by default the issue's list, :data:`DEFAULT_ALLOWLIST`) and
    ``options`` the PS3.15 E.1-1 options (e.g. ``rtnDevIdOpt``) they rely on.
    """

    size: tuple[int, int]
    dtype: PixelDType
    findings: tuple[str, ...]
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    job_salt_id: str = "preview"
    allowlist: tuple[str, ...] = DEFAULT_ALLOWLIST
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        size = tuple(self.size)
        if len(size) != 2 or not all(type(n) is int and 1 <= n <= 1 << 14 for n in size):
            raise ConfigError("view size must be two integers (height, width) in 1..16384")
        try:
            dtype = PixelDType(self.dtype)
        except ValueError as exc:
            raise ConfigError(f"view dtype must be one of {[d.value for d in PixelDType]}") from exc
        _check_names("finding", self.findings)
        _check_names("allowlist field", self.allowlist)
        _check_names("option", self.options)
        if not isinstance(self.job_salt_id, str) or not NAME_PATTERN.fullmatch(self.job_salt_id):
            raise ConfigError("job_salt_id must be 1-128 letters, digits or _.:-")
        object.__setattr__(self, "size", (size[0], size[1]))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "ratios", check_ratios(self.ratios))
        object.__setattr__(self, "allowlist", tuple(self.allowlist))
        object.__setattr__(self, "options", tuple(self.options))

    def to_json(self) -> dict[str, Any]:
        """The parameters as written to ``view.json`` and hashed into the digest."""
        return {
            "schema_version": SCHEMA_VERSION,
            "size": list(self.size),
            "dtype": self.dtype.value,
            "findings": list(self.findings),
            "ratios": list(self.ratios),
            "job_salt_id": self.job_salt_id,
            "allowlist": list(self.allowlist),
            "options": list(self.options),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ViewParams:
        """Parse :meth:`to_json` output; :class:`ConfigError` when it is not one."""
        try:
            if data["schema_version"] != SCHEMA_VERSION:
                raise ConfigError(f"view schema version {data['schema_version']!r} is unknown")
            params = cls(
                size=tuple(data["size"]),
                dtype=PixelDType(data["dtype"]),
                findings=tuple(data["findings"]),
                job_salt_id=data["job_salt_id"],
                ratios=tuple(data["ratios"]),
                allowlist=tuple(data["allowlist"]),
                options=tuple(data["options"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("view parameters are malformed") from exc
        if params.to_json() != dict(data):
            raise ConfigError("view parameters carry unknown or non-canonical fields")
        return params


def _check_names(label: str, names: Sequence[str]) -> None:
    if isinstance(names, str) or not all(
        isinstance(n, str) and NAME_PATTERN.fullmatch(n) for n in names
    ):
        raise ConfigError(f"each {label} must be a name of letters, digits or _.:-")
    if len(set(names)) != len(names):
        raise ConfigError(f"a {label} is listed twice")


def npy_header(params: ViewParams, count: int) -> bytes:
    """The exact numpy format 1.0 header of a split's ``images.npy``."""
    fields = {
        "descr": np.lib.format.dtype_to_descr(params.dtype.numpy),
        "fortran_order": False,
        "shape": (count, *params.size),
    }
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, fields)
    return buf.getvalue()


def row_bytes(params: ViewParams) -> int:
    """Bytes of one stored image."""
    return params.size[0] * params.size[1] * params.dtype.numpy.itemsize


def view_document(
    params: ViewParams, counts: Mapping[str, int], exclusions: Mapping[str, int], digest: str
) -> dict[str, Any]:
    """The whole of ``view.json`` (written as canonical JSON plus a newline)."""
    return {
        "format": "rapha-view",
        "schema_version": SCHEMA_VERSION,
        "params": params.to_json(),
        "counts": dict(counts),
        "exclusions": dict(exclusions),
        "label_names": list(params.findings),
        "allowlist": list(params.allowlist),
        "options": list(params.options),
        "pixels": {
            "dtype": params.dtype.value,
            "scale": params.dtype.scale,
            "shape": list(params.size),
            "layout": "N x H x W per split; value / scale in [0, 1], 0 is black",
        },
        "test_labels": "withheld: held by the node; test records carry a labels_commitment",
        "digest": digest,
    }


# --- the digest ---------------------------------------------------------------------------


def _lp(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(8, "big") + f for f in fields)


def _h(data: bytes) -> bytes:
    return bytes.fromhex(digest_bytes(data))


def leaf_hash(
    record_id: str, split: str, labels: bytes, pixels_digest: str, meta_digest: str
) -> bytes:
    """The 32-byte leaf of one record; digests are the hex SHA-256 of pixels and meta."""
    entry = _lp(
        record_id.encode("utf-8"),
        split.encode("utf-8"),
        labels,
        bytes.fromhex(pixels_digest),
        bytes.fromhex(meta_digest),
    )
    return _h(b"\x00" + entry)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash of already-hashed leaves (``H()`` of nothing when empty).

    Bottom-up: an unpaired last node moves up a level unchanged, which yields the same root
    as RFC 6962's split at the largest power of two smaller than the leaf count.
    """
    if not leaves:
        return _h(b"")
    level = list(leaves)
    while len(level) > 1:
        paired = [_h(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def view_digest(params: Mapping[str, Any], root: bytes) -> str:
    """Bind the view parameters into the Merkle root; lower-case hex."""
    return digest_bytes(_lp(VIEW_DOMAIN, _h(canonical_json(dict(params))), root))


def label_salt(patient_pseudonym: str, record_id: str) -> str:
    """Per-record salt of a test-label commitment, secret because the pseudonym is."""
    return digest_bytes(_lp(_SALT_DOMAIN, patient_pseudonym.encode(), record_id.encode()))


def label_commitment(salt: str, labels: Mapping[str, int | None]) -> str:
    """Hiding, binding commitment to one test record's labels (hex)."""
    return digest_bytes(_lp(_COMMIT_DOMAIN, bytes.fromhex(salt), canonical_json(dict(labels))))


def labels_field(
    split: Split, labels: Mapping[str, int | None] | None, commitment: str | None
) -> bytes:
    """The leaf's labels field: canonical labels, or the commitment for the test split."""
    if split is Split.TEST:
        return canonical_json({"commitment": commitment})
    return canonical_json(dict(labels or {}))


# --- reading a view back (rapha.dataset.view.verify_view) -------------------------------


def read_canonical(path: Path) -> dict[str, Any]:
    """A JSON object file that must be its own canonical form plus a newline."""
    try:
        data = path.read_bytes()
        value = json.loads(data)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path.name} is missing or not JSON") from exc
    if not isinstance(value, dict) or data != canonical_json(value) + b"\n":
        raise IntegrityError(f"{path.name} is not the canonical JSON object the writer wrote")
    return value


def read_record_lines(
    path: Path, split: Split, *, allowlist: Sequence[str], findings: Sequence[str]
) -> list[dict[str, Any]]:
    """The lines of a split's ``records.jsonl``, each checked for form and order."""
    name = f"{split.value}/{path.name}"
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise IntegrityError(f"{name} cannot be read") from exc
    if raw_lines.pop() != b"":
        raise IntegrityError(f"{name} does not end with a newline")
    labels_key = "labels_commitment" if split is Split.TEST else "labels"
    keys = {"index", "record_id", "meta", labels_key}
    lines: list[dict[str, Any]] = []
    previous = ""
    for index, raw in enumerate(raw_lines):
        where = f"{name} line {index + 1}"
        try:
            line = json.loads(raw)
            canonical = canonical_json(line)
        except (ValueError, DataError) as exc:
            raise IntegrityError(f"{where} is not JSON") from exc
        if canonical != raw or not isinstance(line, dict) or set(line) != keys:
            raise IntegrityError(f"{where} is not the record line the writer wrote")
        record_id = line["record_id"]
        ok_id = isinstance(record_id, str) and NAME_PATTERN.fullmatch(record_id) is not None
        ok_meta = isinstance(line["meta"], dict) and set(line["meta"]) <= set(allowlist)
        if line["index"] != index or not ok_id or record_id <= previous or not ok_meta:
            raise IntegrityError(f"{where} has a wrong index, record id order or meta field")
        if split is Split.TEST:
            if not _is_digest(line[labels_key]):
                raise IntegrityError(f"{where} has a malformed labels commitment")
        elif not _valid_labels(line[labels_key], findings):
            raise IntegrityError(f"{where} has labels other than the view's findings")
        previous = record_id
        lines.append(line)
    return lines


def read_image_digests(path: Path, *, header: bytes, row_bytes: int, count: int) -> list[str]:
    """SHA-256 of each image row of an ``images.npy`` whose header must be ``header``."""
    name = f"{path.parent.name}/{path.name}"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            if fh.read(len(header)) != header or size != len(header) + count * row_bytes:
                raise IntegrityError(f"{name} does not hold {count} images of the view's shape")
            return [digest_bytes(fh.read(row_bytes)) for _ in range(count)]
    except OSError as exc:
        raise IntegrityError(f"{name} cannot be read") from exc


def check_test_labels(
    path: Path, *, findings: Sequence[str], digest: str, commitments: Mapping[str, str]
) -> None:
    """The node's test-label file must belong to the view and open its commitments."""
    document = read_canonical(path)
    records = document.get("records")
    if (
        document.get("schema_version") != 1
        or document.get("view_digest") != digest
        or document.get("findings") != list(findings)
        or not isinstance(records, dict)
        or set(records) != set(commitments)
    ):
        raise IntegrityError(f"{path.name} belongs to another view")
    for record_id, held in records.items():
        ok = (
            isinstance(held, dict)
            and set(held) == {"labels", "salt"}
            and _valid_labels(held["labels"], findings)
            and _is_digest(held["salt"])
            and label_commitment(held["salt"], held["labels"]) == commitments[record_id]
        )
        if not ok:
            raise IntegrityError(f"{path.name} does not match the view's commitments")


def _valid_labels(labels: Any, findings: Sequence[str]) -> bool:
    return (
        isinstance(labels, dict)
        and set(labels) == set(findings)
        and all(not isinstance(v, bool) and v in LABEL_VALUES for v in labels.values())
    )


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None
