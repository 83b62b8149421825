"""``rapha job report RESULT_DIR --out report.html``: a fetched result as one HTML page.

The page (:mod:`rapha.client.report`) shows the ROC, calibration and training curves, the
metrics with their CIs, the subgroups, the receipt, the settlement and the checks
``rapha job verify`` runs, with the same ``--node-key``, ``--hub-key`` and ``--rpc``.
With ``--rpc`` the settlement transaction, its block and the vault's hospital share are
read from the chain; ``--tx`` names the transaction without one (given both, they must
agree). The page is never written inside RESULT_DIR: an extra file there fails
verification.

Exit codes: 0 when the page was written, even if a check failed (the page and the last
line printed say so); 2 for an ``--out`` inside RESULT_DIR or a malformed ``--tx``; 6 for
a directory without a readable ``metrics.json`` or ``receipt.json``; 9 when the chain
cannot be read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer
from rich.console import Console

from rapha.cli.verify import HubKeyOption, NodeKeyOption, ResultDirArgument, RpcOption, check_result
from rapha.client.report import write_report
from rapha.errors import RemoteError, UsageError
from rapha.receipt import RECEIPT_FILE, failed, load_receipt

if TYPE_CHECKING:
    from rapha.ledger import Chain

__all__ = ["report"]

console = Console()

_TX: Final = re.compile(r"0x[0-9a-fA-F]{64}")
_ADDRESS: Final = re.compile(r"0x[0-9a-fA-F]{40}")


def report(
    result_dir: ResultDirArgument,
    out: Annotated[
        Path, typer.Option("--out", help="The HTML file to write (outside RESULT_DIR).")
    ],
    tx: Annotated[
        str | None,
        typer.Option("--tx", help="The settlement transaction's hash (0x…), to show on the page."),
    ] = None,
    rpc: RpcOption = None,
    node_key: NodeKeyOption = None,
    hub_key: HubKeyOption = None,
) -> None:
    """Write the result as one self-contained HTML page: curves, metrics, subgroups,
    receipt, settlement and the verification checks."""
    if tx is not None and not _TX.fullmatch(tx):
        raise UsageError("--tx must be 0x and 64 hex digits: the settlement transaction's hash")
    checks, chain = check_result(result_dir, rpc=rpc, node_key=node_key, hub_key=hub_key)
    settlement = _settlement(result_dir, tx, chain)
    path = write_report(result_dir, out, settlement=settlement, checks=checks)
    bad = failed(checks)
    verdict = (
        f"[bold red]{len(bad)} of {len(checks)} checks failed[/]: see its Verification section"
        if bad
        else f"[green]{len(checks)} checks passed or skipped[/]"
    )
    console.print(f"wrote {path} ({verdict}); open it in a browser", soft_wrap=True)


def _settlement(result_dir: Path, tx: str | None, chain: Chain | None) -> dict[str, Any] | None:
    """What the page shows of the settlement: ``--tx`` as given, or the vault's record."""
    if chain is None:
        return None if tx is None else {"tx_hash": tx.lower()}
    vault_job = _vault_job(result_dir)
    if vault_job is None:  # a malformed receipt: its format check already failed
        return None if tx is None else {"tx_hash": tx.lower()}
    from rapha.ledger import ClearingVault

    address, job_id = vault_job
    vault = ClearingVault(chain, chain.contract("ClearingVault", address))
    settlement: dict[str, Any] = {
        "chain_id": chain.chain_id,
        "hospital_share_bps": vault.hospital_share_bps(),
    }
    held = vault.settlement_tx(job_id)
    if held is None:
        if tx is not None:
            raise UsageError("the vault records no settlement of this job; drop --tx")
        return settlement
    held_hex = "0x" + held.hex()
    if tx is not None and tx.lower() != held_hex:
        raise UsageError(f"the vault records settlement transaction {held_hex}, not --tx {tx}")
    return {**settlement, "tx_hash": held_hex, "block": _block(chain, held)}


def _vault_job(result_dir: Path) -> tuple[str, bytes] | None:
    """The vault address and vault job id the receipt names, if it names them well."""
    receipt = load_receipt(result_dir / RECEIPT_FILE)
    try:
        address = str(receipt["body"]["settlement"]["vault"])
        job_id = str(receipt["body"]["job"]["chain_job_id"])
    except (KeyError, TypeError):
        return None
    if not _ADDRESS.fullmatch(address) or not _TX.fullmatch(job_id):
        return None
    return address, bytes.fromhex(job_id[2:])


def _block(chain: Chain, tx_hash: bytes) -> int:
    from hexbytes import HexBytes
    from web3.exceptions import Web3Exception

    try:
        return int(chain.w3.eth.get_transaction_receipt(HexBytes(tx_hash))["blockNumber"])
    except (OSError, Web3Exception) as exc:
        raise RemoteError("the chain endpoint did not return the settlement transaction") from exc
