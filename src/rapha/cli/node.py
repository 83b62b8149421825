"""``rapha node …``: what a hospital's IT team and data-protection officer type.

Exit codes are those of :class:`rapha.errors.ExitCode`; ``rapha node audit verify`` exits 4
when the audit log was tampered with (or does not match the anchor given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rapha import crypto
from rapha.audit import AuditVerdict, verify_log
from rapha.cli._app import err_console, new_app
from rapha.crypto import Ed25519PublicKey
from rapha.errors import IntegrityError, UsageError
from rapha.node.bootstrap import init_node
from rapha.node.settings import load_node_settings

__all__ = ["app"]

console = Console()

app = new_app("The hospital node: set it up, inspect what a model would see, check the audit log.")
audit_app = new_app("The node's hash-chained, signed audit log.")
app.add_typer(audit_app, name="audit")


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
