"""Typed calls on a deployed ``ClearingVault`` through a :class:`~rapha.ledger.chain.Chain`."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from web3.contract import Contract
from web3.types import EventData

from rapha.errors import SettlementError
from rapha.ledger.chain import Chain, TxResult


class JobStatus(enum.IntEnum):
    """A job's state in the vault (``ClearingVault.vy`` constants)."""

    NONE = 0
    OPEN = 1
    SETTLED = 2
    FAILED = 3
    REFUNDED = 4


@dataclass(frozen=True, slots=True)
class JobState:
    """What the vault stores for one job; amounts in token base units."""

    payer: str
    status: JobStatus
    budget: int
    max_price_per_record: int
    deadline: int
    hospital_id: bytes
    receipt_hash: bytes
    records: int
    price_per_record: int
    amount_due: int


@dataclass(frozen=True, slots=True)
class Split:
    """How a settled job's budget was credited."""

    hospital_amount: int
    treasury_amount: int
    payer_refund: int


class ClearingVault:
    """The escrow contract's operations, each signed by the account that must send it."""

    def __init__(self, chain: Chain, contract: Contract) -> None:
        self.chain = chain
        self.contract = contract
        self.address = str(contract.address)

    def deposit(
        self,
        payer: LocalAccount,
        client_job_id: bytes,
        *,
        budget: int,
        max_price_per_record: int,
        token: Contract,
    ) -> tuple[bytes, TxResult, TxResult]:
        """Approve and deposit; returns (job id, approve result, deposit result)."""
        approve = self.chain.transact(token.functions.approve(self.address, budget), payer)
        fns = self.contract.functions
        result = self.chain.transact(
            fns.deposit(client_job_id, budget, max_price_per_record), payer
        )
        job_id = bytes(self.chain.call(fns.job_id_of(payer.address, client_job_id)))
        return job_id, approve, result

    def settle(
        self,
        operator: LocalAccount,
        job_id: bytes,
        *,
        hospital_id: bytes,
        records: int,
        price_per_record: int,
        receipt_hash: bytes,
        node_signature: bytes,
    ) -> TxResult:
        fn = self.contract.functions.settle(
            job_id, hospital_id, records, price_per_record, receipt_hash, node_signature
        )
        return self.chain.transact(fn, operator)

    def mark_failed(self, operator: LocalAccount, job_id: bytes) -> TxResult:
        return self.chain.transact(self.contract.functions.mark_failed(job_id), operator)

    def refund(self, payer: LocalAccount, job_id: bytes) -> TxResult:
        return self.chain.transact(self.contract.functions.refund(job_id), payer)

    def withdraw(self, account: LocalAccount) -> TxResult:
        return self.chain.transact(self.contract.functions.withdraw(), account)

    def propose_hospital(
        self, owner: LocalAccount, hospital_id: bytes, *, payout: str, signer: str
    ) -> TxResult:
        fn = self.contract.functions.propose_hospital(hospital_id, payout, signer)
        return self.chain.transact(fn, owner)

    def set_operator(self, owner: LocalAccount, operator: str) -> TxResult:
        return self.chain.transact(self.contract.functions.set_operator(operator), owner)

    def job(self, job_id: bytes) -> JobState:
        raw = self.chain.call(self.contract.functions.job(job_id))
        return JobState(
            payer=str(raw[0]),
            status=JobStatus(raw[1]),
            budget=int(raw[2]),
            max_price_per_record=int(raw[3]),
            deadline=int(raw[4]),
            hospital_id=bytes(raw[5]),
            receipt_hash=bytes(raw[6]),
            records=int(raw[7]),
            price_per_record=int(raw[8]),
            amount_due=int(raw[9]),
        )

    def split(self, job_id: bytes) -> Split:
        hospital, treasury, payer = self.chain.call(self.contract.functions.split(job_id))
        return Split(int(hospital), int(treasury), int(payer))

    def settled_payout(self, job_id: bytes) -> str | None:
        """The payout address the ``Settled`` event of ``job_id`` credited, if there is one."""
        log = self._settled_log(job_id)
        return None if log is None else str(log["args"]["payout"])

    def settlement_tx(self, job_id: bytes) -> bytes | None:
        """The hash of the transaction that settled ``job_id``, if it was settled."""
        log = self._settled_log(job_id)
        return None if log is None else bytes(log["transactionHash"])

    def _settled_log(self, job_id: bytes) -> EventData | None:
        """The ``Settled`` event of ``job_id``, or ``None``.

        Scans the logs from block 0 with the indexed job id as a topic; a production node
        may limit the range (pass a closer block in a later version if so).
        """
        try:
            logs: Iterable[EventData] = self.contract.events.Settled.get_logs(
                from_block=0, argument_filters={"job_id": job_id}
            )
        except Exception as exc:  # web3 raises provider-specific errors for getLogs
            raise SettlementError(f"cannot read the vault's Settled events: {exc}") from exc
        for log in logs:
            if bytes(log["args"]["job_id"]) == job_id:
                return log
        return None

    def credit(self, address: str) -> int:
        return int(self.chain.call(self.contract.functions.credits(address)))

    def hospital(self, hospital_id: bytes) -> tuple[str, str]:
        """The (payout address, settlement signer) in force now."""
        payout, signer = self.chain.call(self.contract.functions.hospital(hospital_id))
        return str(payout), str(signer)

    def hospital_share_bps(self) -> int:
        """The split constant, read from the contract (its one definition)."""
        value = int(self.chain.call(self.contract.functions.HOSPITAL_SHARE_BPS()))
        if not 0 < value <= 10_000:
            raise SettlementError("the vault reports an impossible hospital share")
        return value
