"""The output guard: what may come back from the sandbox and leave the hospital.

DESIGN.md, trust boundary 3 ("Sandbox → node") and "Outbox". :func:`guard_outputs` runs
after the sandbox's process tree has exited, on its output directory, whose every byte and
name was chosen by untrusted code. Nothing reaches the outbox unless every check passes,
in this order (all reasons found are reported, but later checks run only on what earlier
ones let through):

1. **Files.** Only regular files with one link, opened ``O_NOFOLLOW`` relative to a
   directory descriptor and ``fstat``ed (see :mod:`rapha.runtime._guard_files`): no
   symlinks, hard links, FIFOs, sockets, devices or subdirectories. Only the names the
   job's :class:`OutputPolicy` lists may be there, and all of them must be: one stray
   file denies the *whole* output (a stray file is either a bug or an attempt, and
   dropping it silently would hide both). ``metrics.json`` and ``receipt.json`` are the
   node's; a sandbox file by those names is refused. The total size is capped before any
   byte is read.
2. **No DICOM.** No ``*.dcm`` name (any case); no file, and no tensor buffer, with
   ``DICM`` at offset 128 (PS3.10 §7.1); nothing pydicom reads as DICOM.
3. **Weights.** Each file must parse, strictly, as safetensors (on the bytes already read,
   never reopened) with exactly the tensor names, shapes and dtypes of the submitted
   initial weights; no NaN or infinity unless the policy allows them. The node then
   writes a *new* file: names, dtypes and shapes from the submitted weights, only the data
   bytes from the sandbox, no ``__metadata__``. The sandbox's bytes are never forwarded.
4. **Egress scan**, a tripwire rather than the control (model weights can carry anything
   in their low bits; a test shows an XOR-encoded identifier passing): every entry name,
   the sandbox's raw bytes, the re-encoded files and the node's ``metrics.json`` are
   searched with :func:`rapha.privacy.find_leaks` for each identifier of the cohort, also
   as the lower-case hex of its UTF-8 bytes. The *raw* bytes are scanned too, although
   they never leave: an identifier in a tensor name or in ``__metadata__`` (both dropped
   by the re-encoding) still shows the code tried to leak, and the output is denied.
5. **Policy.** The hospital's Rego output policy
   (:func:`~rapha.runtime.policy.evaluate_output_policy`) sees a manifest of what would
   leave and decides; a crash, timeout or undefined result is a deny.

Every decision, allow or deny, is appended to the audit log as ``guard.decision`` with its
reason codes and the outgoing files' names, sizes and SHA-256 digests. Reasons are stable
``code: explanation`` strings (:data:`REASONS`): they never echo a name, value or byte the
sandbox chose, because any of those could be an identifier.

On allow, the outbox (absent, or an empty directory) receives the re-encoded files and
``metrics.json`` (RFC 8785 canonical JSON of the node's metrics: the exact bytes that were
scanned), built in a private directory next to it and renamed into place; the receipt is
written afterwards by its own module. On deny, nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydicom

from rapha import crypto
from rapha.audit import AuditLog
from rapha.errors import DataError, UsageError
from rapha.privacy import MIN_NEEDLE_CHARS, find_leaks
from rapha.runtime import _guard_tensors as tensors
from rapha.runtime._guard_files import RESERVED_NAMES, read_output_dir
from rapha.runtime.policy import DEFAULT_TIMEOUT, evaluate_output_policy

__all__ = [
    "AUDIT_EVENT",
    "METRICS_NAME",
    "REASONS",
    "GuardDecision",
    "OutboxFile",
    "OutputPolicy",
    "guard_outputs",
    "precheck_outputs",
]

#: The audit event every decision is recorded under.
AUDIT_EVENT: Final = "guard.decision"
#: The node's metrics document in the outbox.
METRICS_NAME: Final = "metrics.json"
#: Every reason code the guard itself gives, with its explanation (policy reasons aside).
REASONS: Final[Mapping[str, str]] = {
    "output_not_directory": "the sandbox output is not a plain directory",
    "output_unreadable": "the sandbox output directory cannot be read",
    "too_many_files": "the sandbox output holds too many entries",
    "symlink": "the output holds a symbolic link",
    "hard_link": "the output holds a file with more than one link",
    "subdirectory": "the output holds a subdirectory",
    "special_file": "the output holds a FIFO, socket or device",
    "reserved_name": "the sandbox wrote a file only the node may write (metrics or receipt)",
    "dicom_name": "the output holds a file with a .dcm name",
    "unexpected_file": "the output holds a file the job's output policy does not name",
    "missing_file": "a file the job's output policy names is missing",
    "too_large": "the outputs exceed the size limit",
    "changed_during_guard": "an output file changed while the guard read it",
    "dicom_content": "an output file or tensor holds DICOM data",
    "malformed_weights": "the weights are not well-formed safetensors",
    "unsupported_dtype": "the weights use a dtype the guard cannot check (such as FP8)",
    "extra_tensor": "the weights carry a tensor the submitted weights do not have",
    "missing_tensor": "the weights lack a tensor the submitted weights have",
    "shape_mismatch": "a tensor's shape differs from the submitted weights",
    "dtype_mismatch": "a tensor's dtype differs from the submitted weights",
    "nonfinite": "the weights hold NaN or infinite values",
    "metrics_invalid": "the node's metrics cannot be written as canonical JSON",
    "identifier_in_name": "an output file name contains an identifier of the cohort",
    "identifier_in_output": "output bytes contain an identifier of the cohort",
    "identifier_in_metrics": "the metrics contain an identifier of the cohort",
    "egress_unscannable": "the egress scan could not read every output byte",
}

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.safetensors")
_NAMES_FILE: Final = "names.txt"


@dataclass(frozen=True)
class OutputPolicy:
    """What a job may return: exactly ``files`` (safetensors), within ``max_total_bytes``.

    ``max_total_bytes`` bounds the sandbox's files before they are read and everything
    that would leave (``metrics.json`` included) after re-encoding.
    """

    files: tuple[str, ...]
    max_total_bytes: int = 512 << 20
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if len(set(self.files)) != len(self.files):
            raise UsageError("an output policy names a file twice")
        for name in self.files:
            if not _NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
                raise UsageError(
                    "output policy files must be plain '*.safetensors' names (letters, "
                    "digits, '.', '_', '-'), and not names the node writes"
                )
        if self.max_total_bytes <= 0:
            raise UsageError("an output policy's max_total_bytes must be above 0")

    @classmethod
    def default_for(cls, kind: str) -> OutputPolicy:
        """``weights.safetensors`` for a ``train`` job; no files for an ``evaluate`` job."""
        if kind == "train":
            return cls(("weights.safetensors",))
        if kind == "evaluate":
            return cls(())
        raise UsageError("a job kind is 'train' or 'evaluate'")

    def as_input(self) -> dict[str, Any]:
        """The policy as the output Rego policy sees it (``input.policy``)."""
        return {
            "files": list(self.files),
            "max_total_bytes": self.max_total_bytes,
            "allow_nonfinite": self.allow_nonfinite,
        }


@dataclass(frozen=True)
class OutboxFile:
    """One file in the outbox: its name, size in bytes and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, name: str, data: bytes) -> OutboxFile:
        """Describe ``data`` stored as ``name``."""
        return cls(name, len(data), hashlib.sha256(data).hexdigest())

    def as_json(self) -> dict[str, Any]:
        """``{"name", "size", "sha256"}``."""
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class GuardDecision:
    """The guard's verdict.

    ``files`` are the outbox's files (``metrics.json`` included) when ``allowed``, and
    empty otherwise; ``reasons`` are ``code: explanation`` strings, empty when allowed.
    """

    allowed: bool
    reasons: tuple[str, ...]
    files: tuple[OutboxFile, ...]


# --- arguments ---------------------------------------------------------------------------


def _needles(needles: Iterable[str]) -> list[str]:
    """The needles, plus the lower-case hex of each one's UTF-8 bytes (and case forms)."""
    plain: list[str] = []
    for index, needle in enumerate(needles):
        if not isinstance(needle, str) or len(needle.strip()) < MIN_NEEDLE_CHARS:
            raise UsageError(
                f"needle #{index} is not a string of at least {MIN_NEEDLE_CHARS} characters"
            )
        plain.append(needle.strip())
    forms = [f.encode("utf-8").hex() for n in plain for f in (n, n.lower(), n.upper())]
    return list(dict.fromkeys(plain + forms))


def _check_outbox(outbox: Path) -> None:
    if os.path.lexists(outbox) and (
        outbox.is_symlink() or not outbox.is_dir() or any(outbox.iterdir())
    ):
        raise UsageError(f"the outbox {outbox} must not exist or be an empty directory")
    outbox.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _initial(initial_weights: Path | None, policy: OutputPolicy) -> dict[str, tensors.Tensor]:
    if not policy.files:
        return {}
    if initial_weights is None:
        raise UsageError("an output policy that names files needs the submitted weights")
    try:
        return tensors.parse(initial_weights.read_bytes())
    except OSError as exc:
        raise DataError(f"the submitted weights {initial_weights} cannot be read") from exc
    except tensors.TensorError as exc:
        raise DataError(
            f"the submitted weights {initial_weights} are not safetensors the guard can check "
            f"({exc.code})"
        ) from exc


# --- checks ------------------------------------------------------------------------------


def _is_dicom(raw: bytes) -> bool:
    """``DICM`` at offset 128 (PS3.10 §7.1), or anything pydicom reads as DICOM."""
    if raw[128:132] == b"DICM":
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on odd input; we only want yes/no
        try:
            pydicom.dcmread(io.BytesIO(raw), force=False, stop_before_pixels=True)
        except Exception:  # any failure to parse means "not DICOM"
            return False
    return True


def _check_weights(
    raw: bytes, initial: dict[str, tensors.Tensor], policy: OutputPolicy
) -> tuple[list[str], bytes, dict[str, Any]]:
    """Reason codes, the re-encoded file (when no codes) and its tensor summary."""
    codes = ["dicom_content"] if _is_dicom(raw) else []
    try:
        found = tensors.parse(raw)
    except tensors.TensorError as exc:
        return [*codes, exc.code], b"", {}
    codes += tensors.compare(initial, found)
    if codes:
        return codes, b"", {}
    if not policy.allow_nonfinite and not tensors.check_finite(found):
        codes.append("nonfinite")
    # A tensor's buffer can hold a whole DICOM file; its magic is the cheap tell (pydicom
    # would find nothing more: without ``force`` it refuses data lacking the magic).
    if any(bytes(t.data[128:132]) == b"DICM" for t in found.values()):
        codes.append("dicom_content")
    if codes:
        return codes, b"", {}
    return [], tensors.encode(initial, found), tensors.summary(initial)


def _scan(scan_dir: Path, staging: Path | None, needles: list[str]) -> list[str]:
    """Reason codes for identifiers in names, raw bytes, re-encoded files or metrics."""
    codes: list[str] = []
    try:
        leaks = find_leaks(scan_dir, needles)
        if staging is not None:
            leaks += find_leaks(staging, needles)
    except DataError:
        return ["egress_unscannable"]
    for leak in leaks:
        if leak.path.name == _NAMES_FILE or leak.encoding.endswith("+name"):
            code = "identifier_in_name"
        elif leak.path.name == METRICS_NAME and leak.path.parent == staging:
            code = "identifier_in_metrics"
        else:
            code = "identifier_in_output"
        if code not in codes:
            codes.append(code)
    return codes


# --- the guard ---------------------------------------------------------------------------


def guard_outputs(
    *,
    out_dir: Path,
    outbox: Path,
    initial_weights: Path | None,
    policy: OutputPolicy,
    needles: Iterable[str],
    metrics: Mapping[str, Any],
    dp: Mapping[str, Any] | None,
    job: Mapping[str, Any],
    rego_policy: Path | None,
    audit: AuditLog,
    hospital: Mapping[str, Any] | None = None,
    policy_timeout: float = DEFAULT_TIMEOUT,
) -> GuardDecision:
    """Check the sandbox's ``out_dir``; on allow, fill ``outbox`` (see the module docstring).

    Args:
        out_dir: the sandbox's output directory (untrusted); absent means "no files".
        outbox: where the approved files go; must not exist or be an empty directory.
        initial_weights: the verified bundle's ``weights.safetensors`` (trusted); needed
            when ``policy`` names files.
        policy: the job's output policy.
        needles: every identifier of the cohort (record ids, pseudonyms, raw IDs, names,
            accession numbers), each at least :data:`rapha.privacy.MIN_NEEDLE_CHARS` long.
        metrics: the node's own metrics document (plain JSON, no NaN).
        dp: the privacy spent (``{"epsilon", "delta"}``), or ``None``.
        job: job metadata for the policy and the audit entry (``id``, ``kind``, ...).
        rego_policy: the hospital's ``output.rego``; ``None`` for the default.
        audit: the node's audit log; every decision is appended to it.
        hospital: the node's ``[policy]`` settings, as ``input.hospital`` of the policy.
        policy_timeout: seconds the Rego evaluation may take.

    Returns:
        The decision. A deny is a return value, not an exception.

    Raises:
        UsageError: bad arguments (a short needle, a non-empty outbox ...); nothing written.
        DataError: the submitted weights cannot be read; nothing written.
    """
    needle_list = _needles(needles)
    _check_outbox(outbox)
    initial = _initial(initial_weights, policy)
    scan_dir = Path(tempfile.mkdtemp(prefix=f".{outbox.name}.scan-", dir=outbox.parent))
    staging: Path | None = None
    try:
        listing = read_output_dir(out_dir, frozenset(policy.files), policy.max_total_bytes)
        codes = list(listing.codes)
        names = "\n".join(listing.names).encode("utf-8", "surrogateescape")
        crypto.write_private_file(scan_dir / _NAMES_FILE, names)
        read = [OutboxFile.of(name, raw) for name, raw in listing.contents.items()]
        encoded: dict[str, bytes] = {}
        manifest: list[dict[str, Any]] = []
        for index, (name, raw) in enumerate(listing.contents.items()):
            crypto.write_private_file(scan_dir / f"raw-{index}", raw)
            file_codes, data, summary = _check_weights(raw, initial, policy)
            codes += [c for c in file_codes if c not in codes]
            encoded[name] = data
            manifest.append({**OutboxFile.of(name, data).as_json(), **summary})
        try:
            metrics_bytes = crypto.canonical_json(dict(metrics))
        except DataError:
            codes.append("metrics_invalid")
            metrics_bytes = b""
        if not codes:
            staging = Path(tempfile.mkdtemp(prefix=f".{outbox.name}.staging-", dir=outbox.parent))
            for name, data in encoded.items():
                crypto.write_private_file(staging / name, data)
            crypto.write_private_file(staging / METRICS_NAME, metrics_bytes)
        total = sum(len(d) for d in encoded.values()) + len(metrics_bytes)
        if total > policy.max_total_bytes and "too_large" not in codes:
            codes.append("too_large")
        codes += [c for c in _scan(scan_dir, staging, needle_list) if c not in codes]
        reasons = [f"{code}: {REASONS[code]}" for code in codes]
        if not reasons:
            verdict = evaluate_output_policy(
                rego_policy,
                {
                    "job": dict(job),
                    "outputs": manifest,
                    "metrics_bytes": len(metrics_bytes),
                    "total_bytes": total,
                    "metrics": dict(metrics),
                    "dp": None if dp is None else dict(dp),
                    "policy": policy.as_input(),
                    "hospital": dict(hospital or {}),
                },
                timeout=policy_timeout,
            )
            reasons = list(verdict.reasons)
        files: tuple[OutboxFile, ...] = ()
        if not reasons:
            outgoing = {**encoded, METRICS_NAME: metrics_bytes}
            files = tuple(OutboxFile.of(n, d) for n, d in sorted(outgoing.items()))
        decision = GuardDecision(not reasons, tuple(reasons), files)
        audit.append(AUDIT_EVENT, _audit_data(decision, job, listing.names, read))
        if decision.allowed and staging is not None:
            if outbox.exists():
                outbox.rmdir()  # empty, checked above; rename cannot replace a directory
            os.rename(staging, outbox)
            staging = None
        return decision
    finally:
        shutil.rmtree(scan_dir, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def precheck_outputs(
    *,
    out_dir: Path,
    initial_weights: Path | None,
    policy: OutputPolicy,
    needles: Iterable[str],
    scratch: Path,
) -> tuple[str, ...]:
    """The reason codes checks 1 to 4 give on the sandbox's files alone; ``()`` if none.

    For a pipeline that wants to stop early (before evaluating outputs that can never
    leave): no policy runs, nothing is audited, and nothing is written but a private scan
    directory under ``scratch``, removed on return. A non-empty answer must still go
    through :func:`guard_outputs`, which records the denial.
    """
    needle_list = _needles(needles)
    initial = _initial(initial_weights, policy)
    scan_dir = Path(tempfile.mkdtemp(prefix=".precheck-", dir=scratch))
    try:
        listing = read_output_dir(out_dir, frozenset(policy.files), policy.max_total_bytes)
        codes = list(listing.codes)
        names = "\n".join(listing.names).encode("utf-8", "surrogateescape")
        crypto.write_private_file(scan_dir / _NAMES_FILE, names)
        for index, raw in enumerate(listing.contents.values()):
            crypto.write_private_file(scan_dir / f"raw-{index}", raw)
            file_codes, data, _ = _check_weights(raw, initial, policy)
            codes += [c for c in file_codes if c not in codes]
            if data:
                crypto.write_private_file(scan_dir / f"encoded-{index}", data)
        codes += [c for c in _scan(scan_dir, None, needle_list) if c not in codes]
        return tuple(codes)
    finally:
        shutil.rmtree(scan_dir, ignore_errors=True)


def _audit_data(
    decision: GuardDecision, job: Mapping[str, Any], names: list[str], read: list[OutboxFile]
) -> dict[str, Any]:
    """The audit entry: codes, counts and digests; sandbox-chosen names never appear.

    The only names recorded are the policy's own (``read``: files the guard opened, with
    the digest of the sandbox's bytes) and the outbox's.
    """
    job_id, kind = job.get("id"), job.get("kind")
    return {
        "job": job_id if isinstance(job_id, str) else None,
        "kind": kind if isinstance(kind, str) else None,
        "allowed": decision.allowed,
        "reasons": list(decision.reasons),
        "entries": len(names),
        "read": [f.as_json() for f in read],
        "files": [f.as_json() for f in decision.files],
    }
