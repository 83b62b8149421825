"""A real EVM in process (eth-tester + py-evm) with MockUSDC and ClearingVault deployed.

One chain per session; every test runs from a snapshot and rolls it back, so tests cannot
see each other's jobs or balances.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from rapha.ledger import ClearingVault, EmbeddedChain, sign_settlement

REGISTRY_DELAY = 60
REFUND_DELAY = 3600
HOSPITAL_ID = keccak(text="hospital-a")
OTHER_HOSPITAL_ID = keccak(text="hospital-b")


@dataclass(frozen=True)
class Ledger:
    chain: EmbeddedChain
    vault: ClearingVault
    payer: LocalAccount
    other_payer: LocalAccount
    payout: LocalAccount
    other_payout: LocalAccount
    signer: LocalAccount
    other_signer: LocalAccount

    def token_balance(self, address: str) -> int:
        return int(self.chain.call(self.chain.token.functions.balanceOf(address)))

    def deposit(
        self, client_job_id: bytes, budget: int, max_price: int, payer: LocalAccount | None = None
    ) -> bytes:
        job_id, _, _ = self.vault.deposit(
            payer or self.payer,
            client_job_id,
            budget=budget,
            max_price_per_record=max_price,
            token=self.chain.token,
        )
        return job_id

    def signature(
        self,
        job_id: bytes,
        receipt_hash: bytes,
        records: int,
        price: int,
        signer: LocalAccount | None = None,
    ) -> bytes:
        return sign_settlement(
            (signer or self.signer).key,
            chain_id=self.chain.chain_id,
            vault=self.vault.address,
            job_id=job_id,
            receipt_hash=receipt_hash,
            records=records,
            price_per_record=price,
        )

    def settle(
        self,
        job_id: bytes,
        records: int,
        price: int,
        *,
        receipt_hash: bytes = b"\x42" * 32,
        hospital_id: bytes = HOSPITAL_ID,
        signer: LocalAccount | None = None,
        sender: LocalAccount | None = None,
    ) -> int:
        result = self.vault.settle(
            sender or self.chain.operator,
            job_id,
            hospital_id=hospital_id,
            records=records,
            price_per_record=price,
            receipt_hash=receipt_hash,
            node_signature=self.signature(job_id, receipt_hash, records, price, signer),
        )
        return result.gas_used


@pytest.fixture(scope="session")
def session_ledger() -> Ledger:
    chain = EmbeddedChain.start(
        accounts=4, registry_delay=REGISTRY_DELAY, refund_delay=REFUND_DELAY
    )
    vault = ClearingVault(chain, chain.vault)
    signer = Account.from_key(keccak(text="hospital-a settlement key"))
    other_signer = Account.from_key(keccak(text="hospital-b settlement key"))
    payer, other_payer, payout, other_payout = chain.accounts
    vault.propose_hospital(chain.owner, HOSPITAL_ID, payout=payout.address, signer=signer.address)
    vault.propose_hospital(
        chain.owner, OTHER_HOSPITAL_ID, payout=other_payout.address, signer=other_signer.address
    )
    chain.time_travel(REGISTRY_DELAY + 1)
    return Ledger(chain, vault, payer, other_payer, payout, other_payout, signer, other_signer)


@pytest.fixture
def ledger(session_ledger: Ledger) -> Iterator[Ledger]:
    snapshot = session_ledger.chain.snapshot()
    yield session_ledger
    session_ledger.chain.revert(snapshot)
