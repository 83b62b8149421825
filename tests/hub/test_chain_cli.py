"""The company's and the operator's chain commands against ``rapha hub serve`` on anvil.

A real hub process (``rapha hub serve --chain http://…``) deploys the demo contracts on a
real JSON-RPC dev node (anvil) and runs its background loop. The company submits with
``rapha job submit`` (upload, deposit from its wallet key file, submit), follows the job,
cancels it and refunds with ``rapha job refund``; the operator registers a hospital's
payout with ``rapha hub admin register-hospital-payout`` through the vault's timelock.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from typer.testing import CliRunner

from rapha.cli import app
from rapha.hub.db import Role, open_database
from rapha.hub.services import SYSTEM, Hub
from rapha.ledger import ClearingVault, DevNodeChain
from support.anvil import AnvilNode, anvil_or_skip
from support.orthanc import free_port

pytestmark = pytest.mark.slow


def rapha(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


@dataclass
class Served:
    url: str
    config: Path
    db_url: str
    anvil: AnvilNode
    pepper: str

    def hub(self) -> Hub:
        return Hub(open_database(self.db_url), pepper=self.pepper)

    def chain(self) -> DevNodeChain:
        return DevNodeChain.connect(self.anvil.url)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("chain-cli")
    (root / "anvil").mkdir()
    with anvil_or_skip(root / "anvil") as anvil:
        assert rapha("hub", "init", str(root / "hub"))[0] == 0
        config = root / "hub" / "hub.toml"
        db_url = f"sqlite:///{root / 'hub.db'}"
        text = config.read_text()
        pepper = re.search(r'(?m)^api_key_pepper = "([^"]+)"', text)
        assert pepper is not None
        config.write_text(text + "loop_interval = 0.3\n")
        port = free_port()
        log = (root / "hub.log").open("wb")
        proc = subprocess.Popen(  # our own CLI
            [str(Path(sys.executable).with_name("rapha")), "hub", "serve", "--config",
             str(config), "--port", str(port), "--db", db_url, "--chain", anvil.url],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"},
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/v1/chain", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((root / "hub.log").read_text())
                time.sleep(0.2)
            yield Served(url, config, db_url, anvil, pepper.group(1))
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            log.close()


def _key_file(path: Path, key: bytes) -> Path:
    path.write_text(key.hex())
    path.chmod(0o600)
    return path


def test_a_company_submits_with_a_deposit_follows_cancels_and_refunds(
    served: Served, tmp_path: Path
) -> None:
    hub = served.hub()
    wallet = DevNodeChain.demo_accounts(1)[0]
    hub.create_org(SYSTEM, "acme-ai", Role.COMPANY, wallet=wallet.address)
    env = {"RAPHA_HUB_URL": served.url,
           "RAPHA_API_KEY": hub.create_key(SYSTEM, "acme-ai", "demo").token,
           "RAPHA_RPC_URL": served.anvil.url}  # fmt: skip
    hub.db.close()
    wallet_key = _key_file(tmp_path / "wallet.key", bytes(wallet.key))
    assert rapha("keygen", "--out", str(tmp_path / "acme.key"))[0] == 0
    bundle = tmp_path / "bundle"
    assert rapha("job", "init", str(bundle), "--zoo", "rapha.SmallCNN", "--size", "32")[0] == 0
    assert rapha("job", "sign", str(bundle), "--key", str(tmp_path / "acme.key"))[0] == 0
    profile = tmp_path / "profile.toml"
    profile.write_text('modality = "DX"\nbody_part = "CHEST"\nmin_records = 50000\n'
                       '[[labels]]\nname = "effusion"\nmin_positives = 10\n')  # fmt: skip
    chain = served.chain()
    terms = httpx.get(f"{served.url}/v1/chain").json()
    token = chain.contract("MockUSDC", terms["token"])
    before = int(chain.call(token.functions.balanceOf(wallet.address)))

    code, out = rapha("job", "submit", str(bundle), "--profile", str(profile), "--budget", "5",
                      "--max-price", "0.003", "--wallet", str(wallet_key), "--json",
                      env=env)  # fmt: skip

    assert code == 0, out
    job_id = re.search(r'"id": "([0-9a-f]+)"', out)
    assert job_id is not None, out
    assert int(chain.call(token.functions.balanceOf(wallet.address))) == before - 5_000_000
    # No node matches: the job is funded and stays so, saying why.
    code, out = rapha("job", "watch", job_id.group(1), "--timeout", "3", "--interval", "0.3",
                      env=env)  # fmt: skip
    assert code == 1
    assert "funded" in out
    assert "waiting for a node" in " ".join(out.split())
    code, out = rapha("job", "fetch", job_id.group(1), "--out", str(tmp_path / "r"), env=env)
    assert code != 0
    assert "settled" in out
    assert rapha("job", "cancel", job_id.group(1), env=env)[0] == 0
    deadline = time.monotonic() + 30
    while True:  # the hub's loop marks the job failed in the vault
        code, out = rapha("job", "refund", job_id.group(1), "--wallet", str(wallet_key), env=env)
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    assert code == 0, out
    assert "refunded 5.000000 USDC" in out
    assert int(chain.call(token.functions.balanceOf(wallet.address))) == before


def test_a_submission_with_a_bad_amount_or_no_chain_says_what_to_fix(
    served: Served, tmp_path: Path
) -> None:
    wallet_key = _key_file(tmp_path / "wallet.key", os.urandom(32))
    profile = tmp_path / "p.toml"
    profile.write_text('modality = "DX"\nbody_part = "CHEST"\nmin_records = 10\n')
    env = {"RAPHA_HUB_URL": served.url, "RAPHA_API_KEY": "rk_demo_x_y", "RAPHA_RPC_URL": ""}
    args = ["job", "submit", str(tmp_path), "--profile", str(profile), "--wallet",
            str(wallet_key), "--max-price", "0.001"]  # fmt: skip

    code, out = rapha(*args, "--budget", "1.0000001", env=env)
    assert code != 0
    assert "at most 6 decimals" in " ".join(out.split())
    code, out = rapha(*args, "--budget", "1", env=env)
    assert code != 0
    assert "--rpc" in out


def test_the_operator_registers_a_hospital_payout_through_the_timelock(
    served: Served, tmp_path: Path
) -> None:
    hub = served.hub()
    hub.create_org(SYSTEM, "st-anne", Role.HOSPITAL)
    hub.db.close()
    payout, signer = Account.create(), Account.create()
    owner_key = _key_file(tmp_path / "owner.key", bytes(DevNodeChain.owner.key))
    chain = served.chain()
    vault_address = httpx.get(f"{served.url}/v1/chain").json()["vault"]

    code, out = rapha(
        "hub", "admin", "register-hospital-payout", "st-anne", "--payout", payout.address,
        "--signer", signer.address, "--owner-key", str(owner_key), "--rpc", served.anvil.url,
        "--vault", vault_address, "--config", str(served.config), "--db", served.db_url,
    )  # fmt: skip

    assert code == 0, out
    assert "takes effect in 60 s" in " ".join(out.split())
    vault = ClearingVault(chain, chain.contract("ClearingVault", vault_address))
    from eth_utils.crypto import keccak

    hospital_id = keccak(text="st-anne")
    assert vault.hospital(hospital_id)[0] != payout.address  # not before the timelock
    chain.time_travel(61)
    assert vault.hospital(hospital_id) == (payout.address, signer.address)
    hub = served.hub()
    try:
        actions = [a["action"] for a in hub.operator_actions()]
        assert "set_wallet" in actions
        from rapha.hub.db import Org

        with hub.db.session() as session:
            org = session.get(Org, hub.org_id("st-anne"))
            assert org is not None
            assert org.wallet == payout.address
    finally:
        hub.db.close()
