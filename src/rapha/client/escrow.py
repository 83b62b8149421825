"""A company's whole submission, and its refund: the SDK side of ``rapha job submit`` and
``rapha job refund``.

:func:`submit_job` packs and checks the bundle, uploads it, submits the job to the hub,
then approves and deposits the escrow from the company's wallet on the hub's chain (the
vault and token the hub names at ``GET /v1/chain``, on a chain whose id must match). The
hub funds the job when it sees the deposit from the company's registered wallet. If the
deposit fails, the job stays ``submitted`` with the hub's explanation and can be cancelled.

:func:`refund` takes a failed or cancelled job's whole deposit back, once the hub marked
it failed in the vault (or its deadline passed), and withdraws the wallet's credit.
"""

from __future__ import annotations

import os
import secrets
import tarfile
import tempfile
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from rapha.client import RaphaClient
from rapha.errors import RemoteError, SettlementError, UsageError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from rapha.ledger import Chain, ClearingVault

__all__ = [
    "USDC_DECIMALS",
    "base_units",
    "pack_bundle",
    "refund",
    "rpc_chain",
    "submit_job",
    "wallet_from_file",
]

#: The settlement token's decimals (USDC and the demo's MockUSDC).
USDC_DECIMALS: Final = 6


def base_units(amount: str | Decimal, *, what: str = "amount") -> int:
    """``"2.5"`` USDC as base units (2500000); refuses negatives and sub-unit fractions."""
    try:
        value = Decimal(str(amount))
    except InvalidOperation as exc:
        raise UsageError(f"{what} {amount!r} is not a number of USDC") from exc
    units = value.scaleb(USDC_DECIMALS)
    if not value.is_finite() or value < 0 or units != units.to_integral_value():
        raise UsageError(f"{what} must be a non-negative USDC amount with at most 6 decimals")
    return int(units)


def pack_bundle(bundle: Path, into: Path) -> Path:
    """A bundle directory as a ``.tar`` (sorted, plain files, no owners); a ``.tar`` as is."""
    if bundle.is_file():
        return bundle
    if not bundle.is_dir():
        raise UsageError(f"{bundle} is neither a bundle directory nor a .tar")
    tar_path = into / "bundle.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(bundle)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    return tar_path


def _vault(client: RaphaClient, chain: Chain) -> tuple[ClearingVault, Any]:
    from rapha.ledger import ClearingVault

    terms = client.chain_terms()
    if int(terms["chain_id"]) != chain.chain_id:
        raise UsageError(
            f"the hub settles on chain {terms['chain_id']} but your RPC is chain "
            f"{chain.chain_id}: point --rpc at the hub's chain"
        )
    vault = ClearingVault(chain, chain.contract("ClearingVault", terms["vault"]))
    return vault, chain.contract("MockUSDC", terms["token"])


def submit_job(
    client: RaphaClient,
    bundle: Path,
    *,
    requirements: Mapping[str, Any],
    budget: int,
    max_price_per_record: int,
    wallet: LocalAccount,
    chain: Chain,
    environment: str | None = None,
) -> dict[str, Any]:
    """Upload ``bundle``, submit the job and deposit ``budget`` (base units) from
    ``wallet``; returns the job as the hub shows it after the deposit. ``environment``
    (``demo`` or ``production``) must be the API key's."""
    from rapha.runtime.bundle import verify_bundle

    with tempfile.TemporaryDirectory(prefix="rapha-submit-") as tmp:
        tar = pack_bundle(bundle, Path(tmp))
        verified = verify_bundle(tar, trusted_keys=None, workdir=Path(tmp) / "check")
        stored = client.upload(tar)
    vault, token = _vault(client, chain)
    client_job_id = secrets.token_bytes(32)
    job = client.submit(
        kind=verified.manifest.bundle.kind.value,
        bundle_sha256=stored["sha256"],
        bundle_digest=verified.digest,
        requirements={"max_price_per_record": max_price_per_record, **requirements},
        budget=budget,
        max_price_per_record=max_price_per_record,
        client_job_id="0x" + client_job_id.hex(),
        environment=environment,
    )
    vault.deposit(wallet, client_job_id, budget=budget,
                  max_price_per_record=max_price_per_record, token=token)  # fmt: skip
    return client.job(job["id"])


def refund(client: RaphaClient, job_id: str, *, wallet: LocalAccount, chain: Chain) -> int:
    """Refund a failed or cancelled job's deposit to ``wallet`` and withdraw it (with any
    other credit the vault holds for the wallet); returns the job's deposit."""
    from rapha.ledger import JobStatus, job_id_of

    job = client.job(job_id)
    if job["state"] not in ("failed", "cancelled"):
        raise UsageError(f"job {job_id} is {job['state']}: only a failed or cancelled job refunds")
    vault, _ = _vault(client, chain)
    chain_job_id = job_id_of(wallet.address, bytes.fromhex(job["client_job_id"][2:]))
    held = vault.job(chain_job_id)
    if held.status is JobStatus.REFUNDED:
        raise UsageError(f"job {job_id} was refunded already")
    if held.status is JobStatus.NONE:
        raise UsageError(f"the vault holds no deposit from {wallet.address} for job {job_id}")
    try:
        vault.refund(wallet, chain_job_id)
        vault.withdraw(wallet)  # the vault credits refunds; the token moves on withdraw
    except SettlementError as exc:
        raise UsageError(
            f"the vault refused the refund ({exc.reason}): the hub marks a failed job failed "
            "within a few seconds; otherwise wait for the deposit's deadline"
        ) from exc
    return held.budget


def wallet_from_file(path: Path) -> LocalAccount:
    """The company's wallet from a 0600 file holding its secp256k1 key as hex."""
    from eth_account import Account

    from rapha import crypto

    key = crypto.load_secret_hex(path, length=32, what="wallet key")
    account: LocalAccount = Account.from_key(key)
    return account


def rpc_chain(url: str | None) -> Chain:
    """The company's view of the hub's chain, over JSON-RPC (``--rpc`` / RAPHA_RPC_URL)."""
    from rapha.ledger import Chain

    url = url or os.environ.get("RAPHA_RPC_URL")
    if not url:
        raise UsageError("no chain: pass --rpc URL (the hub's chain) or set RAPHA_RPC_URL")
    from web3 import HTTPProvider, Web3

    try:
        served = int(Web3(HTTPProvider(url, request_kwargs={"timeout": 30})).eth.chain_id)
    except Exception as exc:  # web3 raises many kinds for an unreachable endpoint
        raise RemoteError(f"the chain endpoint {url} cannot be reached: check --rpc") from exc
    # The hub's terms name the chain id; _vault refuses a mismatch before any transaction.
    return Chain.json_rpc(url, chain_id=served, confirmations=1, poll_interval=0.1)
