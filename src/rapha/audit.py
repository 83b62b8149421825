"""The node's append-only, hash-chained, signed audit log (DESIGN.md, "Trust boundaries").

Every crossing of trust boundaries 1 to 4 (a PACS query's scope, a view build, exclusion
counts, an upload) is one line of JSON Lines. A line is the RFC 8785 canonical JSON of::

    {"v": 1, "seq": n, "time": "2025-01-31T12:00:00.000000Z", "event": "view.build",
     "data": {...}, "prev": "<hash of line n-1>", "hash": "<hash of this entry>",
     "sig": "<Ed25519 signature, hex>"}

* ``hash`` is the SHA-256 (hex) of the canonical JSON of the entry *without* ``hash`` and
  ``sig``; ``sig`` is the node key's Ed25519 signature over those same bytes.
* ``prev`` is the previous entry's ``hash``; the first entry (``seq`` 0, event
  ``audit.genesis``) has 64 zeros and names the signing key's public key in its data.
* The *head* is the hash of the last entry. Receipts and heartbeats carry the head and the
  entry count, so a later :func:`verify_log` against that anchor also detects a truncated
  tail, which no chain can detect on its own.

Editing, removing, inserting, reordering or duplicating any line breaks ``seq``, ``prev``,
``hash`` or ``sig`` and is reported by :func:`verify_log` with the line number.

**No PHI in the log.** ``data`` holds counts, digests, scope bounds and job ids: never a
patient name or ID, a DICOM UID (raw or pseudonymised), an accession number, free text or
a QIDO response. :meth:`AuditLog.append` refuses values that look like DICOM person names
(a ``^`` component separator, PS3.5 §6.2) or UIDs (dotted digits, PS3.5 §9.1) and strings
longer than :data:`MAX_STRING`, but that net catches mistakes, not every identifier: the
contract is on the caller.

Appends are crash-safe: the file is opened ``O_APPEND``, the entry is written as one full
line and ``fsync``ed under an exclusive ``flock``, and the tail is re-read under that lock,
so concurrent writers on one host extend one chain. A log whose last line is torn (a crash
mid-write, a full disk) or corrupt is never appended to: the operator must look first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rapha import crypto
from rapha.crypto import Ed25519PrivateKey, Ed25519PublicKey
from rapha.errors import DataError, IntegrityError, SignatureError, UsageError

__all__ = ["AuditLog", "AuditVerdict", "verify_log"]

FORMAT_VERSION: Final = 1
GENESIS_EVENT: Final = "audit.genesis"
GENESIS_PREV: Final = "0" * 64
#: Longest string value accepted in ``data``: long strings are where free text hides.
MAX_STRING: Final = 256
#: Largest canonical ``data`` accepted, in bytes.
MAX_DATA_BYTES: Final = 64 * 1024

_FIELDS: Final = frozenset({"v", "seq", "time", "event", "data", "prev", "hash", "sig"})
_EVENT_RE: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}")
_UID_RE: Final = re.compile(r"[0-9]+(\.[0-9]+)+")
_TAIL_CHUNK: Final = 64 * 1024
_LOG_MODE: Final = 0o640

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class AuditVerdict:
    """What a verified log (or a log's current tail) amounts to: the anchorable state."""

    entries: int
    head: str


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _hint(path: Path) -> str:
    return f"run `rapha node audit verify --log {path} --public-key FILE` and investigate"


# --- the data guard ----------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON (dicts, lists), refusing non-JSON and PHI-like values.

    Messages name the key path, never the value.
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise UsageError(
                f"audit data {where} is a string of {len(value)} characters "
                f"(at most {MAX_STRING}): free text does not belong in the audit log"
            )
        if "^" in value:
            raise UsageError(
                f"audit data {where} looks like a DICOM person name (contains '^'); "
                "the audit log must never hold PHI"
            )
        if _UID_RE.fullmatch(value) and (value.count(".") >= 3 or len(value) >= 16):
            raise UsageError(
                f"audit data {where} looks like a DICOM UID; "
                "the audit log must never hold UIDs, raw or pseudonymised"
            )
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
                raise UsageError(
                    f"audit data under {where} has a key that is not a short identifier "
                    "(a letter or '_', then letters, digits, '_', '.', '-'; at most 64)"
                )
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise UsageError(f"audit data {where} is a {type(value).__name__}, not a JSON value")


# --- entries -----------------------------------------------------------------------------


def _format_time(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError("the audit clock returned a naive datetime; it must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _body_bytes(body: Mapping[str, Any]) -> bytes:
    return crypto.canonical_json(dict(body))


def _make_line(
    key: Ed25519PrivateKey, *, seq: int, time: str, event: str, data: Any, prev: str
) -> tuple[bytes, str]:
    body = {
        "v": FORMAT_VERSION,
        "seq": seq,
        "time": time,
        "event": event,
        "data": data,
        "prev": prev,
    }
    raw = _body_bytes(body)
    entry_hash = hashlib.sha256(raw).hexdigest()
    entry = {**body, "hash": entry_hash, "sig": crypto.sign(key, raw).hex()}
    return crypto.canonical_json(entry) + b"\n", entry_hash


def _parse_line(raw: bytes, where: str, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Check one complete line on its own (form, hash, signature); return the entry.

    Chain checks (``seq``, ``prev``) are the caller's.
    """
    text = raw[:-1] if raw.endswith(b"\n") else raw
    try:
        entry = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where} is not valid JSON: it was edited or torn") from exc
    if not isinstance(entry, dict) or set(entry) != _FIELDS:
        raise IntegrityError(f"{where} does not have the audit entry fields: it was edited")
    try:
        canonical = crypto.canonical_json(entry)
    except DataError as exc:
        raise IntegrityError(f"{where} holds values no audit entry can hold") from exc
    if canonical != text:
        raise IntegrityError(f"{where} is not in the canonical form the node writes: it was edited")
    if (
        entry["v"] != FORMAT_VERSION
        or type(entry["seq"]) is not int
        or not isinstance(entry["time"], str)
        or not isinstance(entry["event"], str)
        or not isinstance(entry["data"], dict)
        or not isinstance(entry["prev"], str)
        or not isinstance(entry["hash"], str)
        or not isinstance(entry["sig"], str)
    ):
        raise IntegrityError(f"{where} has fields of the wrong type or version")
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    raw_body = _body_bytes(body)
    if hashlib.sha256(raw_body).hexdigest() != entry["hash"]:
        raise IntegrityError(f"{where} was edited: its hash does not match its contents")
    try:
        signature = bytes.fromhex(entry["sig"])
        crypto.verify(public_key, signature, raw_body)
    except (ValueError, SignatureError) as exc:
        raise SignatureError(
            f"{where}: the signature does not verify under the given public key "
            "(a wrong key, or the line was rewritten and re-hashed)"
        ) from exc
    return entry


def _iter_lines(path: Path) -> Iterator[bytes]:
    try:
        fh = path.open("rb")
    except FileNotFoundError as exc:
        raise IntegrityError(f"audit log {path} does not exist") from exc
    except OSError as exc:
        raise IntegrityError(f"audit log {path} cannot be read: {exc.strerror}") from exc
    with fh:
        yield from fh


def _genesis_key_hint(entry: Any, public_key: Ed25519PublicKey) -> str:
    data = entry.get("data") if isinstance(entry, dict) else None
    named = data.get("public_key") if isinstance(data, dict) else None
    given = crypto.public_key_bytes(public_key).hex()
    if isinstance(named, str) and named != given:
        return f"; the log was started by key {named[:16]}…, the given key is {given[:16]}…"
    return ""


def verify_log(
    path: Path,
    public_key: Ed25519PublicKey,
    *,
    expected_head: str | None = None,
    expected_count: int | None = None,
) -> AuditVerdict:
    """Verify every line of the audit log at ``path``; return its entry count and head.

    Raises :class:`IntegrityError` (:class:`SignatureError` for a bad signature or a wrong
    key) naming the first line that is wrong and how. With ``expected_head`` and/or
    ``expected_count`` (an anchor taken earlier, e.g. from a receipt) the log must still
    contain that state: an entry ``expected_count - 1`` whose hash is ``expected_head``.
    Entries appended since the anchor are fine; a removed tail is not.
    """
    if expected_head is not None and not _HEX64_RE.fullmatch(expected_head):
        raise UsageError("the expected head must be 64 lower-case hex characters (a SHA-256)")
    if expected_count is not None and expected_count < 1:
        raise UsageError("the expected entry count must be at least 1 (the genesis entry)")
    prev = GENESIS_PREV
    count = 0
    anchor_found = False
    for lineno, raw in enumerate(_iter_lines(path), start=1):
        if not raw.endswith(b"\n"):
            raise IntegrityError(
                f"line {lineno} is incomplete (no line end): a torn write from a crash or a "
                f"full disk, or an edit; the {lineno - 1} lines before it were checked"
            )
        try:
            entry = _parse_line(raw, f"line {lineno}", public_key)
        except SignatureError as exc:
            hint = ""
            if lineno == 1:
                with contextlib.suppress(ValueError):
                    hint = _genesis_key_hint(json.loads(raw), public_key)
            raise SignatureError(f"{exc}{hint}") from exc
        if entry["seq"] != lineno - 1:
            raise IntegrityError(
                f"line {lineno} has sequence number {entry['seq']}, expected {lineno - 1}: "
                "a line was removed, inserted, reordered or duplicated"
            )
        if entry["prev"] != prev:
            raise IntegrityError(
                f"line {lineno} does not follow line {lineno - 1} (its prev hash differs): "
                "a line was removed, inserted, reordered or edited"
            )
        if lineno == 1 and entry["event"] != GENESIS_EVENT:
            raise IntegrityError(f"line 1 is a {entry['event']!r} entry, not the genesis entry")
        prev = entry["hash"]
        count = lineno
        if expected_count is not None and lineno == expected_count:
            if expected_head is not None and prev != expected_head:
                raise IntegrityError(
                    f"line {lineno} has hash {prev[:16]}…, but the anchor says entry "
                    f"{expected_count} is {expected_head[:16]}…: the log was rewritten"
                )
            anchor_found = True
        elif expected_count is None and prev == expected_head:
            anchor_found = True
    if count == 0:
        raise IntegrityError(f"audit log {path} is empty: its genesis entry is missing")
    if expected_count is not None and count < expected_count:
        raise IntegrityError(
            f"the log has {count} entries but the anchor says {expected_count}: "
            f"{expected_count - count} entries were removed from its end"
        )
    if expected_head is not None and not anchor_found:
        raise IntegrityError(
            "the anchored head is not an entry of this log: its tail was removed or rewritten"
        )
    return AuditVerdict(entries=count, head=prev)


# --- the writer --------------------------------------------------------------------------


def _read_last_line(fd: int) -> bytes:
    """Return the file's last line (with its ``\\n`` when it has one); ``b""`` if empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    # Look for the newline that ends the line *before* the last one, skipping the final byte.
    pos = size - 1
    chunks: list[bytes] = []
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        cut = chunk.rfind(b"\n")
        if cut != -1:
            chunks.append(chunk[cut + 1 :])
            break
        chunks.append(chunk)
        pos = start
    chunks.reverse()
    return b"".join(chunks) + os.pread(fd, 1, size - 1)


class AuditLog:
    """Writer of one node's audit log. Create a new log with :meth:`create`.

    Opening checks the last entry (complete, canonical, hash, signature under ``key``'s
    public key) and refuses a torn or corrupt tail with :class:`IntegrityError`. It does
    not re-verify the whole chain; :func:`verify_log` does.
    """

    def __init__(self, path: Path, key: Ed25519PrivateKey, *, clock: Clock | None = None) -> None:
        self.path = path
        self._key = key
        self._public_key = key.public_key()
        self._clock: Clock = clock or _utc_now
        with self._locked(fcntl.LOCK_SH) as fd:
            self._tail(fd)

    @classmethod
    def create(cls, path: Path, key: Ed25519PrivateKey, *, clock: Clock | None = None) -> AuditLog:
        """Start a new log at ``path`` with its genesis entry; refuse an existing file."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, _LOG_MODE)
        except FileExistsError as exc:
            raise IntegrityError(
                f"audit log {path} already exists; refusing to start a second chain over it"
            ) from exc
        except OSError as exc:
            raise IntegrityError(f"cannot create audit log {path}: {exc.strerror}") from exc
        try:
            data = {
                "format": f"rapha-audit/{FORMAT_VERSION}",
                "public_key": crypto.public_key_bytes(key.public_key()).hex(),
            }
            time = _format_time((clock or _utc_now)())
            line, _ = _make_line(
                key, seq=0, time=time, event=GENESIS_EVENT, data=data, prev=GENESIS_PREV
            )
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return cls(path, key, clock=clock)

    def head(self) -> str:
        """The hash of the last entry, for receipts and heartbeats to anchor."""
        return self.anchor().head

    def anchor(self) -> AuditVerdict:
        """The current entry count and head, read from the file's tail."""
        with self._locked(fcntl.LOCK_SH) as fd:
            return self._tail(fd)

    def append(self, event: str, data: Mapping[str, Any]) -> str:
        """Append one signed entry; return its hash (the new head).

        ``event`` is a short fixed dotted name (``pacs.query``, ``view.build``); ``data``
        is a JSON object of counts, digests and bounds, never PHI (see the module doc).
        """
        if not _EVENT_RE.fullmatch(event) or len(event) > 64:
            raise UsageError(
                "an audit event is a short dotted lower-case name such as 'view.build'"
            )
        if event == GENESIS_EVENT:
            raise UsageError("the genesis entry is written only by AuditLog.create")
        if not isinstance(data, Mapping):
            raise UsageError("audit data must be a mapping (a JSON object)")
        plain = _plain(data, "data")
        try:
            size = len(crypto.canonical_json(plain))
        except DataError as exc:
            raise UsageError(f"audit data cannot be written as canonical JSON: {exc}") from exc
        if size > MAX_DATA_BYTES:
            raise UsageError(f"audit data is {size} bytes; at most {MAX_DATA_BYTES} are allowed")
        with self._locked(fcntl.LOCK_EX) as fd:
            tail = self._tail(fd)
            line, entry_hash = _make_line(
                self._key,
                seq=tail.entries,
                time=_format_time(self._clock()),
                event=event,
                data=plain,
                prev=tail.head,
            )
            _write_all(fd, line)
            os.fsync(fd)
        return entry_hash

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError as exc:
            raise IntegrityError(
                f"audit log {self.path} does not exist; `rapha node init` creates it "
                "(if it existed before, it was removed: investigate)"
            ) from exc
        except OSError as exc:
            raise IntegrityError(f"cannot open audit log {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, mode)
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def _tail(self, fd: int) -> AuditVerdict:
        last = _read_last_line(fd)
        if not last:
            raise IntegrityError(
                f"audit log {self.path} is empty: its genesis entry is missing; {_hint(self.path)}"
            )
        if not last.endswith(b"\n"):
            raise IntegrityError(
                f"the last line of audit log {self.path} is torn (a crash or full disk "
                f"mid-write); refusing to append; {_hint(self.path)}"
            )
        try:
            entry = _parse_line(last, f"the last line of audit log {self.path}", self._public_key)
        except IntegrityError as exc:
            # Keep the class: a SignatureError here means another key wrote the log.
            raise type(exc)(f"{exc}; refusing to append; {_hint(self.path)}") from exc
        seq = entry["seq"]
        if seq < 0 or (seq == 0 and entry["event"] != GENESIS_EVENT):
            raise IntegrityError(
                f"the last line of audit log {self.path} has an impossible sequence number; "
                f"refusing to append; {_hint(self.path)}"
            )
        return AuditVerdict(entries=seq + 1, head=entry["hash"])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
