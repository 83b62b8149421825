"""Manual approvals: a person decides on each job before the node runs it.

With ``[hub] approvals = true`` in ``node.toml`` the node agent records every job it claims
as a *pending* request (:meth:`ApprovalStore.request`) and runs nothing until the
hospital's staff approve it (``rapha node approvals approve``). A request holds what a
person must see before deciding: the company, the bundle digest and its signer, the model
and its hyperparameters, the files that would leave, differential privacy, the price and
the estimated number of records.

Each job is one JSON file, ``<state_dir>/approvals/<job_id>.json`` (directory 0700, files
0600). Every read-modify-write holds an exclusive ``fcntl`` lock on a sibling lock file and
replaces the file atomically (write, fsync, rename, fsync the directory), so two people
deciding at once cannot both win and a crash leaves either the old or the new file. A
corrupt file is refused with :class:`DataError`, never reset: resetting could turn a
rejection back into a pending request.

A decision goes to the audit log (event ``agent.approval``: job id, new status, who
decided, and the *length* of the note, never its text) before the file is replaced, so a
decision the log lacks never takes effect; a failed write leaves the job pending.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from rapha import crypto
from rapha.audit import AuditLog
from rapha.errors import DataError, IntegrityError, UsageError

__all__ = [
    "APPROVALS_DIR",
    "AUDIT_EVENT",
    "Approval",
    "ApprovalStatus",
    "ApprovalStore",
]

APPROVALS_DIR: Final = "approvals"
AUDIT_EVENT: Final = "agent.approval"
_LOCK_FILE: Final = ".lock"
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700
_SCHEMA: Final = 1
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
_JOB_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DIGEST: Final = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT: Final = re.compile(r"[0-9a-f]{16,64}")
_MAX_NAME: Final = 128
_MAX_NOTE: Final = 2000
#: Fields whose value may differ when the agent asks again for the same job: the record
#: count is an estimate, recomputed from the PACS each time.
_VOLATILE: Final = frozenset({"records"})
_RECORD_FIELDS: Final = frozenset(
    {"schema", "job_id", "status", "request", "requested_at", "decided_at", "decided_by", "note"}
)

Clock = Callable[[], datetime]


class ApprovalStatus(StrEnum):
    """Where a job stands: waiting for a person, or decided (final)."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Approval:
    """One job's approval record. ``note`` is the approver's note, or the rejection reason."""

    job_id: str
    status: ApprovalStatus
    request: dict[str, Any] = field(repr=False)
    requested_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON (times as ISO 8601 UTC strings), as stored on disk."""
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "request": json.loads(json.dumps(self.request)),
            "requested_at": _format_time(self.requested_at),
            "decided_at": None if self.decided_at is None else _format_time(self.decided_at),
            "decided_by": self.decided_by,
            "note": self.note,
        }


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ApprovalStore:
    """The node's approval records, one JSON file per hub job under ``state_dir/approvals``.

    ``clock`` returns timezone-aware datetimes (default: the system clock, UTC). Nothing is
    created on disk until the first :meth:`request`.
    """

    def __init__(self, state_dir: Path, *, clock: Clock | None = None) -> None:
        self._dir = Path(state_dir) / APPROVALS_DIR
        self._clock: Clock = clock or _utc_now

    @property
    def directory(self) -> Path:
        """The directory holding one ``<job_id>.json`` per job."""
        return self._dir

    def path(self, job_id: str) -> Path:
        """The file of ``job_id`` (:class:`UsageError` for an id that is not a hub job id)."""
        return self._dir / f"{_check_job_id(job_id)}.json"

    def request(self, job_id: str, request: Mapping[str, Any]) -> Approval:
        """Record a pending request for ``job_id``; return the record.

        Idempotent: when the job was requested before, the existing record is returned
        whatever its status. The request must then be the same as before (the estimated
        ``records`` excepted): a job whose bundle, price or outputs changed after a person
        saw it is refused with :class:`IntegrityError`, since an approval covers only what
        was shown. :class:`UsageError` names a missing or malformed request field.
        """
        path = self.path(job_id)
        checked = _check_request(request)
        with self._locked(fcntl.LOCK_EX, create=True):
            existing = self._read(path)
            if existing is not None:
                _same_request(existing, checked)
                return existing
            record = Approval(
                job_id=job_id,
                status=ApprovalStatus.PENDING,
                request=checked,
                requested_at=_aware(self._clock()),
            )
            self._write(path, record)
        return record

    def get(self, job_id: str) -> Approval | None:
        """The record of ``job_id``, or ``None`` when it was never requested."""
        path = self.path(job_id)
        if not self._dir.is_dir():
            return None
        with self._locked(fcntl.LOCK_SH):
            return self._read(path)

    def all(self) -> list[Approval]:
        """Every record, oldest request first."""
        if not self._dir.is_dir():
            return []
        with self._locked(fcntl.LOCK_SH):
            records = []
            for path in sorted(self._dir.glob("*.json")):
                if _JOB_ID.fullmatch(path.stem):
                    record = self._read(path)
                    if record is not None:
                        records.append(record)
        return sorted(records, key=lambda r: (r.requested_at, r.job_id))

    def pending(self) -> list[Approval]:
        """The records still waiting for a decision, oldest request first."""
        return [r for r in self.all() if r.status is ApprovalStatus.PENDING]

    def approve(
        self, job_id: str, *, by: str, note: str = "", audit: AuditLog | None = None
    ) -> Approval:
        """Approve a pending job: ``by`` names who decided, ``note`` is optional.

        :class:`UsageError` when the job is unknown or already decided (naming its status).
        """
        return self._decide(
            job_id, ApprovalStatus.APPROVED, by=by, note=_check_note(note, "note"), audit=audit
        )

    def reject(
        self, job_id: str, *, by: str, reason: str, audit: AuditLog | None = None
    ) -> Approval:
        """Reject a pending job: ``by`` names who decided, ``reason`` (required) says why.

        :class:`UsageError` when the job is unknown or already decided (naming its status).
        """
        checked = _check_note(reason, "reason")
        if not checked.strip():
            raise UsageError("a rejection needs a reason (--reason): say why the job may not run")
        return self._decide(job_id, ApprovalStatus.REJECTED, by=by, note=checked, audit=audit)

    def _decide(
        self,
        job_id: str,
        status: ApprovalStatus,
        *,
        by: str,
        note: str,
        audit: AuditLog | None,
    ) -> Approval:
        path = self.path(job_id)
        by = _check_by(by)
        if not self._dir.is_dir():
            raise UsageError(_unknown(job_id))
        with self._locked(fcntl.LOCK_EX):
            current = self._read(path)
            if current is None:
                raise UsageError(_unknown(job_id))
            if current.status is not ApprovalStatus.PENDING:
                raise UsageError(
                    f"job {job_id} is already {current.status.value} (by {current.decided_by}); "
                    "a decision is final. Ask the company to submit a new job if it should run."
                )
            decided = Approval(
                job_id=job_id,
                status=status,
                request=current.request,
                requested_at=current.requested_at,
                decided_at=_aware(self._clock()),
                decided_by=by,
                note=note,
            )
            if audit is not None:
                # Logged first: a decision the audit log lacks must never take effect.
                audit.append(
                    AUDIT_EVENT,
                    {
                        "job_id": job_id,
                        "status": status.value,
                        "by": by,
                        "note_chars": len(note),
                    },
                )
            self._write(path, decided)
        return decided

    @contextmanager
    def _locked(self, kind: int, *, create: bool = False) -> Iterator[None]:
        try:
            if create and not self._dir.is_dir():
                self._dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                os.chmod(self._dir, _DIR_MODE)  # mkdir's mode is narrowed by the umask
            fd = os.open(self._dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise DataError(f"cannot open the approvals in {self._dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self, path: Path) -> Approval | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            doc: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(_corrupt(path, "it is not JSON")) from exc
        return _parse_record(doc, path)

    def _write(self, path: Path, record: Approval) -> None:
        data = json.dumps({"schema": _SCHEMA, **record.to_json()}, sort_keys=True, indent=2)
        crypto.write_private_atomic(path, data.encode() + b"\n", mode=_FILE_MODE)


# --- validation --------------------------------------------------------------------------


def _check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise UsageError(
            "a job id is 1-64 letters, digits, '_' or '-' (the hub's job id, as `rapha node "
            "approvals list` shows it)"
        )
    return job_id


def _check_by(by: object) -> str:
    if not isinstance(by, str) or not by.strip():
        raise UsageError("say who decides (--by NAME): a decision must name the person")
    by = by.strip()
    if len(by) > _MAX_NAME or not by.isprintable() or "^" in by:
        raise UsageError(
            f"--by must be a name of at most {_MAX_NAME} printable characters, without '^'"
        )
    return by


def _check_note(note: object, what: str) -> str:
    if not isinstance(note, str):
        raise UsageError(f"the {what} must be text")
    if len(note) > _MAX_NOTE:
        raise UsageError(f"the {what} is {len(note)} characters; at most {_MAX_NOTE} are allowed")
    if not all(ch.isprintable() or ch in "\n\t" for ch in note):
        raise UsageError(f"the {what} holds control characters; write plain text")
    return note


def _text(request: Mapping[str, Any], name: str, *, pattern: re.Pattern[str] | None = None) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise UsageError(f"approval request field {name!r} must be a non-empty string")
    if not value.isprintable() or (pattern is not None and not pattern.fullmatch(value)):
        raise UsageError(f"approval request field {name!r} is malformed")
    return value


def _count(request: Mapping[str, Any], name: str) -> int:
    value = request.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"approval request field {name!r} must be a whole number, at least 0")
    return value


def _object(request: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    value = request.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        shape = "an object or null" if optional else "an object"
        raise UsageError(f"approval request field {name!r} must be {shape}")
    return value


def _check_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """``request`` as plain JSON after checking every field a person is shown.

    Fields beyond the documented ones are kept (``rapha node approvals show`` lists them),
    so nothing the agent records is hidden from the person deciding.
    """
    if not isinstance(request, Mapping):
        raise UsageError("an approval request must be a mapping of fields")
    _text(request, "org")
    if request.get("kind") not in ("train", "evaluate"):
        raise UsageError("approval request field 'kind' must be 'train' or 'evaluate'")
    _text(request, "bundle_digest", pattern=_DIGEST)
    _text(request, "signer_fingerprint", pattern=_FINGERPRINT)
    if not isinstance(request.get("signer_pinned"), bool):
        raise UsageError("approval request field 'signer_pinned' must be true or false")
    model = _object(request, "model")
    if model.get("source") not in ("zoo", "custom"):
        raise UsageError("approval request field 'model.source' must be 'zoo' or 'custom'")
    if model.get("name") is not None and not isinstance(model.get("name"), str):
        raise UsageError("approval request field 'model.name' must be a string")
    if model.get("kwargs") is not None and not isinstance(model.get("kwargs"), Mapping):
        raise UsageError("approval request field 'model.kwargs' must be an object")
    _object(request, "hparams")
    outputs = request.get("outputs")
    if not isinstance(outputs, list | tuple) or not all(
        isinstance(name, str) and name and name.isprintable() for name in outputs
    ):
        raise UsageError("approval request field 'outputs' must be a list of file names")
    _object(request, "dp", optional=True)
    _count(request, "price_per_record")
    _count(request, "records")
    _object(request, "requirements")
    if not all(isinstance(key, str) for key in request):
        raise UsageError("approval request field names must be strings")
    try:
        plain: dict[str, Any] = json.loads(json.dumps(dict(request), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise UsageError("an approval request must hold JSON values only") from exc
    return plain


def _same_request(existing: Approval, request: dict[str, Any]) -> None:
    def fixed(doc: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k not in _VOLATILE}

    old, new = fixed(existing.request), fixed(request)
    if old != new:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise IntegrityError(
            f"job {existing.job_id} was already put up for approval ({existing.status.value}) "
            f"with different {', '.join(changed)}; an approval covers only what was shown. "
            "Ask the hub operator why the job changed; it will not run under this job id."
        )


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError("the approvals clock returned a naive datetime; it must be timezone-aware")
    return moment.astimezone(UTC)


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("not a time")
    return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)


def _parse_record(doc: Any, path: Path) -> Approval:
    """The record in ``doc``, read from ``path``; :class:`DataError` naming the file if bad."""
    if not isinstance(doc, dict) or set(doc) != _RECORD_FIELDS or doc["schema"] != _SCHEMA:
        raise DataError(_corrupt(path, "its fields are not those of an approval record"))
    if doc["job_id"] != path.stem:
        raise DataError(_corrupt(path, "it names another job"))
    try:
        status = ApprovalStatus(doc["status"])
        request = _check_request(doc["request"])
        requested_at = _parse_time(doc["requested_at"])
        decided_at = None if doc["decided_at"] is None else _parse_time(doc["decided_at"])
        decided_by = doc["decided_by"]
        note = _check_note(doc["note"], "note")
    except (ValueError, UsageError) as exc:
        raise DataError(_corrupt(path, f"a field is malformed ({exc})")) from exc
    if status is ApprovalStatus.PENDING:
        if decided_at is not None or decided_by is not None or note:
            raise DataError(_corrupt(path, "it is pending but holds a decision"))
    elif decided_at is None or not isinstance(decided_by, str) or not decided_by:
        raise DataError(_corrupt(path, "it is decided but does not say when or by whom"))
    return Approval(
        job_id=doc["job_id"],
        status=status,
        request=request,
        requested_at=requested_at,
        decided_at=decided_at,
        decided_by=decided_by,
        note=note,
    )


def _unknown(job_id: str) -> str:
    return (
        f"no approval request for job {job_id}; `rapha node approvals list --all` shows the "
        "jobs this node has put up for approval"
    )


def _corrupt(path: Path, why: str) -> str:
    return (
        f"{path} is not a valid approval record: {why}. Restore it from a backup; it is never "
        "reset automatically, since that could undo a decision"
    )
