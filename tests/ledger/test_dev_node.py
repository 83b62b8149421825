"""The dev-node helpers the ledger suite relies on, on both kinds of node (issue 5)."""

from __future__ import annotations

import pytest
from web3.providers import EthereumTesterProvider, HTTPProvider

from rapha.errors import SettlementError
from rapha.ledger import EmbeddedChain

from .conftest import Ledger


def test_each_variant_runs_on_the_node_it_names(
    session_ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    provider = session_ledger.chain.w3.provider

    if request.node.callspec.params["session_ledger"] == "embedded":
        assert isinstance(session_ledger.chain, EmbeddedChain)
        assert isinstance(provider, EthereumTesterProvider)
    else:
        assert not isinstance(session_ledger.chain, EmbeddedChain)
        assert isinstance(provider, HTTPProvider)
        assert str(provider.endpoint_uri).startswith("http://127.0.0.1:")
    assert session_ledger.chain.chain_id == int(session_ledger.chain.w3.eth.chain_id)


def test_time_travel_mines_one_block_exactly_that_late(ledger: Ledger) -> None:
    chain = ledger.chain
    block, now = chain.w3.eth.block_number, chain.now()

    chain.time_travel(1_234)

    assert (chain.w3.eth.block_number, chain.now()) == (block + 1, now + 1_234)


def test_revert_forgets_state_and_cached_nonces(session_ledger: Ledger) -> None:
    chain = session_ledger.chain
    payer = session_ledger.payer
    snapshot = chain.snapshot()
    allowance = chain.token.functions.allowance(payer.address, chain.vault.address)
    chain.transact(chain.token.functions.approve(chain.vault.address, 5), payer)
    assert chain.call(allowance) == 5

    chain.revert(snapshot)

    assert chain.call(allowance) == 0
    retry = chain.snapshot()
    try:
        # A stale cached nonce would be refused as too high (or wait forever).
        chain.transact(chain.token.functions.approve(chain.vault.address, 7), payer)
        assert chain.call(allowance) == 7
    finally:
        chain.revert(retry)


def test_revert_reason_survives_the_transport(ledger: Ledger) -> None:
    with pytest.raises(SettlementError) as caught:
        ledger.vault.withdraw(ledger.payer)

    assert caught.value.reason == "nothing to withdraw"
