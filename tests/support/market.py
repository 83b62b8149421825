"""A whole marketplace for integration tests: a real hub, a real chain, real node agents.

:class:`HubUnderTest` runs the hub's app under uvicorn on a fixed loopback port, with an
embedded EVM, the settlement service and the background loop; :meth:`HubUnderTest.restart`
stops and starts it on the same port and database (a hub restart). :func:`write_node`
lays out a hospital node over a folder or a DICOMweb source with a ``[hub]`` table, and
:class:`AgentProcess` runs ``rapha node run`` for it as a separate process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from rapha import crypto
from rapha.client import RaphaClient
from rapha.hub.app import create_app
from rapha.hub.artifacts import FilesystemArtifactStore
from rapha.hub.db import Role, open_database
from rapha.hub.jobs import JobService
from rapha.hub.services import SYSTEM, Hub
from rapha.hub.settlement import SettlementService
from rapha.hub.worker import HubWorker
from rapha.ledger import ClearingVault, EmbeddedChain
from rapha.node import init_node
from support.hub import PEPPER
from support.orthanc import free_port

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


class HubUnderTest:
    """The hub (uvicorn thread), its chain, settlement and loop, restartable in place."""

    def __init__(self, root: Path, *, lease_seconds: float, max_attempts: int = 3) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_url = f"sqlite:///{root / 'hub.db'}"
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.chain = EmbeddedChain.start(accounts=6, registry_delay=REGISTRY_DELAY)
        self.vault = ClearingVault(self.chain, self.chain.vault)
        self.hub_key = crypto.generate_private_key()
        self.artifacts = FilesystemArtifactStore(root / "artifacts")
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        self.hub = Hub(open_database(self.db_url), pepper=PEPPER)
        self.jobs = JobService(self.hub.db, lease_seconds=self.lease_seconds,
                               max_attempts=self.max_attempts)  # fmt: skip
        self.settlement = SettlementService(
            self.hub.db, self.jobs, self.chain, self.vault, verifier=self.hub.verifier,
            hub_key=self.hub_key, operator=self.chain.operator, artifacts=self.artifacts,
        )  # fmt: skip
        self.worker = HubWorker(self.jobs, self.settlement, interval=0.3,
                                explain=self.hub.explain)  # fmt: skip
        app = create_app(self.hub, artifacts=self.artifacts, settlement=self.settlement,
                         jobs=self.jobs)  # fmt: skip
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for("uvicorn to start", lambda: self._server is not None and self._server.started,
                 timeout=20, every=0.02)  # fmt: skip
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        self.hub.db.close()

    def restart(self, *, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

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
    init_node(root, name=hospital.node_id, source=source)
    key_file = root / "keys" / "settlement.key"
    key_file.write_text(bytes(hospital.signer.key).hex())
    key_file.chmod(0o600)
    config = root / "node.toml"
    text = config.read_text(encoding="utf-8")
    text = text.replace('# labels = "labels.csv"', f'labels = "{labels}"')
    text = re.sub(r"(?m)^date_from = \S+", "date_from = 2000-01-01", text)
    text = re.sub(r"(?m)^modalities = .*$", f'modalities = ["{modality}"]', text)
    text = re.sub(r"(?m)^uid = \d+", f"uid = {uid}", text)
    text = text.replace("[ocr.disabled]", f'[ocr.disabled]\n{modality} = "{_OCR_OFF}"', 1)
    pinned = ", ".join(f'"{org}" = ["{path}"]' for org, path in trusted.items())
    text = text.replace("[policy]\n", f"[policy]\ntrusted_keys = {{ {pinned} }}\n", 1)
    text += f"""
[hub]
url = "{hub_url}"
node_id = "{hospital.node_id}"
environment = "demo"
attestation = "dev"
hospital_id = "0x{hospital.hospital_id.hex()}"
settlement_key = "keys/settlement.key"
payout = "{hospital.payout.address}"
price_per_record = {price}
poll_wait = 1
heartbeat_seconds = 1
backoff_initial = 0.2
backoff_max = 1
approvals = {"true" if approvals else "false"}
"""
    config.write_text(text, encoding="utf-8")
    return config


class AgentProcess:
    """``rapha node run --config CONFIG`` as its own process, its output in a log file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        rapha = Path(sys.executable).with_name("rapha")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # our own CLI, a config we wrote
                [str(rapha), "node", "run", "--config", str(self.config)],
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
