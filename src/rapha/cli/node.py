"""``rapha node …``: what a hospital's IT team and data-protection officer type.

``init`` sets a node up; ``preview`` builds the view a job would get; ``profile`` prints
the aggregate profile the hub would see; ``lookup`` answers a data-subject request;
``measure`` prints the node's measurement (what attestation quotes); ``audit verify``
checks the audit log. Exit codes are those of
:class:`rapha.errors.ExitCode`; ``rapha node audit verify`` exits 4 when the audit log was
tampered with (or does not match the anchor given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rapha import crypto
from rapha.attest.measure import Measurement, measure
from rapha.audit import AuditLog, AuditVerdict, verify_log
from rapha.cli._app import err_console, new_app
from rapha.cli.node_approvals import app as approvals_app
from rapha.cli.node_check import check
from rapha.cli.node_report import report
from rapha.cli.node_run import run
from rapha.crypto import Ed25519PublicKey
from rapha.errors import IntegrityError, UsageError
from rapha.node.bootstrap import init_node
from rapha.node.job import sandbox_from_settings
from rapha.node.optout import load_opt_out
from rapha.node.pipeline import BuildProgress
from rapha.node.preview import PreviewResult, preview_view, profile_node, with_overrides
from rapha.node.register import lookup_patient
from rapha.node.settings import NodeSettings, load_node_settings
from rapha.privacy import Pseudonymizer
from rapha.runtime.sandbox import Sandbox

__all__ = ["app"]

console = Console()

app = new_app("The hospital node: set it up, inspect what a model would see, check the audit log.")
audit_app = new_app("The node's hash-chained, signed audit log.")
app.add_typer(audit_app, name="audit")
app.command("check")(check)
app.command("report")(report)
app.add_typer(approvals_app, name="approvals")
app.command("run")(run)


@app.command("init")
def init(
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory to set the node up in (created if missing).")
    ],
    name: Annotated[
        str, typer.Option("--name", help="Node name the hub will know it by.")
    ] = "rapha-node",
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="PACS to read: a folder (a read-only mount) or a DICOMweb base URL. "
            "Default: a folder placeholder to edit.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Rewrite node.toml and create missing files; keys, the opt-out list and "
            "the audit log are never replaced.",
        ),
    ] = False,
) -> None:
    """Write a commented node.toml, fresh keys (0600), an empty opt-out list and an audit log."""
    report = init_node(directory, name=name, source=source, force=force)

    table = Table(title=f"node {report.settings.name} in {report.directory}", show_edge=False)
    table.add_column("file")
    table.add_column("")
    for rel in report.created:
        table.add_row(rel, "[green]created[/]")
    for rel in report.kept:
        table.add_row(rel, "[yellow]kept as it was[/]")
    console.print(table)
    console.print(f"node public key (hex): {report.public_key_hex}", soft_wrap=True)
    console.print(f"audit log head: {report.audit_head}", soft_wrap=True)
    config = report.config
    console.print(
        "\n[bold]Next:[/]\n"
        f"  1. Edit {config}: point \\[source] at your PACS and review \\[scope] "
        "(modalities, body parts, date window, cap).\n"
        f"  2. Back up {report.directory / 'keys'} somewhere safe: without hmac.key no "
        "pseudonym can be looked up again; never share it.\n"
        f"  3. Add patients who opted out to {report.settings.opt_out}, one PatientID a line.\n"
        f"  4. Check the audit log at any time: rapha node audit verify --config {config}",
        highlight=False,
        soft_wrap=True,
    )


def _public_key_from(
    config: Path | None, log: Path | None, public_key: Path | None
) -> tuple[Path, Ed25519PublicKey]:
    if config is not None:
        if log is not None or public_key is not None:
            raise UsageError("give either --config, or --log with --public-key, not both")
        settings = load_node_settings(config)
        return settings.audit_log, crypto.load_private_key(settings.keys.signing_key).public_key()
    if log is None or public_key is None:
        raise UsageError("give --config node.toml, or both --log FILE and --public-key FILE")
    return log, crypto.load_public_key(public_key)


@audit_app.command("verify")
def audit_verify(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="node.toml: verify its audit log under its signing key."),
    ] = None,
    log: Annotated[
        Path | None, typer.Option("--log", help="An audit log file (with --public-key).")
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", help="The node's public key, PEM (keys/node.key.pub)."),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            "--head", help="An anchored head hash (from a receipt): it must still be in the log."
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option("--count", help="The anchored entry count that goes with --head."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Check every line of the audit log: chain, hashes, signatures (exit 4 on tampering)."""
    path, key = _public_key_from(config, log, public_key)
    try:
        verdict = verify_log(path, key, expected_head=head, expected_count=count)
    except IntegrityError as exc:
        if not as_json:
            raise
        typer.echo(json.dumps({"ok": False, "log": str(path), "error": str(exc)}))
        raise typer.Exit(int(exc.exit_code)) from exc
    _print_verdict(path, verdict, anchored=head is not None or count is not None, as_json=as_json)


def _print_verdict(path: Path, verdict: AuditVerdict, *, anchored: bool, as_json: bool) -> None:
    if as_json:
        out = {"ok": True, "log": str(path), "entries": verdict.entries, "head": verdict.head}
        typer.echo(json.dumps(out))
        return
    console.print(f"[bold green]audit log verifies:[/] {path}", highlight=False)
    console.print(f"  entries: {verdict.entries}", highlight=False)
    console.print(f"  head:    {verdict.head}", highlight=False)
    if anchored:
        console.print("  the anchor given is part of this log", highlight=False)
    else:
        err_console.print(
            "[dim]a removed tail is only detectable against an anchor: pass --head and "
            "--count from a receipt or heartbeat[/]",
            highlight=False,
        )


# --- preview, profile, lookup --------------------------------------------------------------

ConfigOption = Annotated[
    Path, typer.Option("--config", help="The node's node.toml (written by rapha node init).")
]
SourceOption = Annotated[
    str | None,
    typer.Option(
        "--source", help="Read this folder or DICOMweb URL instead of the configured PACS."
    ),
]
LabelsOption = Annotated[
    Path | None, typer.Option("--labels", help="Use this label CSV instead of the configured one.")
]
HmacKeyOption = Annotated[
    Path | None,
    typer.Option("--hmac-key", help="Use this 32-byte pseudonym key file (0600) instead."),
]


def _show(title: str, table: Table) -> None:
    """Print ``table`` under a bold heading of its own (a table title would wrap to the
    width of a narrow table)."""
    console.print(f"[bold]{title}[/]", highlight=False)
    console.print(table)


def _settings(
    config: Path, source: str | None, labels: Path | None, hmac_key: Path | None
) -> NodeSettings:
    return with_overrides(
        load_node_settings(config), source=source, labels=labels, hmac_key=hmac_key
    )


def _progress_bar(counted: str) -> Progress:
    """A Rich bar on stderr (stdout stays for results and --json): done/total ``counted``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(counted),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


class _BuildBar:
    """Rich progress for a view build, on stderr (stdout stays for results and --json)."""

    def __init__(self) -> None:
        self.progress = _progress_bar(
            "studies · {task.fields[instances]} images · {task.fields[records]} kept"
        )
        self.task = self.progress.add_task("reading the PACS", total=None, instances=0, records=0)

    def __call__(self, state: BuildProgress) -> None:
        self.progress.update(
            self.task,
            description="building the view",
            total=state.studies_total,
            completed=state.studies_done,
            instances=state.instances,
            records=state.records,
        )


@app.command("preview")
def preview(
    config: ConfigOption,
    out: Annotated[
        Path, typer.Option("--out", help="Directory to write the view to (must be new or empty).")
    ],
    source: SourceOption = None,
    labels: LabelsOption = None,
    hmac_key: HmacKeyOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing view in --out.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Build exactly the view a job would get, to inspect what a model would see."""
    settings = _settings(config, source, labels, hmac_key)
    bar = _BuildBar()
    with bar.progress:
        result = preview_view(settings, out=out, overwrite=force, progress=bar)
    if as_json:
        typer.echo(json.dumps(_preview_json(result), sort_keys=True))
        return
    _print_preview(result)


def _preview_json(result: PreviewResult) -> dict[str, object]:
    summary = result.summary
    return {
        "view": str(summary.out),
        "private_dir": str(result.private_dir),
        "digest": summary.digest,
        "records": summary.records,
        "counts": dict(summary.counts),
        "exclusions": dict(summary.exclusions),
        "prevalence": result.prevalence,
        "seconds": round(result.seconds, 1),
    }


def _print_preview(result: PreviewResult) -> None:
    summary = result.summary
    splits = Table(show_edge=False)
    splits.add_column("split")
    splits.add_column("images", justify="right")
    for split, count in summary.counts.items():
        splits.add_row(split, str(count))
    splits.add_row("[bold]total[/]", f"[bold]{summary.records}[/]")
    _show("records per split", splits)

    excluded = Table(show_edge=False)
    excluded.add_column("reason")
    excluded.add_column("objects", justify="right")
    for reason, count in summary.exclusions.items():
        excluded.add_row(reason, str(count))
    if not summary.exclusions:
        excluded.add_row("(none)", "0")
    _show("excluded, by reason", excluded)

    if result.prevalence:
        labels = Table(show_edge=False)
        labels.add_column("finding")
        for name in ("positive", "negative", "uncertain", "missing"):
            labels.add_column(name, justify="right")
        for finding, tally in result.prevalence.items():
            labels.add_row(finding, *(str(v) for v in tally.values()))
        _show("labels (all splits)", labels)

    console.print(f"view:        {summary.out}", highlight=False, soft_wrap=True)
    console.print(f"digest:      {summary.digest}", highlight=False, soft_wrap=True)
    console.print(
        f"test labels: {result.private_dir} (node only; never given to model code)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"built in {result.seconds:.1f} s", highlight=False)


@app.command("profile")
def profile_command(
    config: ConfigOption,
    k: Annotated[
        int, typer.Option("--k", min=2, help="Suppress every count below k (and its complements).")
    ] = 10,
    source: SourceOption = None,
    labels: LabelsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
) -> None:
    """Print the aggregate profile the hub would see: rounded counts, small cells hidden."""
    settings = _settings(config, source, labels, None)
    bar = _BuildBar()
    with bar.progress:
        result = profile_node(settings, k=k, progress=bar)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
        return
    shown = "withheld" if result["total"] is None else str(result["total"])
    console.print(
        f"[bold]profile[/] (images; k = {result['k']}; {result['rounding']}); total: {shown}",
        highlight=False,
        soft_wrap=True,
    )
    for name, dimension in result["dimensions"].items():
        table = Table(show_edge=False)
        table.add_column("value")
        table.add_column("images", justify="right")
        if dimension["status"] == "withheld":
            table.add_row("(withheld: too few records to publish safely)", "")
        for value, count in dimension["cells"].items():
            table.add_row(value, "<k (suppressed)" if count is None else str(count))
        _show(name, table)
    positives = result["labels"]["positives"]
    if positives:
        table = Table(show_edge=False)
        table.add_column("finding")
        table.add_column("images", justify="right")
        for finding, count in positives.items():
            table.add_row(finding, "<k (suppressed)" if count is None else str(count))
        _show("label positives", table)


@app.command("lookup")
def lookup(
    config: ConfigOption,
    patient_id: Annotated[
        str,
        typer.Option("--patient-id", help="The patient's PatientID (0010,0020), as in the PACS."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Which views and jobs used this patient (a data-subject request). Only this node can
    answer: the register holds keyed pseudonyms, and only this node holds the key."""
    settings = load_node_settings(config)
    keys = settings.keys.load()
    answer = lookup_patient(
        settings.state_dir,
        Pseudonymizer(keys.hmac_key),
        load_opt_out(settings.opt_out),
        patient_id,
    )
    AuditLog(settings.audit_log, keys.signing_key).append(
        "node.lookup", {"views_found": len(answer.uses), "opted_out": answer.opted_out}
    )
    if as_json:
        out = {"opted_out": answer.opted_out, "uses": [use.to_json() for use in answer.uses]}
        typer.echo(json.dumps(out, sort_keys=True))
        return
    if answer.opted_out:
        console.print("This patient is on the opt-out list: no new view will include them.")
    if not answer.uses:
        console.print(
            "[bold]none:[/] no view or job built by this node used this patient.",
            highlight=False,
        )
        return
    table = Table(show_edge=False)
    for column in ("built (UTC)", "job", "view digest", "view"):
        table.add_column(column, overflow="fold")
    for use in answer.uses:
        table.add_row(use.time, use.job_id, use.view_digest, use.view)
    _show(f"views and jobs that used this patient ({len(answer.uses)})", table)


# --- measurement -----------------------------------------------------------------------------


@app.command("measure")
def measure_command(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="node.toml: measure the sandbox its [sandbox] table configures. "
            "Default: the default sandbox.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the measurement and its breakdown as JSON.")
    ] = False,
) -> None:
    """Print this node's measurement: its code, the runtime that runs jobs and the sandbox
    profile. Policies and scope are not measured: their digests go into every receipt."""
    sandbox = sandbox_from_settings(load_node_settings(config).sandbox) if config else Sandbox()
    bar = _progress_bar("files")
    task = bar.add_task("measuring", total=None)
    with bar:
        result = measure(
            sandbox, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    if as_json:
        typer.echo(json.dumps(result.to_json(), sort_keys=True))
        return
    _print_measurement(result)


def _print_measurement(result: Measurement) -> None:
    # Plain aligned lines, not a Table: a 64-digit digest must never wrap or be cropped.
    console.print(f"[bold]measurement:[/] {result.digest}", highlight=False, soft_wrap=True)
    console.print(f"[bold]{'component':<16} {'files':>6}  digest[/]", highlight=False)
    for event in result.events():
        name = event["component"]
        files = result.file_counts[name]
        console.print(f"{name:<16} {files:>6}  {event['digest']}", highlight=False, soft_wrap=True)
    console.print(f"{'total':<16} {result.files:>6}", highlight=False)
    for name, binary in result.binaries.items():
        console.print(
            f"{name}: {binary['path']} (sha256 {binary['sha256']})",
            highlight=False,
            soft_wrap=True,
        )
    notes = [
        (result.missing, "listed by a distribution but missing"),
        (result.record_mismatches, "differ from their RECORD hash"),
    ]
    for paths, what in notes:
        if paths:
            err_console.print(
                f"[yellow]{len(paths)} files {what}[/] (measured as they are; `--json` lists them)",
                highlight=False,
            )
