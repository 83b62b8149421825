"""A whole marketplace for integration tests: a real hub, a real chain, real node agents.

:class:`HubUnderTest` runs the hub's app under uvicorn on a fixed loopback port, with an
embedded EVM, the settlement service and the background loop; :meth:`HubUnderTest.restart`
stops and starts it on the same port and database (a hub restart). :func:`write_node`
lays out a hospital node over a folder or a DICOMweb source with a ``[hub]`` table, and
:class:`AgentProcess` runs ``rapha node run`` for it as a separate process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from rapha.client import RaphaClient
from rapha.demo.market import HospitalSite, LocalHub, agent_command, configure_node
from rapha.demo.processes import free_port
from rapha.hub.db import Role
from rapha.hub.jobs import JobService
from rapha.hub.services import SYSTEM, Hub
from rapha.ledger import ClearingVault, EmbeddedChain
from support.hub import PEPPER

__all__ = ["REGISTRY_DELAY", "AgentProcess", "Hospital", "HubUnderTest", "wait_for", "write_node"]

REGISTRY_DELAY = 60
_OCR_OFF = "synthetic archive generated for an integration test; no real text is burned in"


def wait_for(what: str, check: Callable[[], Any], *, timeout: float, every: float = 0.25) -> Any:
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class HubUnderTest(LocalHub):
    """The hub (:class:`rapha.demo.market.LocalHub`: uvicorn thread, settlement, loop) on
    its own embedded chain with six funded accounts, restartable in place."""

    def __init__(self, root: Path, *, lease_seconds: float, max_attempts: int = 3) -> None:
        chain = EmbeddedChain.start(accounts=6, registry_delay=REGISTRY_DELAY)
        super().__init__(root, chain=chain, vault=ClearingVault(chain, chain.vault),
                         port=free_port(), lease_seconds=lease_seconds,
                         max_attempts=max_attempts, loop_interval=0.3, pepper=PEPPER)  # fmt: skip

    @property
    def hub(self) -> Hub:
        return self.parts.hub

    @property
    def jobs(self) -> JobService:
        return self.parts.jobs

    # --- parties ----------------------------------------------------------------------------

    def company(self, name: str, wallet: LocalAccount, environment: str = "demo") -> RaphaClient:
        if not any(o == name for o in self._orgs()):
            self.hub.create_org(SYSTEM, name, Role.COMPANY, wallet=wallet.address)
        token = self.hub.create_key(SYSTEM, name, environment).token  # type: ignore[arg-type]
        return RaphaClient(self.url, token, timeout=60)

    def _orgs(self) -> list[str]:
        from sqlalchemy import select

        from rapha.hub.db import Org

        with self.hub.db.session() as session:
            return list(session.execute(select(Org.name)).scalars())

    def register_hospital(self, name: str, payout: LocalAccount, signer: LocalAccount) -> bytes:
        """The hospital's org at the hub and its payout and signer in the vault (timelocked)."""
        self.hub.create_org(SYSTEM, name, Role.HOSPITAL, wallet=payout.address)
        hospital_id = keccak(text=name)
        self.vault.propose_hospital(self.chain.owner, hospital_id, payout=payout.address,
                                    signer=signer.address)  # fmt: skip
        return hospital_id

    def balance(self, address: str) -> int:
        return int(self.chain.call(self.chain.token.functions.balanceOf(address)))


class Hospital:
    """One hospital: its org, vault registration, node directory and agent."""

    def __init__(self, hub: HubUnderTest, name: str, payout: LocalAccount) -> None:
        self.name = name
        self.node_id = f"{name}-1"
        self.payout = payout
        self.signer: LocalAccount = Account.from_key(keccak(text=f"{name} settlement key"))
        self.hospital_id = hub.register_hospital(name, payout, self.signer)


def write_node(
    root: Path,
    *,
    hospital: Hospital,
    hub_url: str,
    source: str,
    labels: Path,
    modality: str,
    price: int,
    uid: int,
    trusted: dict[str, Path],
    approvals: bool = False,
) -> Path:
    """A node for ``hospital`` over ``source`` (folder or DICOMweb URL); its node.toml."""
    site = HospitalSite(hospital.node_id, hospital.hospital_id, hospital.payout.address,
                        bytes(hospital.signer.key), price)  # fmt: skip
    return configure_node(root, site=site, hub_url=hub_url, source=source, labels=labels,
                          modality=modality, uid=uid, trusted=trusted, approvals=approvals,
                          ocr_disabled=_OCR_OFF)  # fmt: skip


class AgentProcess:
    """``rapha node run --config CONFIG`` as its own process, its output in a log file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # our own CLI, a config we wrote
                agent_command(self.config),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "200"},
                start_new_session=True,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the agent and its sandboxes: a node that dies mid-job."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self) -> None:
        """Ask the agent to stop (SIGTERM); :meth:`stop` waits for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
