"""``rapha node report``: what one job did on this node, from the signed audit log alone.

The report is for the hospital's data-protection officer, to attach to a DPIA or a record
of processing. :func:`build_report` verifies the whole log first (hash chain, hashes,
signatures under the node key) and then reads the entries of one job: those whose data
has ``job_id`` equal to the job's id (``job`` for ``guard.decision`` entries, which name
their job that way). It says

* what ran (``agent.claimed``, ``job.admitted``): organisation, kind, model source,
  bundle digest, signer fingerprint and whether the hospital pinned it, DP and epsilon;
* on which records (``pacs.scope``, ``view.build``, ``view.failed``): counts only;
* the sandbox runs (``job.sandbox``);
* what left (``guard.decision``, ``job.evaluated``, ``job.outbox``, ``agent.delivered``,
  ``agent.failed``, ``agent.lost_lease``), approvals (``agent.approval``) and clean-up
  (``agent.cleanup``);
* a timeline of all the job's entries (time, event), unknown events included.

**Only named fields are reported**, each picked out of its event by this module: an
entry's other fields (and every field of an unknown event) never reach the report, so a
field added to an event later cannot leak into it unreviewed. A value this module expects
but does not find is shown as "not recorded": a job that failed early has few entries.

**A log that does not verify is still reported**, with the failure at the top (the first
bad line and why) and :attr:`JobReport.verified` false; its entries are read as they are
in the file and cannot be relied on. ``rapha node report`` then exits 4, so no script
takes such a report for a good one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rapha import crypto
from rapha.audit import verify_log
from rapha.crypto import Ed25519PublicKey
from rapha.errors import IntegrityError, UsageError
from rapha.node.settings import NodeSettings

__all__ = ["FORMAT", "KNOWN_EVENTS", "JobReport", "build_report", "job_report"]

#: The ``format`` field of the JSON report.
FORMAT: Final = "rapha.job-report/1"
#: Events the report describes in its sections (any other is listed in the timeline only).
KNOWN_EVENTS: Final = frozenset(
    {
        "agent.approval",
        "agent.claimed",
        "agent.cleanup",
        "agent.delivered",
        "agent.failed",
        "agent.lost_lease",
        "guard.decision",
        "job.admitted",
        "job.evaluated",
        "job.outbox",
        "job.quota",
        "job.sandbox",
        "pacs.scope",
        "view.build",
        "view.failed",
    }
)
_MAX_LIST: Final = 64


@dataclass(frozen=True)
class JobReport:
    """One job's report. :meth:`to_json` gives it as JSON; ``rapha node report`` also
    renders it as Markdown (:func:`rapha.cli.node_report.render_markdown`).

    ``sections`` holds the plain-JSON sections (``what_ran``, ``records``, ``sandbox``,
    ``outputs``, ``approvals``, ``cleanup``); ``timeline`` one ``{seq, time, event,
    described}`` per entry of the job.
    """

    job_id: str
    node: str | None
    log: Path
    verified: bool
    verify_error: str | None
    entries: int
    head: str | None
    generated: str
    sections: Mapping[str, Any]
    timeline: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON (``format`` :data:`FORMAT`)."""
        return {
            "format": FORMAT,
            "job_id": self.job_id,
            "node": self.node,
            "generated": self.generated,
            "audit_log": {
                "path": str(self.log),
                "verified": self.verified,
                "error": self.verify_error,
                "entries": self.entries,
                "head": self.head,
            },
            **self.sections,
            "timeline": [dict(t) for t in self.timeline],
        }


# --- reading the log -----------------------------------------------------------------------


def _read_entries(path: Path) -> list[dict[str, Any]]:
    """Every line of the log that parses as an entry (as it is in the file)."""
    entries: list[dict[str, Any]] = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IntegrityError(f"audit log {path} cannot be read: {exc.strerror}") from exc
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            entries.append(entry)
    return entries


def _belongs(entry: Mapping[str, Any], job_id: str) -> bool:
    data = entry["data"]
    if data.get("job_id") == job_id:
        return True
    return entry.get("event") == "guard.decision" and data.get("job") == job_id


# --- picking fields ------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _counts(value: Any) -> dict[str, int]:
    """A ``{name: count}`` mapping (per split, per exclusion reason), counts only."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if _int(v) is not None}


def _texts(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value[:_MAX_LIST] if isinstance(v, str)]


def _files(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    out = []
    for item in value[:_MAX_LIST]:
        if isinstance(item, Mapping):
            out.append(
                {
                    "name": _text(item.get("name")),
                    "size": _int(item.get("size")),
                    "sha256": _text(item.get("sha256")),
                }
            )
    return out


def _data(entries: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e["data"] for e in entries if e.get("event") == event]


def _last(entries: list[dict[str, Any]], event: str) -> dict[str, Any]:
    found = _data(entries, event)
    return found[-1] if found else {}


def _first_of(key: str, *sources: Mapping[str, Any]) -> Any:
    for source in sources:
        if source.get(key) is not None:
            return source[key]
    return None


def _signer(*sources: Mapping[str, Any]) -> tuple[str | None, bool | None]:
    """The signer's fingerprint and whether it was pinned: ``signer: {fingerprint,
    pinned}``, or ``signer_fingerprint`` and ``signer_pinned`` at the top level."""
    for source in sources:
        signer = source.get("signer")
        if isinstance(signer, Mapping):
            return _text(signer.get("fingerprint")), _bool(signer.get("pinned"))
    fingerprint = _text(_first_of("signer_fingerprint", *sources))
    return fingerprint, _bool(_first_of("signer_pinned", *sources))


def _dp(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """DP on or off, and epsilon when recorded (``dp`` as a flag or as a plan)."""
    dp = _first_of("dp", *sources)
    epsilon = _num(_first_of("epsilon", *sources)) or _num(_first_of("dp_epsilon", *sources))
    if isinstance(dp, Mapping):
        epsilon = _num(dp.get("epsilon")) or _num(dp.get("target_epsilon")) or epsilon
        return {"enabled": True, "epsilon": epsilon}
    return {"enabled": _bool(dp), "epsilon": epsilon}


def _what_ran(entries: list[dict[str, Any]]) -> dict[str, Any]:
    claimed, admitted = _last(entries, "agent.claimed"), _last(entries, "job.admitted")
    fingerprint, pinned = _signer(admitted, claimed)
    quota = _last(entries, "job.quota")
    return {
        "org": _text(_first_of("org", claimed, admitted)),
        "kind": _text(_first_of("kind", admitted, claimed)),
        "model_source": _text(admitted.get("model_source")),
        "bundle_digest": _text(_first_of("bundle_digest", admitted, claimed)),
        "signer_fingerprint": fingerprint,
        "signer_pinned": pinned,
        "dp": _dp(admitted, claimed),
        "price_per_record": _int(claimed.get("price_per_record")),
        "records_billed": _int(admitted.get("records")),
        "admitted": bool(admitted),
        "evaluations_left": _int(quota.get("evaluations_left")),
    }


def _records(entries: list[dict[str, Any]]) -> dict[str, Any]:
    scope = _last(entries, "pacs.scope")
    view = _last(entries, "view.build")
    failed = _last(entries, "view.failed")
    return {
        "scope": None
        if not scope
        else {
            "source": _text(scope.get("source")),
            "modalities": _texts(scope.get("modalities")),
            "body_parts": _texts(scope.get("body_parts")),
            "date_from": _text(scope.get("date_from")),
            "date_to": _text(scope.get("date_to")),
            "max_studies": _int(scope.get("max_studies")),
            "study_allow_list": _bool(scope.get("study_allow_list")),
            "accession_allow_list": _bool(scope.get("accession_allow_list")),
        },
        "view": None
        if not view
        else {
            "records": _int(view.get("records")),
            "counts": _counts(view.get("counts")),
            "exclusions": _counts(view.get("exclusions")),
            "studies": _int(view.get("studies")),
            "patients": _int(view.get("patients")),
            "digest": _text(view.get("digest")),
            "ocr_disabled": _texts(view.get("ocr_disabled")),
        },
        "view_failed": None if not failed else {"error": _text(failed.get("error"))},
    }


def _sandbox(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "mode": _text(run.get("mode")),
            "returncode": _int(run.get("returncode")),
            "wall_seconds": _num(run.get("wall_seconds")),
            "timed_out": _bool(run.get("timed_out")),
            "leftover_processes": _int(run.get("leftover_processes")),
        }
        for run in _data(entries, "job.sandbox")
    ]


def _outputs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    by_seq = [e for e in entries if e.get("event") == "guard.decision"]
    decisions = [
        {
            "time": _text(e.get("time")),
            "allowed": _bool(e["data"].get("allowed")),
            "reasons": _texts(e["data"].get("reasons")),
            "files": _files(e["data"].get("files")),
        }
        for e in by_seq
    ]
    evaluated = _last(entries, "job.evaluated")
    outbox = _last(entries, "job.outbox")
    delivered = _last(entries, "agent.delivered")
    failed = _last(entries, "agent.failed")
    return {
        "guard": decisions,
        "metrics_sha256": _text(evaluated.get("metrics_sha256")),
        "outbox_files": _int(outbox.get("files")) if outbox else None,
        "delivered": None
        if not delivered
        else {
            "receipt_hash": _text(delivered.get("receipt_hash")),
            "hub": _text(delivered.get("hub")),
            "files": _files(delivered.get("files")),
        },
        "failed": None if not failed else {"code": _text(failed.get("code"))},
        "lease_lost": bool(_data(entries, "agent.lost_lease")),
    }


def _approvals(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "time": _text(e.get("time")),
            "status": _text(e["data"].get("status")),
            "by": _text(e["data"].get("by")),
        }
        for e in entries
        if e.get("event") == "agent.approval"
    ]


def _cleanup(entries: list[dict[str, Any]]) -> dict[str, list[str]]:
    done = _data(entries, "agent.cleanup")
    return {
        "removed": [item for data in done for item in _texts(data.get("removed"))],
        "kept": [item for data in done for item in _texts(data.get("kept"))],
    }


# --- building ------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def build_report(
    log: Path,
    public_key: Ed25519PublicKey,
    job_id: str,
    *,
    node: str | None = None,
    now: datetime | None = None,
) -> JobReport:
    """The report of ``job_id`` from the audit log at ``log``, verified under ``public_key``.

    A log that does not verify gives a report with ``verified`` false and the reason
    (module docstring). Raises :class:`UsageError` naming the job when no entry of the
    log belongs to it, and :class:`IntegrityError` when the log cannot be read at all.
    """
    if not job_id:
        raise UsageError("give the id of a job (as the hub and the audit log name it)")
    verified, error, head, count = True, None, None, 0
    try:
        verdict = verify_log(log, public_key)
        head, count = verdict.head, verdict.entries
    except IntegrityError as exc:
        if not log.exists():
            raise
        verified, error = False, str(exc)
    entries = _read_entries(log)
    if not verified:
        count = len(entries)
    mine = [e for e in entries if _belongs(e, job_id)]
    if not mine:
        raise UsageError(
            f"the audit log {log} has no entry for job {job_id!r}: check the job id "
            "(`rapha node audit verify` checks the log; the hub lists a node's jobs)"
        )
    timeline = tuple(
        {
            "seq": _int(e.get("seq")),
            "time": _text(e.get("time")),
            "event": _text(e.get("event")),
            "described": e.get("event") in KNOWN_EVENTS,
        }
        for e in mine
    )
    sections = {
        "what_ran": _what_ran(mine),
        "records": _records(mine),
        "sandbox": _sandbox(mine),
        "outputs": _outputs(mine),
        "approvals": _approvals(mine),
        "cleanup": _cleanup(mine),
    }
    moment = (now or _now()).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return JobReport(
        job_id=job_id,
        node=node,
        log=log,
        verified=verified,
        verify_error=error,
        entries=count,
        head=head,
        generated=moment,
        sections=sections,
        timeline=timeline,
    )


def job_report(settings: NodeSettings, job_id: str, *, now: datetime | None = None) -> JobReport:
    """:func:`build_report` on the node's own audit log, under its signing key."""
    public_key = crypto.load_private_key(settings.keys.signing_key).public_key()
    return build_report(settings.audit_log, public_key, job_id, node=settings.name, now=now)
