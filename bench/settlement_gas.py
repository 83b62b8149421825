"""Gas of the escrow's operations, against the spike contract, with a Polygon cost estimate.

Both contracts run on the same embedded EVM (py-evm, the fork eth-tester defaults to) in
the same run. The baseline, ``bench/contracts/SpikeVault.vy``, is the first escrow spike:
the operator pushes three token transfers, with no signature check, refund path, pull
payments or stored receipt (about 126k gas per settle, warm, when it was measured).

"Warm" means the state a busy hub sees: the recipients already hold a balance (the spike)
or an unwithdrawn credit (ClearingVault), so no storage slot goes from zero to non-zero for
them. "Cold" is ClearingVault with every credit withdrawn just before.

Cost on Polygon PoS = gas x gas price x POL price, at the stated assumptions (set
``RAPHA_BENCH_GAS_GWEI`` and ``RAPHA_BENCH_POL_USDC`` to re-price); these are not live
quotes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import vyper
from eth_account import Account
from eth_utils.crypto import keccak

from _summary import summary_line  # bench/ is the script's directory
from rapha.ledger import ClearingVault, EmbeddedChain, sign_settlement

GAS_GWEI = float(os.environ.get("RAPHA_BENCH_GAS_GWEI", "30"))
POL_USDC = float(os.environ.get("RAPHA_BENCH_POL_USDC", "0.20"))
HOSPITAL = keccak(text="bench hospital")
BUDGET, PRICE, RECORDS = 50_000_000, 10_000, 3_000  # 50 USDC; 0.01 USDC x 3000 = 30 USDC


def _spike(chain: EmbeddedChain) -> Any:
    source = (Path(__file__).parent / "contracts" / "SpikeVault.vy").read_text()
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    factory = chain.w3.eth.contract(abi=out["abi"], bytecode=out["bytecode"])
    created = chain.transact(
        factory.constructor(chain.token.address, chain.treasury.address, chain.operator.address),
        chain.owner,
    )
    return chain.w3.eth.contract(address=created.receipt["contractAddress"], abi=out["abi"])


def _measure() -> dict[str, dict[str, int]]:
    chain = EmbeddedChain.start(accounts=2)
    payer, payout = chain.accounts
    signer = keccak(text="bench hospital settlement key")
    vault = ClearingVault(chain, chain.vault)
    vault.propose_hospital(
        chain.owner, HOSPITAL, payout=payout.address, signer=Account.from_key(signer).address
    )
    chain.time_travel(61)

    def deposit(tag: str) -> tuple[bytes, int]:
        job_id, _, result = vault.deposit(
            payer, keccak(text=tag), budget=BUDGET, max_price_per_record=PRICE, token=chain.token
        )
        return job_id, result.gas_used

    def settle(job_id: bytes) -> int:
        receipt_hash = keccak(job_id)
        sig = sign_settlement(
            signer,
            chain_id=chain.chain_id,
            vault=vault.address,
            job_id=job_id,
            receipt_hash=receipt_hash,
            records=RECORDS,
            price_per_record=PRICE,
        )
        return vault.settle(
            chain.operator,
            job_id,
            hospital_id=HOSPITAL,
            records=RECORDS,
            price_per_record=PRICE,
            receipt_hash=receipt_hash,
            node_signature=sig,
        ).gas_used

    ours: dict[str, int] = {}
    first, _ = deposit("cold")
    ours["settle (cold: credits withdrawn)"] = settle(first)
    warm, ours["deposit"] = deposit("warm")
    ours["settle (warm)"] = settle(warm)
    ours["withdraw"] = vault.withdraw(payout).gas_used
    failed, _ = deposit("failed")
    ours["mark_failed"] = vault.mark_failed(chain.operator, failed).gas_used
    ours["refund"] = vault.refund(payer, failed).gas_used

    spike = _spike(chain)
    spike_gas: dict[str, int] = {}
    for tag in ("warm-up", "measured"):
        job_id = keccak(text=f"spike {tag}")
        chain.transact(chain.token.functions.approve(spike.address, BUDGET), payer)
        spike_gas["deposit"] = chain.transact(
            spike.functions.deposit(job_id, BUDGET), payer
        ).gas_used
        spike_gas["settle (warm)"] = chain.transact(
            spike.functions.settle(job_id, payout.address, RECORDS * PRICE), chain.operator
        ).gas_used
    return {"ClearingVault": ours, "spike": spike_gas}


def _usdc(gas: int) -> float:
    return gas * GAS_GWEI * 1e-9 * POL_USDC


def main() -> None:
    gas = _measure()
    ours, spike = gas["ClearingVault"], gas["spike"]
    print("## Settlement gas\n")
    print(
        "Gas of each `ClearingVault` operation on the embedded EVM, against the spike "
        "contract (`bench/contracts/SpikeVault.vy`: push payments, no signature check, no "
        "refund, no stored receipt) in the same run. Cost on Polygon PoS at an assumed "
        f"**{GAS_GWEI:g} gwei** and **1 POL = {POL_USDC:g} USDC** (assumptions, not quotes; "
        "`RAPHA_BENCH_GAS_GWEI`, `RAPHA_BENCH_POL_USDC` re-price). A job of "
        f"{RECORDS} records at {PRICE / 1e6:g} USDC, budget {BUDGET / 1e6:g} USDC.\n"
    )
    print("| operation | ClearingVault gas | cost on Polygon (USDC) | spike gas |")
    print("|---|---:|---:|---:|")
    for name, used in ours.items():
        base = spike.get(name)
        print(f"| {name} | {used:,} | {_usdc(used):.5f} | {f'{base:,}' if base else 'n/a'} |")
    settle, base = ours["settle (warm)"], spike["settle (warm)"]
    verdict = "met" if settle <= 160_000 else "NOT met"
    print(
        f"\nSettle, warm: {settle:,} gas vs the spike's {base:,} ({settle / base:.2f}x), "
        f"for the hospital's signature check, the stored receipt and figures, the refund "
        f"path and pull payments. Target <= 160,000: {verdict}. (Issue 5 recorded about "
        f"126k for the original spike; this reconstruction from its description is cheaper, "
        f"so the original did more than described.) A job's whole life "
        f"(approve is the token's, not counted) costs deposit + settle + withdraw = "
        f"{ours['deposit'] + settle + ours['withdraw']:,} gas, about "
        f"{_usdc(ours['deposit'] + settle + ours['withdraw']):.4f} USDC on Polygon."
    )
    print()
    print(
        summary_line(
            "gas of one settle (warm)",
            rapha=f"`ClearingVault.settle`: {settle:,} gas ({_usdc(settle):.5f} USDC on Polygon)",
            peer=f"spike contract `SpikeVault.vy`: {base:,} gas",
            ratio=f"{settle / base:.2f}x the gas (lower is better)",
        )
    )


if __name__ == "__main__":
    main()
