"""``rapha job verify RESULT_DIR``: anyone checks a job's result and its receipt.

Prints one line per check (format, hash, the node, settlement and hub signatures, every
file, the chain) and exits 0 only when none failed; 4 (integrity) when one did. The chain
is checked only with ``--rpc``; without it that line says "not checked".
``rapha job report`` runs the same checks through :func:`check_result` and the same options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from rapha import crypto
from rapha.errors import DataError, ExitCode, UsageError
from rapha.receipt import RECEIPT_FILE, Check, failed, load_receipt, verify_result

if TYPE_CHECKING:
    from rapha.ledger import Chain

__all__ = [
    "HubKeyOption",
    "NodeKeyOption",
    "ResultDirArgument",
    "RpcOption",
    "check_result",
    "verify",
]

console = Console()

ResultDirArgument = Annotated[
    Path, typer.Argument(help="The job's result directory (holding receipt.json).")
]
RpcOption = Annotated[
    str | None,
    typer.Option("--rpc", help="JSON-RPC URL of the chain the receipt names, to check it."),
]
NodeKeyOption = Annotated[
    Path | None, typer.Option("--node-key", help="The node's pinned Ed25519 public key (PEM).")
]
HubKeyOption = Annotated[
    Path | None, typer.Option("--hub-key", help="The hub's pinned Ed25519 public key (PEM).")
]


def check_result(
    result_dir: Path, *, rpc: str | None, node_key: Path | None, hub_key: Path | None
) -> tuple[list[Check], Chain | None]:
    """The checks ``rapha job verify`` prints, and the chain they read (``None`` without
    ``rpc``), from the options as given: key files (PEM) and the RPC URL.

    Raises:
        UsageError: ``result_dir`` is not a directory.
        DataError: it holds no receipt.json, or one naming no chain id while ``rpc`` is given.
        KeyFileError: a key file cannot be read.
        RemoteError: the RPC endpoint is unreachable or serves another chain.
    """
    if not result_dir.is_dir():
        raise UsageError(f"{result_dir} is not a directory; pass the job's result directory")
    if not (result_dir / RECEIPT_FILE).is_file():
        raise DataError(f"{result_dir} has no {RECEIPT_FILE}; it is not a job result")
    node = crypto.load_public_key(node_key) if node_key is not None else None
    hub = crypto.load_public_key(hub_key) if hub_key is not None else None
    chain = None
    if rpc is not None:
        from rapha.ledger import Chain

        chain = Chain.json_rpc(rpc, chain_id=_chain_id(result_dir), confirmations=1)
    return verify_result(result_dir, node_key=node, hub_key=hub, chain=chain), chain


def verify(
    result_dir: ResultDirArgument,
    rpc: RpcOption = None,
    node_key: NodeKeyOption = None,
    hub_key: HubKeyOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the checks as JSON on stdout.")
    ] = False,
) -> None:
    """Check the receipt's signatures, every file against it, and the chain's record."""
    checks, _ = check_result(result_dir, rpc=rpc, node_key=node_key, hub_key=hub_key)
    bad = failed(checks)
    if as_json:
        rows = [{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks]
        typer.echo(json.dumps({"ok": not bad, "checks": rows}, indent=2))
    else:
        _print_table(result_dir, checks)
    if bad:
        raise typer.Exit(int(ExitCode.INTEGRITY))


def _chain_id(result_dir: Path) -> int:
    """The chain id the receipt names (the endpoint must serve it)."""
    receipt = load_receipt(result_dir / RECEIPT_FILE)
    try:
        chain_id = receipt["body"]["settlement"]["chain_id"]
    except (KeyError, TypeError) as exc:
        raise DataError("the receipt names no chain id; it cannot be checked on chain") from exc
    if not isinstance(chain_id, int) or isinstance(chain_id, bool) or chain_id <= 0:
        raise DataError("the receipt's chain id is not a positive integer")
    return chain_id


def _print_table(result_dir: Path, checks: list[Check]) -> None:
    table = Table(title=f"verify {result_dir}", show_lines=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    marks = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "[yellow]skipped[/]"}
    for check in checks:
        table.add_row(check.name, marks[check.ok], check.detail)
    console.print(table)
    bad = failed(checks)
    if bad:
        console.print(f"[bold red]FAILED[/]: {len(bad)} of {len(checks)} checks")
    else:
        console.print(f"[green]verified[/]: {len(checks)} checks passed or skipped")
