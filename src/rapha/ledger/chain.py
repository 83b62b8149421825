"""The chain client: build a transaction, sign it locally, send it raw, wait until final.

One :class:`Chain` runs against two endpoints (DESIGN.md, "Defaults"):

- :meth:`EmbeddedChain.start`: web3's ``EthereumTesterProvider`` (py-evm) in process, with
  accounts funded and ``MockUSDC`` and ``ClearingVault`` deployed. The demo and tests use it.
- :meth:`Chain.json_rpc`: any JSON-RPC endpoint (Polygon in production), with the POA
  extra-data middleware, a chain-id check, gas estimation and local nonce management.

Development chains, and only those, are :class:`DevNodeChain`: :meth:`DevNodeChain.connect`
reaches a local JSON-RPC dev node (anvil, hardhat) and :meth:`DevNodeChain.deploy_rapha`,
the one deployment routine :class:`EmbeddedChain` uses too, stands the same contracts up on
it; the class adds the dev-node methods tests need (time travel, snapshots, mining a block).

Every revert, from either provider, becomes one :class:`~rapha.errors.SettlementError`
carrying the contract's revert reason. Transport failures become
:class:`~rapha.errors.RemoteError`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Self, TypedDict, Unpack, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception
from web3.middleware import ExtraDataToPOAMiddleware
from web3.providers import EthereumTesterProvider, HTTPProvider
from web3.types import RPCEndpoint, TxParams, TxReceipt, Wei

from rapha.errors import DependencyError, RemoteError, SettlementError, UsageError
from rapha.ledger._compile import compiled

__all__ = ["Chain", "DevNodeChain", "EmbeddedChain", "TxResult"]

_REVERT_PREFIX = "execution reverted: "
# Estimates are exact for the state they ran on; a block later the state may cost more.
_GAS_HEADROOM_PERCENT = 20


@dataclass(frozen=True, slots=True)
class TxResult:
    """A mined, successful transaction, reported once ``confirmations`` blocks deep."""

    tx_hash: bytes
    block_number: int
    gas_used: int
    confirmations: int
    receipt: TxReceipt


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or (str(exc.args[0]) if exc.args else str(exc))
    message = str(message)
    if message.startswith(_REVERT_PREFIX):
        return message[len(_REVERT_PREFIX) :]
    if message == "execution reverted":
        return "reverted without a reason"
    return message


class Chain:
    """A web3 connection that signs locally and reports transactions once final.

    ``confirmations`` is the depth a transaction's block must reach (1 = its own block)
    before :meth:`transact` returns.
    """

    _revert_errors: tuple[type[Exception], ...] = (ContractLogicError,)
    #: The JSON-RPC endpoint, for a chain reached over one (``None`` in process).
    url: str | None = None

    def __init__(
        self,
        w3: Web3,
        *,
        chain_id: int,
        confirmations: int = 1,
        receipt_timeout: float = 120.0,
        poll_interval: float = 1.0,
    ) -> None:
        if confirmations < 1:
            raise UsageError("confirmations must be at least 1")
        self.w3 = w3
        self.chain_id = chain_id
        self.confirmations = confirmations
        self._receipt_timeout = receipt_timeout
        self._poll_interval = poll_interval
        self._nonces: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def json_rpc(
        cls,
        url: str,
        *,
        chain_id: int,
        confirmations: int = 5,
        timeout: float = 30.0,
        poll_interval: float = 2.0,
    ) -> Self:
        """Connect to a JSON-RPC endpoint and refuse it unless it serves ``chain_id``."""
        w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": timeout}))
        # Polygon PoS (and other POA chains) put more than 32 bytes in extraData.
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        try:
            served = int(w3.eth.chain_id)
        except (OSError, Web3Exception) as exc:
            raise RemoteError("the chain endpoint cannot be reached; check the RPC URL") from exc
        if served != chain_id:
            raise RemoteError(f"the endpoint serves chain id {served}, expected {chain_id}")
        chain = cls(
            w3,
            chain_id=chain_id,
            confirmations=confirmations,
            receipt_timeout=timeout * 10,
            poll_interval=poll_interval,
        )
        chain.url = url
        return chain

    def contract(self, name: str, address: str) -> Contract:
        """A handle on a deployed contract of this package (``"ClearingVault"``, ``"MockUSDC"``)."""
        return self.w3.eth.contract(
            address=Web3.to_checksum_address(address), abi=compiled(name).abi
        )

    def deploy(self, name: str, sender: LocalAccount, *args: Any) -> Contract:
        """Compile, deploy and return a contract of this package."""
        art = compiled(name)
        factory = self.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
        result = self.transact(factory.constructor(*args), sender)
        address = result.receipt["contractAddress"]
        if address is None:
            raise SettlementError(f"deploying {name} created no contract")
        return self.contract(name, address)

    def call(self, fn: ContractFunction) -> Any:
        """Read-only call; a revert becomes :class:`SettlementError`."""
        try:
            return fn.call()
        except self._revert_errors as exc:
            raise SettlementError(_reason(exc)) from exc
        except (OSError, Web3Exception) as exc:
            raise RemoteError("the chain endpoint failed a read; retry later") from exc

    def balance(self, address: str) -> int:
        """Native-coin balance of ``address`` (wei)."""
        return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))

    def transact(self, fn: Any, sender: LocalAccount) -> TxResult:
        """Estimate, sign locally, send raw, and wait ``confirmations`` blocks.

        ``fn`` is a bound contract function or constructor. A revert in estimation or on
        chain raises :class:`SettlementError` with the revert reason.
        """
        with self._lock:
            nonce = self._next_nonce(sender.address)
            try:
                tx = cast(
                    TxParams,
                    fn.build_transaction(
                        {"from": sender.address, "chainId": self.chain_id, "nonce": nonce}
                    ),
                )
            except self._revert_errors as exc:
                raise SettlementError(_reason(exc)) from exc
            except (OSError, Web3Exception) as exc:
                raise RemoteError("the chain endpoint failed to estimate gas") from exc
            tx["gas"] = int(tx["gas"]) * (100 + _GAS_HEADROOM_PERCENT) // 100
            signed = sender.sign_transaction(cast(dict[str, Any], tx))
            try:
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except self._revert_errors as exc:
                self._nonces.pop(sender.address, None)
                raise SettlementError(_reason(exc)) from exc
            except (OSError, Web3Exception) as exc:
                self._nonces.pop(sender.address, None)
                raise RemoteError("the chain endpoint refused the transaction") from exc
            self._nonces[sender.address] = nonce + 1
        receipt = self._wait_receipt(tx_hash)
        if receipt["status"] != 1:
            raise SettlementError(self._replay_reason(tx, receipt))
        self._await_depth(receipt)
        return TxResult(
            tx_hash=bytes(tx_hash),
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            confirmations=self.confirmations,
            receipt=receipt,
        )

    def _next_nonce(self, address: ChecksumAddress) -> int:
        if address not in self._nonces:
            try:
                self._nonces[address] = int(self.w3.eth.get_transaction_count(address, "pending"))
            except (OSError, Web3Exception) as exc:
                raise RemoteError("the chain endpoint failed to report a nonce") from exc
        return self._nonces[address]

    def _wait_receipt(self, tx_hash: HexBytes) -> TxReceipt:
        try:
            return self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self._receipt_timeout, poll_latency=self._poll_interval
            )
        except TimeExhausted as exc:
            raise RemoteError("the transaction was not mined in time; check the gas price") from exc
        except (OSError, Web3Exception) as exc:
            raise RemoteError("the chain endpoint failed while waiting for a receipt") from exc

    def _replay_reason(self, tx: TxParams, receipt: TxReceipt) -> str:
        """Re-run a reverted transaction as a call on its parent block to read the reason."""
        replay = {k: v for k, v in dict(tx).items() if k in ("from", "to", "data", "value")}
        try:
            self.w3.eth.call(cast(TxParams, replay), int(receipt["blockNumber"]) - 1)
        except self._revert_errors as exc:
            return _reason(exc)
        except (OSError, Web3Exception):
            pass
        return "reverted on chain without a reason"

    def _advance(self) -> None:
        time.sleep(self._poll_interval)

    def _await_depth(self, receipt: TxReceipt) -> None:
        target = int(receipt["blockNumber"]) + self.confirmations - 1
        deadline = time.monotonic() + self._receipt_timeout
        try:
            while int(self.w3.eth.block_number) < target:
                if time.monotonic() > deadline:
                    raise RemoteError("the chain stopped producing blocks; retry later")
                self._advance()
            block = self.w3.eth.get_block(int(receipt["blockNumber"]))
        except (OSError, Web3Exception) as exc:
            raise RemoteError("the chain endpoint failed while waiting for confirmations") from exc
        if block.get("hash") != receipt["blockHash"]:
            raise RemoteError("the transaction's block was reorganised away; send it again")


def _demo_key(index: int) -> LocalAccount:
    account: LocalAccount = Account.from_key(keccak(text=f"rapha embedded chain account {index}"))
    return account


def _quantity(value: Any) -> int:
    """A JSON-RPC quantity: anvil answers hex strings, eth-tester plain integers."""
    return int(value, 16) if isinstance(value, str) else int(value)


class _DeploySettings(TypedDict, total=False):
    """Keyword arguments of :meth:`DevNodeChain.deploy_rapha`, which holds the defaults."""

    accounts: int
    registry_delay: int
    refund_delay: int
    usdc_each: int
    gas_each: int


class DevNodeChain(Chain):
    """A development chain with the Rapha contracts deployed; for dev nodes only.

    Dev nodes (anvil, hardhat, the in-process :class:`EmbeddedChain`) hold unlocked,
    prefunded accounts and answer the non-standard ``evm_*`` methods this class uses to
    fund accounts, move time, take snapshots and mine blocks. No production endpoint does:
    never point one at Polygon.

    Roles: ``owner`` deploys and owns the vault, ``operator`` settles (the hub),
    ``treasury`` receives the protocol's share; ``accounts`` are further funded accounts
    (payers, hospitals) holding MockUSDC. The keys are fixed and public: test keys only.
    """

    owner: LocalAccount = _demo_key(0)
    operator: LocalAccount = _demo_key(1)
    treasury: LocalAccount = _demo_key(2)
    accounts: tuple[LocalAccount, ...] = ()
    token: Contract
    vault: Contract

    @staticmethod
    def demo_accounts(count: int) -> tuple[LocalAccount, ...]:
        """The fixed, public test accounts :meth:`deploy_rapha` funds, in order: another
        process that knows a dev chain was deployed by Rapha can act as them."""
        return tuple(_demo_key(3 + i) for i in range(count))

    @classmethod
    def connect(
        cls, url: str, *, chain_id: int = 31337, confirmations: int = 1, timeout: float = 30.0
    ) -> Self:
        """Connect to a local dev node's JSON-RPC ``url``; :meth:`deploy_rapha` stands up
        the contracts on it.

        ``chain_id`` defaults to anvil's and hardhat's 31337. A dev node mines each
        transaction as it arrives, so receipts are polled every 10 ms.
        """
        return cls.json_rpc(
            url, chain_id=chain_id, confirmations=confirmations, timeout=timeout, poll_interval=0.01
        )

    def deploy_rapha(
        self,
        *,
        accounts: int = 6,
        registry_delay: int = 60,
        refund_delay: int = 3600,
        usdc_each: int = 1_000_000 * 10**6,
        gas_each: int = 10**20,
    ) -> None:
        """Fund ``accounts`` + 3 role accounts, deploy the contracts, mint to ``accounts``.

        Each account gets ``gas_each`` wei of native coin from the node's first unlocked
        account and each of ``accounts`` ``usdc_each`` MockUSDC base units. The demo's
        ``refund_delay`` of one hour is
        ``refund_delay(lease_seconds=900, retries=2, margin_seconds=900)``: three 15-minute
        hub leases and 15 minutes to mine the settlement.
        """
        self.accounts = self.demo_accounts(accounts)
        for account in (self.owner, self.operator, self.treasury, *self.accounts):
            self._fund(account.address, gas_each)
        self.token = self.deploy("MockUSDC", self.owner)
        self.vault = self.deploy(
            "ClearingVault",
            self.owner,
            self.token.address,
            self.treasury.address,
            self.operator.address,
            registry_delay,
            refund_delay,
        )
        for account in self.accounts:
            self.transact(self.token.functions.mint(account.address, usdc_each), self.owner)

    def now(self) -> int:
        """The latest block's timestamp."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def time_travel(self, seconds: int) -> None:
        """Mine a block ``seconds`` after the latest one (dev nodes only)."""
        self._dev_rpc("evm_setNextBlockTimestamp", self.now() + seconds)
        self._dev_rpc("evm_mine")

    def snapshot(self) -> int:
        """Remember the chain's state; :meth:`revert` returns to it once (dev nodes only)."""
        return _quantity(self._dev_rpc("evm_snapshot"))

    def revert(self, snapshot: int) -> None:
        """Return to a :meth:`snapshot`, forgetting cached nonces (dev nodes only).

        Reverting consumes the snapshot on anvil and hardhat: take a new one to come back
        again.
        """
        with self._lock:
            self._restore(snapshot)
            self._nonces.clear()

    def _restore(self, snapshot: int) -> None:
        if self._dev_rpc("evm_revert", hex(snapshot)) is not True:
            raise UsageError(f"the dev node has no snapshot {snapshot}; take a new one")

    def _advance(self) -> None:
        self._dev_rpc("evm_mine")

    def _fund(self, address: ChecksumAddress, wei: int) -> None:
        """Send ``wei`` to ``address`` from the node's first unlocked account."""
        try:
            unlocked = self.w3.eth.accounts
            if not unlocked:
                raise UsageError(
                    "the node has no unlocked account to fund test accounts from; "
                    "use a dev node such as anvil"
                )
            tx_hash = self.w3.eth.send_transaction(
                {"from": unlocked[0], "to": address, "value": Wei(wei)}
            )
        except (OSError, Web3Exception) as exc:
            raise RemoteError("the dev node refused to fund a test account") from exc
        if self._wait_receipt(tx_hash)["status"] != 1:
            raise SettlementError(f"funding {address} failed on chain")

    def _dev_rpc(self, method: str, *params: Any) -> Any:
        """Call a dev-node-only JSON-RPC method and return its result."""
        try:
            response = self.w3.provider.make_request(RPCEndpoint(method), list(params))
        except (OSError, Web3Exception) as exc:
            raise RemoteError(f"the dev node failed {method}; is it still running?") from exc
        error = response.get("error")
        if error is not None:
            message = error.get("message", error) if isinstance(error, dict) else error
            raise RemoteError(f"the node refused {method} ({message}); it must be a dev node")
        return response.get("result")


class EmbeddedChain(DevNodeChain):
    """An in-process EVM (eth-tester + py-evm) with the Rapha contracts deployed.

    The dev node the demo and tests run on; see :class:`DevNodeChain` for the roles.
    """

    def __init__(self, provider: EthereumTesterProvider, *, confirmations: int) -> None:
        w3 = Web3(provider)
        super().__init__(
            w3, chain_id=int(w3.eth.chain_id), confirmations=confirmations, poll_interval=0.0
        )
        tester = provider.ethereum_tester
        if tester is None:  # pragma: no cover - web3 always creates one
            raise DependencyError("eth-tester is not installed; install rapha[ledger]")
        self._tester: Any = tester
        # eth-tester raises its own TransactionFailed for reverts in estimation and calls.
        self._revert_errors = (ContractLogicError, TransactionFailed)

    @classmethod
    def start(cls, *, confirmations: int = 1, **deploy: Unpack[_DeploySettings]) -> EmbeddedChain:
        """Start the chain and :meth:`~DevNodeChain.deploy_rapha` on it with ``deploy``."""
        chain = cls(EthereumTesterProvider(), confirmations=confirmations)
        chain.deploy_rapha(**deploy)
        return chain

    def time_travel(self, seconds: int) -> None:
        """Mine a block ``seconds`` after the latest one."""
        # eth-tester's time_travel(t) mines a block at t - 1 and leaves t to the next one.
        self._tester.time_travel(self.now() + seconds + 1)

    def snapshot(self) -> int:
        """Remember the chain's state; :meth:`revert` returns to it (tests)."""
        return int(self._tester.take_snapshot())

    def _restore(self, snapshot: int) -> None:
        self._tester.revert_to_snapshot(snapshot)
