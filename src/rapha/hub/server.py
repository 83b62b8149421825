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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from rapha import crypto
from rapha.attest.verifier import Verifier
from rapha.errors import ConfigError, KeyFileError
from rapha.hub.app import create_app
from rapha.hub.artifacts import FilesystemArtifactStore
from rapha.hub.db import open_database
from rapha.hub.jobs import JobService
from rapha.hub.services import Hub
from rapha.hub.settings import HubSettings
from rapha.hub.stores import DatabaseAllowlist, DatabaseEnrollmentStore
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


def build_server(
    settings: HubSettings, *, chain: tuple[Chain, ClearingVault, Any] | None = None
) -> HubServer:
    """Open the database (migrated), the chain and the artifact store; build the app.

    ``chain`` is an already open ``(chain, vault, operator)``, as :func:`open_chain` gives
    (``rapha demo`` and the tests keep the embedded chain they deposit on); by default the
    settings' chain is opened.
    """
    from rapha.hub.settlement import SettlementService

    db = open_database(settings.database_url)
    verifier = Verifier(
        DatabaseEnrollmentStore(db),
        DatabaseAllowlist(db),
        ek_ca_certificates=[_read(path, "EK CA") for path in settings.ek_ca_certificates],
        ek_intermediates=[_read(path, "EK intermediate") for path in settings.ek_intermediates],
    )
    hub = Hub(db, pepper=settings.api_key_pepper, verifier=verifier)
    jobs = JobService(
        hub.db, lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts
    )
    artifacts = FilesystemArtifactStore(settings.artifacts)
    ledger, vault, operator = chain if chain is not None else open_chain(settings)
    settlement = SettlementService(
        hub.db,
        jobs,
        ledger,
        vault,
        verifier=hub.verifier,
        hub_key=crypto.load_private_key(settings.signing_key),
        operator=operator,
        artifacts=artifacts,
    )
    app = create_app(hub, artifacts=artifacts, settlement=settlement, jobs=jobs)
    worker = HubWorker(jobs, settlement, interval=settings.loop_interval, explain=hub.explain)
    return HubServer(settings, hub, jobs, app, worker, ledger, vault, settlement)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the {what} certificate {path}: {exc.strerror}") from exc
