"""Everything ``rapha hub serve`` runs, built from :class:`HubSettings`: the database, the
chain and vault, the settlement service, the HTTP app and the background loop.

The chain is one of:

* ``embedded``: an in-process EVM with the demo contracts deployed at start. Only this
  process can reach it, so deposits come from the same process (tests, ``rapha demo``).
* a JSON-RPC URL without ``vault``: a local dev node (anvil); the demo contracts are
  deployed on it at start and its fixed, public test accounts are used. Never production.
* a JSON-RPC URL with ``vault``, ``chain_id`` and ``operator_key``: a real deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from rapha import crypto
from rapha.errors import ConfigError
from rapha.hub.app import create_app
from rapha.hub.artifacts import FilesystemArtifactStore
from rapha.hub.db import open_database
from rapha.hub.jobs import JobService
from rapha.hub.services import Hub
from rapha.hub.settings import HubSettings
from rapha.hub.worker import HubWorker

if TYPE_CHECKING:
    from rapha.hub.settlement import SettlementService
    from rapha.ledger import Chain, ClearingVault

__all__ = ["HubServer", "build_server", "open_chain"]


@dataclass
class HubServer:
    """The parts of a running hub (see the module docstring)."""

    settings: HubSettings
    hub: Hub
    jobs: JobService
    app: FastAPI
    worker: HubWorker
    chain: Chain
    vault: ClearingVault
    settlement: SettlementService

    def close(self) -> None:
        self.worker.stop()
        self.hub.db.close()


def open_chain(settings: HubSettings) -> tuple[Chain, ClearingVault, Any]:
    """The chain, the vault and the operator account the settings name."""
    from eth_account import Account

    from rapha.ledger import Chain, ClearingVault, DevNodeChain, EmbeddedChain

    if settings.chain == "embedded":
        embedded = EmbeddedChain.start(confirmations=settings.confirmations)
        return embedded, ClearingVault(embedded, embedded.vault), embedded.operator
    if settings.vault is None:
        dev = DevNodeChain.connect(settings.chain, confirmations=settings.confirmations)
        dev.deploy_rapha()
        return dev, ClearingVault(dev, dev.vault), dev.operator
    if settings.chain_id is None or settings.operator_key is None:
        raise ConfigError("with vault set, chain_id and operator_key must be set too")
    chain = Chain.json_rpc(
        settings.chain, chain_id=settings.chain_id, confirmations=settings.confirmations
    )
    operator = Account.from_key(
        crypto.load_secret_hex(settings.operator_key, length=32, what="operator key")
    )
    return chain, ClearingVault(chain, chain.contract("ClearingVault", settings.vault)), operator


def build_server(settings: HubSettings) -> HubServer:
    """Open the database (migrated), the chain and the artifact store; build the app."""
    from rapha.hub.settlement import SettlementService

    hub = Hub(open_database(settings.database_url), pepper=settings.api_key_pepper)
    jobs = JobService(
        hub.db, lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts
    )
    artifacts = FilesystemArtifactStore(settings.artifacts)
    chain, vault, operator = open_chain(settings)
    settlement = SettlementService(
        hub.db,
        jobs,
        chain,
        vault,
        verifier=hub.verifier,
        hub_key=crypto.load_private_key(settings.signing_key),
        operator=operator,
        artifacts=artifacts,
    )
    app = create_app(hub, artifacts=artifacts, settlement=settlement, jobs=jobs)
    worker = HubWorker(jobs, settlement, interval=settings.loop_interval, explain=hub.explain)
    return HubServer(settings, hub, jobs, app, worker, chain, vault, settlement)
