"""``rapha node report JOB_ID``: a job's record of processing, for the DPO.

Built by :mod:`rapha.node.report` from the node's signed audit log only. ``--format md``
(the default) gives Markdown with plain-language headings, to attach to a DPIA or a
record of processing; ``--format json`` gives the same content as JSON. ``--out FILE``
writes it to a file instead of standard output.

Exit codes: 0 when the log verified; 4 when it did not (the report is still written,
stating the failure at the top, so it can be investigated); 2 for a job id the log does
not know.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from rapha.cli._app import err_console
from rapha.errors import ExitCode
from rapha.node.report import JobReport, job_report
from rapha.node.settings import load_node_settings

__all__ = ["ReportFormat", "render_markdown", "report"]


class ReportFormat(StrEnum):
    """What ``rapha node report`` writes."""

    MD = "md"
    JSON = "json"


def report(
    job_id: Annotated[
        str, typer.Argument(help="The job's id, as the hub and the audit log name it.")
    ],
    config: Annotated[
        Path, typer.Option("--config", help="The node's node.toml (written by rapha node init).")
    ] = Path("node.toml"),
    fmt: Annotated[
        ReportFormat, typer.Option("--format", help="md (Markdown, for people) or json.")
    ] = ReportFormat.MD,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the report to this file (default: stdout).")
    ] = None,
) -> None:
    """A job's record of processing from the signed audit log: what ran, on how many
    records, what left the node. Counts and digests only; exits 4 if the log does not verify."""
    result = job_report(load_node_settings(config), job_id)
    text = (
        json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n"
        if fmt is ReportFormat.JSON
        else render_markdown(result)
    )
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        err_console.print(f"report written to {out}", highlight=False, soft_wrap=True)
    if not result.verified:
        err_console.print(
            "[bold red]the audit log does not verify:[/] the report says so at the top; "
            "investigate with `rapha node audit verify`",
            highlight=False,
        )
        raise typer.Exit(int(ExitCode.INTEGRITY))


# --- Markdown ------------------------------------------------------------------------------

_NOT_RECORDED: Final = "not recorded"
#: What may stand in a code span as it is: digests, hashes, event names, plain paths.
_PLAIN_CODE: Final = re.compile(r"[0-9A-Za-z:._/-]+")
_MD_SPECIAL: Final = str.maketrans({c: f"\\{c}" for c in "\\`*_[]<>|#"} | {"\n": " ", "\r": " "})
_SPLIT_ORDER: Final = {"train": 0, "val": 1, "test": 2}
_KINDS: Final = {
    "train": "train (trains the company's model on the train and val splits)",
    "evaluate": "evaluate (scores the company's model on held-out data)",
}
_SOURCES: Final = {
    "zoo": "zoo (an architecture shipped with Rapha; no company code)",
    "custom": "custom (model code supplied by the company, run only in the sandbox)",
}


def _md(value: Any) -> str:
    """A value as Markdown text: escaped, on one line; ``None`` is "not recorded"."""
    if value is None:
        return _NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).translate(_MD_SPECIAL)


def _code(value: Any) -> str:
    """A digest, hash or path in a code span (only when it is plain enough for one)."""
    if isinstance(value, str) and _PLAIN_CODE.fullmatch(value):
        return f"`{value}`"
    return _md(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _facts(rows: Sequence[tuple[str, str]]) -> list[str]:
    return _table(("", ""), rows)


def _md_integrity(report: JobReport) -> list[str]:
    times = [t["time"] for t in report.timeline if t["time"]]
    span = f" (first {_md(times[0])}, last {_md(times[-1])})" if times else ""
    if report.verified:
        lines = [
            "**Yes.** The audit log verified: every entry is hash-chained to the one before "
            "it and signed with this node's key, so no entry was edited, removed, inserted "
            "or reordered. (A removed tail is caught only against an anchor: compare the "
            "head below with the one in the job's receipt.)",
            "",
        ]
    else:
        lines = [
            f"**No. The audit log did NOT verify:** {_md(report.verify_error)}",
            "",
            "The entries below are read from the file as it is now and cannot be relied "
            "on. Keep a copy of the log and investigate (`rapha node audit verify`).",
            "",
        ]
    return lines + _facts(
        [
            ("Audit log", _code(str(report.log))),
            ("Entries in the log", _md(report.entries)),
            ("Log head (hash of the last entry)", _code(report.head)),
            ("Entries about this job", f"{len(report.timeline)}{span}"),
        ]
    )


def _md_what_ran(ran: Mapping[str, Any]) -> list[str]:
    dp = ran["dp"]
    if dp["enabled"] is None:
        dp_text = _NOT_RECORDED
    elif dp["enabled"]:
        eps = dp["epsilon"]
        dp_text = "on" + (f", epsilon = {_md(eps)}" if eps is not None else "")
    else:
        dp_text = "off"
    rows = [
        ("Company (organisation)", _md(ran["org"])),
        ("Job kind", _md(_KINDS.get(ran["kind"], ran["kind"]))),
        ("Model", _md(_SOURCES.get(ran["model_source"], ran["model_source"]))),
        ("Bundle digest (what the company signed)", _code(ran["bundle_digest"])),
        ("Signed by (key fingerprint)", _code(ran["signer_fingerprint"])),
        ("Signing key pinned by this hospital", _md(ran["signer_pinned"])),
        ("Differential privacy", dp_text),
        (
            "Admission policy",
            "admitted" if ran["admitted"] else "no admission recorded (stopped before it)",
        ),
        ("Records billed", _md(ran["records_billed"])),
        ("Price per record this node asks (token base units)", _md(ran["price_per_record"])),
    ]
    if ran["evaluations_left"] is not None:
        rows.append(("Evaluations of this test split left", _md(ran["evaluations_left"])))
    return _facts(rows)


def _md_records(records: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    scope = records["scope"]
    if scope is not None:
        allow = [
            name
            for name, key in (
                ("studies", "study_allow_list"),
                ("accessions", "accession_allow_list"),
            )
            if scope[key]
        ]
        lines += [
            f"The node asked its PACS ({_md(scope['source'])}) only for: modalities "
            f"{_md(', '.join(scope['modalities']) or None)}; body parts "
            f"{_md(', '.join(scope['body_parts']) or None)}; study dates "
            f"{_md(scope['date_from'])} to {_md(scope['date_to'])}; at most "
            f"{_md(scope['max_studies'])} studies; allow-list: "
            f"{_md(' and '.join(allow) or 'none')}.",
            "",
        ]
    view = records["view"]
    failed = records["view_failed"]
    if failed is not None:
        lines += [f"The view build failed ({_md(failed['error'])}); no view was made.", ""]
    if view is None:
        return [*lines, "No view build is recorded for this job.", ""]
    rows = [
        ("Studies", _md(view["studies"])),
        ("Patients", _md(view["patients"])),
        ("Images (records) in the view", _md(view["records"])),
    ]
    splits = sorted(view["counts"].items(), key=lambda item: (_SPLIT_ORDER.get(item[0], 3), item))
    rows += [(f"… in the {_md(split)} split", _md(n)) for split, n in splits]
    rows += [
        ("View digest", _code(view["digest"])),
        ("Burned-in text OCR switched off for", _md(", ".join(view["ocr_disabled"]) or "none")),
    ]
    lines += _facts(rows)
    lines += ["Excluded before any model code saw anything:", ""]
    exclusions = [(_md(reason), _md(n)) for reason, n in view["exclusions"].items()]
    return lines + _table(("reason", "images"), exclusions or [("(none)", "0")])


def _md_sandbox(runs: list[Mapping[str, Any]]) -> list[str]:
    if not runs:
        return ["No sandboxed run is recorded for this job.", ""]
    header = ("step", "exit code", "wall time (s)", "hit the time limit", "processes left")
    rows = [
        (
            _md(run["mode"]),
            _md(run["returncode"]),
            _md(run["wall_seconds"]),
            _md(run["timed_out"]),
            _md(run["leftover_processes"]),
        )
        for run in runs
    ]
    return _table(header, rows)


def _md_files(files: list[Mapping[str, Any]]) -> list[str]:
    rows = [(_md(f["name"]), _md(f["size"]), _code(f["sha256"])) for f in files]
    return _table(("file", "bytes", "sha256"), rows)


def _md_outputs(out: Mapping[str, Any]) -> list[str]:
    lines = ["### Output guard", ""]
    if not out["guard"]:
        lines += ["No output guard decision is recorded: nothing was released.", ""]
    for decision in out["guard"]:
        allowed = decision["allowed"]
        verdict = "allowed" if allowed else "denied: nothing left the node"
        lines += [f"**{_md(decision['time'])}: {verdict}.**", ""]
        lines += [f"- {_md(reason)}" for reason in decision["reasons"]]
        if decision["reasons"]:
            lines.append("")
        if decision["files"]:
            lines += _md_files(decision["files"])
    if out["metrics_sha256"] is not None:
        lines += [f"Metrics computed by the node: sha256 {_code(out['metrics_sha256'])}.", ""]
    if out["outbox_files"] is not None:
        lines += [f"Outbox written: {_md(out['outbox_files'])} files.", ""]
    lines += ["### Delivery", ""]
    delivered, failed = out["delivered"], out["failed"]
    if delivered is not None:
        lines += [
            f"Delivered to the hub {_md(delivered['hub'])}; receipt hash "
            f"{_code(delivered['receipt_hash'])}.",
            "",
        ]
        if delivered["files"]:
            lines += _md_files(delivered["files"])
    if failed is not None:
        lines += [f"The job failed on this node (code {_code(failed['code'])}).", ""]
    if out["lease_lost"]:
        lines += [
            "The hub handed the job to another node (this node's lease ran out); this node "
            "stopped it and delivered nothing.",
            "",
        ]
    if delivered is None and failed is None and not out["lease_lost"]:
        lines += ["No delivery and no failure is recorded.", ""]
    return lines


def _md_approvals(approvals: list[Mapping[str, Any]]) -> list[str]:
    if not approvals:
        return ["No approval is recorded (none was required, or the job stopped before).", ""]
    rows = [(_md(a["time"]), _md(a["status"]), _md(a["by"])) for a in approvals]
    return _table(("time (UTC)", "decision", "by"), rows)


def _md_cleanup(cleanup: Mapping[str, list[str]]) -> list[str]:
    removed, kept = cleanup["removed"], cleanup["kept"]
    if not removed and not kept:
        return ["No clean-up is recorded.", ""]
    lines = [f"Removed after the job: {_md(', '.join(removed) or 'nothing')}."]
    if kept:
        lines.append(f"Kept on purpose ([hub] keep_views): {_md(', '.join(kept))}.")
    return [*lines, ""]


def _md_timeline(timeline: tuple[Mapping[str, Any], ...]) -> list[str]:
    rows = [
        (
            _md(t["seq"]),
            _md(t["time"]),
            _code(t["event"]) + ("" if t["described"] else " (not described above)"),
        )
        for t in timeline
    ]
    return _table(("entry", "time (UTC)", "event"), rows)


def render_markdown(report: JobReport) -> str:
    """The report as Markdown, with plain-language headings."""
    s = report.sections
    lines = [
        f"# Record of processing: job {_code(report.job_id)}",
        "",
        f"Node {_md(report.node)}; generated {report.generated} from the node's signed audit "
        "log. This report holds counts, digests and decisions only: it names no patient "
        "and no study.",
        "",
        "## 1. Can this record be trusted?",
        "",
        *_md_integrity(report),
        "## 2. What ran",
        "",
        *_md_what_ran(s["what_ran"]),
        "## 3. Which records were used (counts only)",
        "",
        *_md_records(s["records"]),
        "## 4. Runs in the sandbox (no network, no other data)",
        "",
        *_md_sandbox(s["sandbox"]),
        "## 5. What left the node",
        "",
        *_md_outputs(s["outputs"]),
        "## 6. Approvals",
        "",
        *_md_approvals(s["approvals"]),
        "## 7. Clean-up",
        "",
        *_md_cleanup(s["cleanup"]),
        "## 8. Timeline of the job's audit entries",
        "",
        *_md_timeline(report.timeline),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"
