"""The three parties end to end: a real hub, a real chain, real node agents (issue 7).

One marketplace per module: a hub under uvicorn on loopback with an embedded EVM and its
background loop; four hospitals, each a ``rapha node run`` process with a dev attestation:

* ``st-mary``: DX through the folder source;
* ``st-luke``: DX through a real Orthanc over DICOMweb;
* ``far-clinic``: DX too, but it asks more per record than any job here pays, so it never
  matches;
* ``cr-clinic``: CR only, and a person must approve every job.

A company (``acme-ai``) submits with the SDK: upload, submit, deposit from its wallet.
Every test waits for a clear end state and checks the chain's balances exactly.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rapha import crypto
from rapha.attest import AttestationError
from rapha.cli import app
from rapha.client import NodeClient, PermissionDeniedError, RaphaClient
from rapha.client.escrow import refund, submit_job
from rapha.errors import UsageError
from rapha.hub.jobs import JobState
from rapha.hub.services import SYSTEM
from rapha.receipt import failed, verify_result
from rapha.runtime.sandbox import Sandbox
from support.market import (
    REGISTRY_DELAY,
    AgentProcess,
    Hospital,
    HubUnderTest,
    wait_for,
    write_node,
)
from support.orthanc import start_orthanc, upload_folder

pytestmark = pytest.mark.slow

PRICE, FAR_PRICE, MAX_PRICE = 2_000, 900_000, 3_000
BUDGET = 5_000_000  # 5 USDC
DX = {
    "modality": "DX",
    "body_part": "CHEST",
    "labels": [{"name": "effusion", "min_positives": 2}],
    "min_records": 20,
}
CR = {**DX, "modality": "CR"}
JOB_TIMEOUT = 240.0


def rapha(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@dataclass
class Market:
    hub: HubUnderTest
    company: RaphaClient
    wallet: Any
    hospitals: dict[str, Hospital]
    configs: dict[str, Path]
    agents: dict[str, AgentProcess]
    bundles: dict[str, Path]
    company_key: Path

    def submit(self, bundle: str = "zoo", requirements: dict[str, Any] = DX,
               **kwargs: Any) -> dict[str, Any]:  # fmt: skip
        return submit_job(
            kwargs.pop("client", self.company), self.bundles[bundle],
            requirements=requirements, budget=BUDGET, max_price_per_record=MAX_PRICE,
            wallet=self.wallet, chain=self.hub.chain, **kwargs,
        )  # fmt: skip

    def job(self, job_id: str) -> dict[str, Any]:
        return self.company.job(job_id)

    def ended(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["state"] in ("settled", "failed", "cancelled") else None

        try:
            return wait_for(f"job {job_id} to end", done, timeout=timeout)  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {self.job(job_id)}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{a.log[-3000:]}" for n, a in self.agents.items())

    def nodes_leased(self, job_id: str) -> list[str]:
        return [e["detail"]["node"] for e in self.hub.jobs.events(job_id)
                if e["state"] == "assigned"]  # fmt: skip

    def credit(self, address: str) -> int:
        return self.hub.vault.credit(address)


def _bundle(root: Path, key: Path, *init: str, model_extra: str = "", **values: str) -> Path:
    code, out = rapha("job", "init", str(root), "--size", "32", *init)
    assert code == 0, out
    if model_extra:
        model = root / "model.py"
        model.write_text(model.read_text() + model_extra)
    manifest = root / "bundle.toml"
    text = manifest.read_text()
    for name, value in {"epochs": "1", "batch_size": "16", **values}.items():
        text = re.sub(rf"(?m)^{name} = .*$", f"{name} = {value}", text, count=1)
    manifest.write_text(text)
    assert rapha("job", "weights", str(root))[0] == 0
    code, out = rapha("job", "sign", str(root), "--key", str(key))
    assert code == 0, out
    return root


_LEAKY_LOOP = '''

def train(model, data, hparams, ctx):
    """Trains nothing and leaves a note beside the weights: the guard must deny it."""
    with open("/out/notes.txt", "w") as fh:
        fh.write("a file the output policy does not name")
'''


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    try:
        Sandbox().ensure_available()
    except Exception as exc:
        pytest.skip(f"no usable sandbox here: {exc}")
    from rapha.demo.archive import generate_archive

    root = tmp_path_factory.mktemp("market")
    archive = root / "archive"
    generate_archive(archive, studies=160, seed=11, size_range=(64, 64))
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(_market(root, archive, stack))


@contextlib.contextmanager
def _market(root: Path, archive: Path, stack: contextlib.ExitStack) -> Iterator[Market]:
    from rapha.node.settings import load_node_settings

    orthanc = start_orthanc(root / "orthanc")
    stack.callback(orthanc.stop)
    upload_folder(orthanc, archive / "dicom")
    hub = HubUnderTest(root / "hub", lease_seconds=6)
    stack.callback(hub.stop)
    payer, mary, luke, far, cr, _ = hub.chain.accounts
    company = hub.company("acme-ai", payer)
    stack.callback(company.close)
    keys = root / "company"
    keys.mkdir()
    assert rapha("keygen", "--out", str(keys / "acme.key"))[0] == 0
    assert rapha("keygen", "--out", str(keys / "rogue.key"))[0] == 0
    acme_pub = keys / "acme.pub"
    acme_pub.write_bytes(crypto.public_key_pem(crypto.load_private_key(keys / "acme.key")
                                               .public_key()))  # fmt: skip
    bundles = {
        "zoo": _bundle(root / "b-zoo", keys / "acme.key", "--zoo", "rapha.SmallCNN"),
        "rogue": _bundle(root / "b-rogue", keys / "rogue.key", "--zoo", "rapha.SmallCNN"),
        "leaky": _bundle(root / "b-leaky", keys / "acme.key", "--custom",
                         model_extra=_LEAKY_LOOP, loop='"custom"'),
    }  # fmt: skip

    layout = {  # name: (payout, source, modality, price, uid, approvals)
        "st-mary": (mary, str(archive / "dicom"), "DX", PRICE, 62000, False),
        "st-luke": (luke, orthanc.url + "/dicom-web", "DX", PRICE, 62100, False),
        "far-clinic": (far, str(archive / "dicom"), "DX", FAR_PRICE, 62200, False),
        "cr-clinic": (cr, str(archive / "dicom"), "CR", PRICE, 62300, True),
    }
    hospitals, configs, agents = {}, {}, {}
    for name, (payout, source, modality, price, uid, approvals) in layout.items():
        hospital = Hospital(hub, name, payout)
        config = write_node(
            root / name, hospital=hospital, hub_url=hub.url, source=source,
            labels=archive / "labels.csv", modality=modality, price=price, uid=uid,
            trusted={"acme-ai": acme_pub}, approvals=approvals,
        )  # fmt: skip
        settings = load_node_settings(config, env={})
        public = crypto.load_private_key(settings.keys.signing_key).public_key()
        hub.hub.enroll_node(SYSTEM, node_id=hospital.node_id, org_name=name,
                            public_key_pem=crypto.public_key_pem(public),
                            environment="demo", kind="dev")  # fmt: skip
        hospitals[name], configs[name] = hospital, config
        agents[name] = AgentProcess(config)
        stack.callback(agents[name].stop)
    # Stopped together: each takes a moment to finish its long poll.
    for agent in agents.values():  # callbacks run last-first: all are asked before any waits
        stack.callback(agent.terminate)
    hub.chain.time_travel(REGISTRY_DELAY + 1)  # the vault's registry timelock
    for agent in agents.values():
        agent.start()
    # Each agent measures itself and is refused until the operator allows what it printed.
    for name, agent in agents.items():

        def printed(agent: AgentProcess = agent) -> re.Match[str] | None:
            return re.search(r"measurement ([0-9a-f]{64})", agent.log)

        found = wait_for(f"{name}'s measurement", printed, timeout=60)
        hub.hub.allow_measurement(SYSTEM, "demo", found.group(1))
    market = Market(hub, company, payer, hospitals, configs, agents, bundles, keys / "acme.key")

    def all_published() -> bool:
        return all("published the profile" in a.log for a in agents.values())

    try:
        wait_for("every agent to attest and publish", all_published, timeout=120)
    except AssertionError:
        raise AssertionError(market.logs()) from None
    yield market


def _verify(market: Market, job_id: str, out: Path) -> None:
    market.company.fetch(job_id, out)
    receipt = json.loads((out / "receipt.json").read_text())
    name = next(n for n, h in market.hospitals.items() if h.node_id == receipt["body"]["node_id"])
    node_key = crypto.load_private_key(market.configs[name].parent / "keys" / "node.key")
    pins = out.parent / "pins"
    pins.mkdir()
    (pins / "node.pem").write_bytes(crypto.public_key_pem(node_key.public_key()))
    (pins / "hub.pem").write_bytes(crypto.public_key_pem(market.hub.hub_key.public_key()))

    code, text = rapha("job", "verify", str(out), "--node-key", str(pins / "node.pem"),
                       "--hub-key", str(pins / "hub.pem"), "--json")  # fmt: skip

    assert code == 0, text
    hub_key = market.hub.hub_key.public_key()
    checks = verify_result(out, node_key=node_key.public_key(), hub_key=hub_key,
                           chain=market.hub.chain)  # fmt: skip
    assert failed(checks) == [], checks
    assert next(c for c in checks if c.name == "on-chain settlement").ok is True


def test_a_job_is_routed_to_a_matching_node_trained_delivered_settled_and_verified(
    market: Market, tmp_path: Path
) -> None:
    hub = market.hub
    payer_before = hub.balance(market.wallet.address)
    credits = {n: market.credit(h.payout.address) for n, h in market.hospitals.items()}
    treasury = market.credit(hub.chain.treasury.address)

    job = market.submit()
    final = market.ended(job["id"])

    assert final["state"] == "settled", (final, market.logs())
    matching = {market.hospitals[n].node_id for n in ("st-mary", "st-luke")}
    assert final["node_id"] in matching
    assert set(market.nodes_leased(job["id"])) <= matching  # never far-clinic or cr-clinic
    states = [e["state"] for e in hub.jobs.events(job["id"])]
    assert states[:2] == ["submitted", "funded"]
    assert states[-2:] == ["delivered", "settled"]
    # Exact balances: the deposit left the wallet; 70 % of records x price to the node's
    # hospital, 30 % to the treasury, the rest of the budget back to the payer.
    receipt = market.company.result(job["id"])["receipt"]
    records = receipt["body"]["records"]
    due = min(BUDGET, records * PRICE)
    winner = next(n for n, h in market.hospitals.items() if h.node_id == final["node_id"])
    assert hub.balance(market.wallet.address) == payer_before - BUDGET
    for name, hospital in market.hospitals.items():
        gained = market.credit(hospital.payout.address) - credits[name]
        assert gained == (due * 7000 // 10000 if name == winner else 0), name
    assert market.credit(hub.chain.treasury.address) - treasury == due - due * 7000 // 10000
    assert market.credit(market.wallet.address) >= BUDGET - due
    _verify(market, job["id"], tmp_path / "result")
    # The hospital's record of processing: what ran, counts, what left; no identifiers.
    code, text = rapha("node", "report", job["id"], "--config", str(market.configs[winner]),
                       "--format", "json")  # fmt: skip
    assert code == 0, text
    report = json.loads(text)
    assert report["audit_log"]["verified"] is True
    flat = json.dumps(report)
    assert "acme-ai" in flat
    assert receipt["body"]["bundle_digest"] in flat
    assert '"pinned": true' in flat or '"signer_pinned": true' in flat
    assert "weights.safetensors" in flat
    assert "agent.delivered" in flat


def _refunded(market: Market, job_id: str, before: int) -> None:
    """The job's escrow is released, refunded and withdrawn: the wallet holds ``before``
    (its balance before the deposit) plus what the vault held for it already."""
    wait_for("the escrow to be released", lambda: market.job(job_id)["refundable"], timeout=30)
    credit = market.credit(market.wallet.address)  # unused budgets of earlier settled jobs
    assert refund(market.company, job_id, wallet=market.wallet, chain=market.hub.chain) == BUDGET
    assert market.hub.balance(market.wallet.address) == before + credit
    assert market.credit(market.wallet.address) == 0


def test_a_job_no_node_matches_stays_funded_with_an_explanation_and_refunds(
    market: Market,
) -> None:
    before = market.hub.balance(market.wallet.address)
    job = market.submit(requirements={**DX, "min_records": 100_000})

    waiting = wait_for("an explanation", lambda: (
        j if (j := market.job(job["id"]))["state"] == "funded" and j["explanation"] else None),
        timeout=30)  # fmt: skip

    assert "waiting for a node" in waiting["explanation"]
    assert "100000" in waiting["explanation"].replace(",", "")
    assert market.nodes_leased(job["id"]) == []
    market.company.cancel(job["id"])
    _refunded(market, job["id"], before)
    with pytest.raises(UsageError, match="refunded already"):
        refund(market.company, job["id"], wallet=market.wallet, chain=market.hub.chain)


def test_a_guard_denial_fails_the_job_and_the_payer_gets_a_refund(market: Market) -> None:
    before = market.hub.balance(market.wallet.address)
    job = market.submit("leaky")

    final = market.ended(job["id"])

    assert final["state"] == "failed", (final, market.logs())
    assert final["failure"].startswith("guard_denied: "), final
    assert "unexpected_file" in final["failure"]
    _refunded(market, job["id"], before)


def test_an_unpinned_company_key_is_rejected_by_admission(market: Market) -> None:
    before = market.hub.balance(market.wallet.address)
    job = market.submit("rogue")

    final = market.ended(job["id"])

    assert final["state"] == "failed"
    assert final["failure"] == "admission_rejected: unpinned_signer", final
    _refunded(market, job["id"], before)


def test_a_job_that_needs_approval_waits_then_runs_once_approved(market: Market) -> None:
    job = market.submit(requirements=CR)
    node = market.hospitals["cr-clinic"].node_id
    config = market.configs["cr-clinic"]

    wait_for("the approval phase", lambda: market.job(job["id"])["progress"].get("phase")
             == "approval", timeout=60)  # fmt: skip
    code, out = rapha("node", "approvals", "list", "--config", str(config), "--json")
    assert code == 0, out
    assert job["id"] in out
    assert market.job(job["id"])["state"] == "running"  # waiting: nothing ran yet
    code, out = rapha("node", "approvals", "approve", job["id"], "--by", "dpo@cr-clinic",
                      "--config", str(config))  # fmt: skip
    assert code == 0, out

    final = market.ended(job["id"])
    assert final["state"] == "settled", (final, market.logs())
    assert final["node_id"] == node


def test_a_demo_key_cannot_submit_a_production_job(market: Market) -> None:
    with pytest.raises(PermissionDeniedError, match="demo API key cannot submit a production"):
        market.submit(environment="production")


def test_a_production_job_is_never_assigned_to_a_dev_attested_node(market: Market) -> None:
    with market.hub.company("acme-ai", market.wallet, environment="production") as production:
        job = market.submit(client=production, environment="production")

        wait_for("funding", lambda: production.job(job["id"])["state"] == "funded", timeout=30)
        waited = wait_for("an explanation", lambda: production.job(job["id"])["explanation"],
                          timeout=30)  # fmt: skip

        assert "production" in waited
        assert production.job(job["id"])["state"] == "funded"
        assert market.nodes_leased(job["id"]) == []
        with pytest.raises(AttestationError, match="demo-only"):
            market.hub.hub.enroll_node(
                SYSTEM, node_id="st-mary-prod", org_name="st-mary",
                public_key_pem=crypto.public_key_pem(crypto.generate_private_key().public_key()),
                environment="production", kind="dev",
            )  # fmt: skip
        assert "st-mary-prod" not in [n.id for n in market.hub.hub.list_nodes(SYSTEM)]
        production.cancel(job["id"])


def test_a_hub_restart_mid_job_loses_nothing(market: Market) -> None:
    job = market.submit()
    wait_for("a running job", lambda: market.job(job["id"])["state"] == "running", timeout=60)

    market.hub.restart(down_for=3.0)

    final = market.ended(job["id"])
    assert final["state"] == "settled", (final, market.logs())
    assert final["attempts"] == 1
    assert len(market.nodes_leased(job["id"])) == 1


def test_a_node_killed_mid_job_is_replaced_and_its_late_upload_is_fenced(
    market: Market,
) -> None:
    job = market.submit()
    running = wait_for("a node to start the job", lambda: (
        j if (j := market.job(job["id"]))["progress"].get("phase") in ("view", "train", "predict")
        else None), timeout=60)  # fmt: skip
    first = running["node_id"]
    name = next(n for n, h in market.hospitals.items() if h.node_id == first)
    token = next(e["detail"]["token"] for e in market.hub.jobs.events(job["id"])
                 if e["state"] == "assigned")  # fmt: skip
    market.agents[name].kill()
    try:
        final = market.ended(job["id"])

        assert final["state"] == "settled", (final, market.logs())
        assert final["node_id"] != first
        assert market.nodes_leased(job["id"]) == [first, final["node_id"]]
        # The first node comes back with its old lease: fenced off.
        node_key = crypto.load_private_key(market.configs[name].parent / "keys" / "node.key")
        with NodeClient(market.hub.url, first, node_key) as late:
            with pytest.raises(Exception, match="stale") as refused:
                late.deliver(job["id"], {
                    "fencing_token": token, "receipt": {}, "delivery_evidence": {},
                    "delivery_nonce": "00" * 32, "files": {},
                })  # fmt: skip
            assert getattr(refused.value, "status", None) == 409
            assert getattr(refused.value, "error", None) == "StaleLeaseError"
        assert market.job(job["id"])["state"] == JobState.SETTLED.value
    finally:
        shutil.rmtree(market.configs[name].parent / "state" / "jobs", ignore_errors=True)
        market.agents[name].start()
