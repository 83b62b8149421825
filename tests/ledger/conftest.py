"""A real EVM with MockUSDC and ClearingVault deployed, on two kinds of node.

``session_ledger`` is parametrized: ``embedded`` is the in-process EVM (eth-tester + py-evm),
``anvil`` a separate JSON-RPC dev node on loopback (:mod:`support.anvil`), so every ledger
test runs on both. One chain per kind per session; every test runs from a snapshot and rolls
it back, so tests cannot see each other's jobs or balances.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3.providers import EthereumTesterProvider

from rapha.ledger import ClearingVault, DevNodeChain, EmbeddedChain, sign_settlement
from support.anvil import ANVIL_CHAIN_ID, AnvilNode, anvil_or_skip

REGISTRY_DELAY = 60
REFUND_DELAY = 3600
HOSPITAL_ID = keccak(text="hospital-a")
OTHER_HOSPITAL_ID = keccak(text="hospital-b")


@dataclass(frozen=True)
class Ledger:
    chain: DevNodeChain
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
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilNode]:
    """One anvil for the session; skips (fails under CI=true) when it is not installed."""
    with anvil_or_skip(Path(tmp_path_factory.mktemp("anvil"))) as node:
        yield node


def _start_chain(request: pytest.FixtureRequest) -> DevNodeChain:
    if request.param == "embedded":
        chain: DevNodeChain = EmbeddedChain(EthereumTesterProvider(), confirmations=1)
    else:
        node: AnvilNode = request.getfixturevalue("anvil")
        chain = DevNodeChain.connect(node.url, chain_id=ANVIL_CHAIN_ID)
    chain.deploy_rapha(accounts=4, registry_delay=REGISTRY_DELAY, refund_delay=REFUND_DELAY)
    return chain


@pytest.fixture(scope="session", params=["embedded", "anvil"])
def session_ledger(request: pytest.FixtureRequest) -> Ledger:
    chain = _start_chain(request)
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
