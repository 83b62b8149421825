"""Escrow contract sources (Vyper), the chain client and settlement (issue 5).

``contracts/ClearingVault.vy`` holds budgets in escrow and settles them with the hospital's
signature; :mod:`rapha.ledger.chain` talks to it through web3.py, embedded (py-evm) or over
JSON-RPC, with the same code path.
"""

from rapha.ledger._settlement import (
    SETTLE_TAG,
    job_id_of,
    refund_delay,
    settlement_digest,
    settlement_signer,
    sign_settlement,
)
from rapha.ledger._vault import ClearingVault, JobState, JobStatus, Split
from rapha.ledger.chain import Chain, DevNodeChain, EmbeddedChain, TxResult

__all__ = [
    "SETTLE_TAG",
    "Chain",
    "ClearingVault",
    "DevNodeChain",
    "EmbeddedChain",
    "JobState",
    "JobStatus",
    "Split",
    "TxResult",
    "job_id_of",
    "refund_delay",
    "settlement_digest",
    "settlement_signer",
    "sign_settlement",
]
