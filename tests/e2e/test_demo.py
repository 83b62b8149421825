"""``rapha demo`` end to end (issue 8): real numbers, nothing leaked, nothing left running.

One ``rapha demo --studies 120`` per module, through the CLI, its parts kept open until the
module ends (the clean-up is deferred), so the tests can read its live chain.
Every figure of the summary and the report is checked against its source: the metrics
against the node's own predictions and labels, the balances and the receipt hash
against the chain. A byte scan then looks for every identifier planted in either
hospital's archive, and every stable pseudonym the demo's keys derive from them, in
everything that left a hospital or that the hub, the company, the chain or a log holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from rapha import crypto
from rapha.cli import app
from rapha.cli._demo_ui import render_summary
from rapha.demo.flow import BUDGET, HOSPITALS, Demo
from rapha.privacy.egress import find_leaks
from rapha.privacy.pseudonym import Domain, Pseudonymizer
from rapha.runtime.evaluate import evaluate
from rapha.runtime.sandbox import Sandbox

pytestmark = pytest.mark.slow

STUDIES = 120


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Demo, str]]:
    """``rapha demo --studies 120`` through the CLI; its parts are kept running (their
    clean-up deferred to the module's end) so the tests can read the live chain."""
    try:
        Sandbox().ensure_available()
    except Exception as exc:
        pytest.skip(f"no usable sandbox here: {exc}")
    workdir = tmp_path_factory.mktemp("demo") / "run"
    kept: list[Demo] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Demo, "__exit__", lambda self, *exc: kept.append(self))
        result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), "--studies",
                                          str(STUDIES), "--seed", "3"])  # fmt: skip
    try:
        assert result.exit_code == 0, result.output
        assert len(kept) == 1
        yield kept[0], result.output
    finally:
        for run in kept:
            run.close()


@pytest.fixture(scope="module")
def demo(demo_run: tuple[Demo, str]) -> Demo:
    return demo_run[0]


def _winner(demo: Demo) -> Path:
    return demo.nodes["st-mary"].root


def test_the_demo_routes_the_job_to_the_matching_hospital_and_settles_it(demo: Demo) -> None:
    summary = demo.summary

    assert summary["job"]["state"] == "settled"
    route = summary["route"]
    assert route["chosen"] == "st-mary-1"
    by_node = {n["node_id"]: n for n in route["nodes"]}
    assert by_node["st-mary-1"]["failed"] is None
    # St Luke's is cheaper, but holds CR, not the DX the job needs.
    assert by_node["st-luke-1"]["failed"] == "cohort"
    assert by_node["st-luke-1"]["price_per_record"] < by_node["st-mary-1"]["price_per_record"]
    assert "CR CHEST" in by_node["st-luke-1"]["reason"]
    assert json.loads(demo.path("summary.json").read_text()) == summary
    assert demo.path("report.html").stat().st_size > 0
    assert summary["receipt"]["verified"] is True
    assert all(a["verified"] for a in summary["audit"])


def _test_arrays(demo: Demo) -> dict[str, Any]:
    """The node-side evidence: its predictions, the view's records, the held test labels."""
    state = _winner(demo) / "state"
    view = state / "views" / demo.job_id
    evaluation = state / "evaluations" / demo.job_id
    scores = np.load(evaluation / "predictions.npy")
    val = [json.loads(line) for line in (view / "val" / "records.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (view / "test" / "records.jsonl").read_text().splitlines()]
    held = json.loads((evaluation / "test-labels.json").read_text())["records"]

    def column(labels: list[dict[str, Any]]) -> np.ndarray:
        # The bundle's policy: uncertain (-1) and missing are ignored.
        return np.array([1.0 if v == 1 else 0.0 if v == 0 else math.nan
                         for v in (row.get("effusion") for row in labels)])  # fmt: skip

    return {
        "val_scores": scores[: len(val), :1],
        "test_scores": scores[len(val) :, :1],
        "val_labels": column([r["labels"] for r in val]),
        "test_labels": column([held[r["record_id"]]["labels"] for r in test]),
        "test_meta": [r["meta"] for r in test],
    }


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney, ties counting one half, written out pair by pair."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def test_the_metrics_are_recomputed_from_the_node_side_predictions_and_labels(
    demo: Demo,
) -> None:
    arrays = _test_arrays(demo)
    published = demo.summary["metrics"]["labels"]["effusion"]
    metrics_file = json.loads((demo.path("company", "result", "metrics.json")).read_text())
    assert metrics_file == demo.summary["metrics"]
    if "auroc" not in published:  # withheld: the held-out labels must say why
        y = arrays["test_labels"]
        assert min(np.sum(y == 1), np.sum(y == 0)) < metrics_file["k"]
        return

    y, s = arrays["test_labels"][:, None], arrays["test_scores"]
    valid = ~np.isnan(y[:, 0])
    assert published["n_pos"] == int(np.sum(y == 1))
    assert published["n_neg"] == int(np.sum(y == 0))
    assert published["auroc"] == pytest.approx(_auroc(s[valid, 0], y[valid, 0]), abs=1e-4)
    # The whole document (CIs, thresholds, curves, subgroups) from the node's arrays.
    again = evaluate(
        findings=["effusion"], val_scores=arrays["val_scores"],
        val_labels=arrays["val_labels"][:, None], test_scores=s, test_labels=y,
        test_meta=arrays["test_meta"], k=metrics_file["k"],
        bootstrap=metrics_file["bootstrap"], seed=metrics_file["seed"],
    )  # fmt: skip
    assert again["labels"] == metrics_file["labels"]
    assert again["subgroups"] == metrics_file["subgroups"]
    html = demo.path("report.html").read_text()
    lo, hi = published["auroc_ci"]
    for value in (published["auroc"], lo, hi):
        assert f"{value:.3f}" in html


def test_balances_and_the_receipt_hash_are_those_on_the_chain(demo: Demo) -> None:
    chain, vault, summary = demo.chain, demo.vault, demo.summary
    receipt = json.loads(demo.path("company", "result", "receipt.json").read_text())
    job_id = bytes.fromhex(receipt["body"]["job"]["chain_job_id"][2:])

    held = vault.job(job_id)
    assert "0x" + held.receipt_hash.hex() == summary["chain"]["receipt_hash_on_chain"]
    assert held.receipt_hash.hex() == receipt["receipt_hash"] == summary["receipt"]["hash"]
    assert "0x" + vault.settlement_tx(job_id).hex() == summary["chain"]["tx_hash"]  # type: ignore[union-attr]
    addresses = {"company (payer)": demo.payer.address, "protocol treasury": chain.treasury.address,
                 **{h.name: demo.payouts[h.slug].address for h in HOSPITALS}}  # fmt: skip
    for row in summary["balances"]:
        address = addresses[row["who"]]
        wallet = int(chain.call(chain.token.functions.balanceOf(address)))
        assert (wallet, vault.credit(address)) == (
            row["after"]["wallet"], row["after"]["vault_credit"]), row["who"]  # fmt: skip
    # 70/30: the split the vault computed, to the base unit.
    due = held.amount_due
    assert due == receipt["body"]["records"] * HOSPITALS[0].price_per_record
    assert vault.credit(demo.payouts["st-mary"].address) == due * 7000 // 10000
    assert vault.credit(chain.treasury.address) == due - due * 7000 // 10000
    assert vault.credit(demo.payouts["st-luke"].address) == 0
    assert vault.credit(demo.payer.address) == BUDGET - due
    assert summary["chain"]["tx_hash"] in demo.path("report.html").read_text()


def _needles(demo: Demo) -> list[str]:
    """Every planted identifier of both archives, and every stable pseudonym and UID the
    hospitals' keys derive from their patient ids, accessions and UIDs."""
    needles: set[str] = set()
    for h in HOSPITALS:
        truth = json.loads(demo.path("archives", h.slug, "truth.json").read_text())
        needles.update(v for v in truth["must_not_leak"] if len(v.strip()) >= 4)
        key = crypto.load_secret(demo.nodes[h.slug].root / "keys" / "hmac.key", length=32)
        names = Pseudonymizer(key)
        for study in truth["studies"]:
            for value in (study["patient_id"], study["accession"], study["study_uid"]):
                for domain in Domain:
                    needles.add(names.pseudonym(domain, value))
                    needles.add(names.uid(domain, value))
    return sorted(needles)


def test_no_identifier_or_pseudonym_leaks_anywhere_outside_the_hospitals(demo: Demo) -> None:
    needles = _needles(demo)
    chain_logs = demo.path("chain", "live-events.bin")
    logs = demo.chain.w3.eth.get_logs({"fromBlock": 0, "toBlock": "latest"})
    chain_logs.write_bytes(b"".join(bytes(log["data"]) + b"".join(bytes(t) for t in log["topics"])
                                    for log in logs))  # fmt: skip
    # St Luke's ran no job, so it has no outbox; anything it had would be scanned.
    outboxes = [demo.nodes[h.slug].root / "state" / "outboxes" for h in HOSPITALS]
    places = [
        *[p for p in outboxes if p.exists() or p.parent.parent.name == "st-mary"],
        demo.path("company", "result"),
        demo.path("company", "progress.jsonl"),
        demo.path("hub"),  # the database and the artifact store
        demo.path("logs"),  # the hub's, both nodes', Orthanc's and the company's
        demo.path("report.html"),
        demo.path("summary.json"),
        demo.path("chain"),
    ]
    assert (demo.nodes["st-mary"].root / "state" / "outboxes" / demo.job_id).is_dir()
    leaks = {str(place): find_leaks(place, needles) for place in places if place.exists()}
    assert {p: len(found) for p, found in leaks.items() if found} == {}
    assert len(leaks) == len(places)
    assert len(logs) > 0
    # The scan is not blind: the archive itself is full of them.
    assert find_leaks(demo.path("archives", "st-mary", "truth.json"), needles)


def test_the_summary_prints_the_route_metrics_suppression_guard_receipt_and_balances(
    demo_run: tuple[Demo, str],
) -> None:
    demo, printed = demo_run
    console = Console(record=True, width=200)
    render_summary(demo.summary, console)
    text = console.export_text()

    assert "Rapha demo: the summary" in printed
    assert demo.summary["receipt"]["hash"] in printed.replace("\n", "")
    for expected in ("St Mary's", "holds CR CHEST", "effusion",
                     "suppressed", "allowed", "weights.safetensors", "metrics.json",
                     demo.summary["chain"]["tx_hash"], demo.summary["receipt"]["hash"],
                     "verified", "70.0%", "0 of"):  # fmt: skip
        assert expected in text, expected


def test_the_demo_refuses_a_workdir_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not the demo's")

    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--studies", "120"])

    assert result.exit_code == 2, result.output
    assert "not empty" in result.output
    assert (tmp_path / "precious.txt").read_text() == "not the demo's"


# --- killed half-way ---------------------------------------------------------------------


def _children_of(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid -> its start time (to tell a reused pid)."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            starts[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = starts[pid]
                frontier.append(pid)
    return found


def _alive(processes: dict[int, str]) -> list[int]:
    alive = []
    for pid, start in processes.items():
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[19] == start and " Z " not in stat:
                alive.append(pid)
    return alive


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_demo_killed_half_way_leaves_no_process_behind(tmp_path: Path, how: int) -> None:
    try:
        Sandbox().ensure_available()
    except Exception as exc:
        pytest.skip(f"no usable sandbox here: {exc}")
    workdir = tmp_path / "run"
    rapha = Path(sys.executable).with_name("rapha")
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen(  # our own CLI
        [str(rapha), "demo", "--workdir", str(workdir), "--studies", "100"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    seen: dict[int, str] = {}
    # Half-way: both agents are up and the company's job is running on a node.
    marker = workdir / "company" / "progress.jsonl"
    deadline = time.monotonic() + 240
    try:
        while not (marker.exists() and '"running"' in marker.read_text()):
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo did not reach a running job"
            seen.update(_children_of(demo.pid))
            time.sleep(0.2)
        seen.update(_children_of(demo.pid))
        names = {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                 for p in _alive(seen)}  # fmt: skip
        assert len(seen) >= 2, names  # at least the two agents (and Orthanc when installed)

        os.kill(demo.pid, how)
        code = demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        log.close()

    if how == signal.SIGINT:
        assert code == 130, (tmp_path / "demo.log").read_text()[-3000:]
    deadline = time.monotonic() + 30
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(seen) == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in _alive(seen)]
