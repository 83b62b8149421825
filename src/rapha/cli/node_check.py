"""``rapha node check``: every readiness check of a node, in one table.

Exit 0 when no check failed (skipped ones are fine), 1 when any did; 2 only when the
command itself is misused. ``--json`` prints ``{"ok": …, "checks": [{"name", "status",
"detail", "fix"}, …]}`` instead of the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rapha.cli._app import err_console
from rapha.errors import ExitCode
from rapha.node.check import CheckResult, CheckStatus, run_checks

__all__ = ["check"]

console = Console()

_STYLE = {CheckStatus.OK: "green", CheckStatus.FAIL: "bold red", CheckStatus.SKIPPED: "dim"}


def check(
    config: Annotated[
        Path, typer.Option("--config", help="The node's node.toml (written by rapha node init).")
    ] = Path("node.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Check that this node is ready: config, keys, PACS and scope, hub, sandbox, TPM,
    audit log. Runs every check, lists what to fix, exits 1 if any check failed."""
    with err_console.status("checking", spinner="dots") as status:
        results = run_checks(config, on_check=lambda name: status.update(f"checking {name}"))
    ok = all(result.ok for result in results)
    if as_json:
        out = {"ok": ok, "config": str(config), "checks": [r.to_json() for r in results]}
        typer.echo(json.dumps(out))
    else:
        _print(results, ok)
    if not ok:
        raise typer.Exit(int(ExitCode.ERROR))


def _print(results: list[CheckResult], ok: bool) -> None:
    table = Table(show_edge=False)
    table.add_column("check")
    table.add_column("")
    table.add_column("detail / what to fix", overflow="fold")
    for result in results:
        text = escape(result.detail)
        if result.fix:
            text += f"\n[yellow]fix:[/] {escape(result.fix)}"
        style = _STYLE[result.status]
        table.add_row(result.name, f"[{style}]{result.status.value}[/]", text)
    console.print(table)
    failed = [r.name for r in results if not r.ok]
    if ok:
        console.print("[bold green]ready:[/] every check passed", highlight=False)
    else:
        console.print(
            f"[bold red]not ready:[/] {len(failed)} check(s) failed ({', '.join(failed)})",
            highlight=False,
        )
