"""The results report: the page states what metrics.json and receipt.json say, marks what
disclosure control hid, escapes everything, loads nothing, and never writes into the
result directory."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from typer.testing import CliRunner

from rapha import crypto
from rapha.cli import app
from rapha.client.report import MAX_POINTS, Status, render_report, summarise, write_report
from rapha.errors import DataError, ExitCode, UsageError
from rapha.ledger import ClearingVault, DevNodeChain
from rapha.receipt import (
    RECEIPT_FILE,
    Check,
    SettlementTerms,
    failed,
    receipt_hash,
    settlement_signature,
    verify_result,
)
from support.anvil import ANVIL_CHAIN_ID, anvil_or_skip
from support.results import PRICE, RECORDS, SETTLEMENT_KEY, Result, write_result

DASH = "\u2013"
TX = "0x" + "ab" * 32


class Page(HTMLParser):
    """The parsed page: every start tag, each table row with data-* attributes (by those
    attributes, as cell texts), the <style> text, each chart's title, and all text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[tuple[dict[str, str], list[str]]] = []
        self.style = ""
        self.titles: dict[str, str] = {}
        self.text = ""
        self._stack: list[str] = []
        self._row: list[str] | None = None
        self._svg: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        self._stack.append(tag)
        if tag == "tr":
            data = {k[5:]: v or "" for k, v in attrs if k.startswith("data-")}
            self._row = None
            if data:
                self._row = []
                self.rows.append((data, self._row))
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")
        elif tag == "svg":
            self._svg = attributes.get("id")

    def handle_endtag(self, tag: str) -> None:
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text += data
        where = self._stack[-1] if self._stack else ""
        if where == "style":
            self.style += data
        elif where == "title" and self._svg is not None:
            self.titles[self._svg] = self.titles.get(self._svg, "") + data
        if self._row and any(t in ("td", "th") for t in self._stack):
            self._row[-1] += data

    def row(self, **data: str) -> list[str]:
        """The cell texts of the one row with exactly these data-* attributes."""
        (cells,) = [cells for attrs, cells in self.rows if attrs == data]
        return cells

    def charts(self, kind: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == "svg" and a.get("data-chart") == kind]

    def curves(self) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == "path" and a.get("class") == "curve"]


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def ci(block: dict[str, Any]) -> str:
    low, high = block["auroc_ci"]
    return f"{low:.3f}{DASH}{high:.3f}"


@pytest.fixture
def result(tmp_path: Path) -> Result:
    return write_result(tmp_path / "result")


def checks_of(result: Result) -> list[Check]:
    return verify_result(
        result.directory, node_key=result.node_key.public_key(), hub_key=result.hub_key.public_key()
    )


# --- what the page says ------------------------------------------------------------------


def test_metrics_table_states_each_published_label_as_computed(result: Result) -> None:
    page = parse(render_report(result.directory, checks=checks_of(result)))

    labels = result.metrics["labels"]
    assert {"effusion", "cardiomegaly"} <= {n for n, b in labels.items() if "auroc" in b}
    for name, block in labels.items():
        row = " ".join(page.row(label=name))
        if block.get("suppressed"):
            assert "withheld" in row
            assert not re.search(r"\d\.\d{3}", row), row
            continue
        assert f"{block['auroc']:.3f}" in row
        assert ci(block) in row
        for key in ("sensitivity", "specificity", "ece"):
            assert f"{block[key]:.3f}" in row
        assert str(block["n_pos"]) in row
        assert str(block["n_neg"]) in row
    overall = result.metrics["overall"]
    assert f"{overall['auroc']:.3f}" in page.text
    assert ci(overall) in page.text


def test_subgroup_table_marks_suppressed_cells_and_withheld_labels(result: Result) -> None:
    page = parse(render_report(result.directory))

    written = json.loads((result.directory / "metrics.json").read_text(encoding="utf-8"))
    columns = list(written["labels"])  # the page keeps the file's order (canonical: sorted)
    seen = {"suppressed": 0, "withheld": 0, "published": 0}
    for field_name, cells in result.metrics["subgroups"].items():
        for cell, value in cells.items():
            row = page.row(field=field_name, cell=cell)
            if value.get("suppressed"):
                seen["suppressed"] += 1
                assert "suppressed" in row[2], row
                assert not re.search(r"\d", "".join(row[2:])), row
                continue
            assert row[2] == str(value["n"])
            for name, block in value["labels"].items():
                column = 3 + columns.index(name)
                if block.get("suppressed"):
                    seen["withheld"] += 1
                    assert row[column] == "withheld"
                else:
                    seen["published"] += 1
                    assert row[column] == f"{block['auroc']:.3f}{ci(block)}"
    assert all(seen.values()), seen  # the fixture exercises every case
    assert "fewer than k = 10 test records" in page.text


def test_receipt_settlement_and_checks_are_shown(result: Result) -> None:
    balances = [
        {"who": "hospital payout", "address": "0x" + "33" * 20, "before": "0", "after": 2_100_000}
    ]
    settlement = {"tx_hash": TX, "block": 4242, "hospital_share_bps": 7000, "balances": balances}

    page = parse(render_report(result.directory, settlement=settlement, checks=checks_of(result)))

    body = result.receipt["body"]
    for value in (
        body["job"]["id"],
        body["bundle_digest"],
        body["view_digest"],
        result.receipt["receipt_hash"],
        body["node_id"],
        body["settlement"]["vault"],
        *(f["sha256"] for f in body["outbox"]),
        TX,
    ):
        assert value in page.text
    assert "3.000000 USDC (3000000 base units)" in page.text  # 1200 records x 2500, below budget
    assert "hospital 2.100000 USDC (2100000 base units) (70%)" in page.text
    assert "treasury 0.900000 USDC (900000 base units) (30%)" in page.text
    assert "4242" in page.text
    assert "+2.100000 USDC" in page.text
    for check in checks_of(result):
        assert page.row(check=check.name)[1] == ("not run" if check.ok is None else "ok")


def test_without_settlement_or_checks_the_page_says_what_to_run(result: Result) -> None:
    text = render_report(result.directory)

    assert "pass --tx HASH or --rpc URL" in text
    assert "rapha job verify DIR" in text
    assert "pass --rpc URL to read it" in text  # the split is the vault's, unknown here


# --- the charts ----------------------------------------------------------------------------


def test_charts_are_titled_inline_svg_with_one_curve_per_published_label(result: Result) -> None:
    page = parse(render_report(result.directory))

    published = [n for n, b in result.metrics["labels"].items() if "auroc" in b]
    (roc,) = page.charts("roc")
    calibration = page.charts("calibration")
    (training,) = page.charts("training")
    for chart in (roc, *calibration, training):
        assert chart["id"] is not None
        assert page.titles[chart["id"]].strip()
    roc_curves = [c for c in page.curves() if c["data-label"] in published]
    assert len(roc_curves) == 2 * len(published)  # one on the ROC chart, one per reliability panel
    assert len(calibration) == len(published)
    first = next(c for c in page.curves() if c["data-label"] == published[0])
    assert first["d"] is not None
    assert first["d"].count("L") == len(result.metrics["labels"][published[0]]["roc"]["fpr"]) - 1
    suppressed_bins = sum(
        1
        for name in published
        for b in result.metrics["labels"][name]["calibration"]
        if b.get("suppressed")
    )
    assert suppressed_bins > 0
    assert sum(a.get("class") == "band" for _, a in page.tags) == suppressed_bins
    loss = next(c for c in page.curves() if c["data-label"] == "loss")
    assert loss["d"] is not None
    assert loss["d"].count("L") == len(result.metrics["training"]["progress"]) - 1


def test_an_evaluate_job_has_no_training_chart(tmp_path: Path) -> None:
    result = write_result(tmp_path / "result", kind="evaluate")

    page = parse(render_report(result.directory))

    assert page.charts("training") == []
    assert "this job trained nothing" in page.text
    assert page.charts("roc")


# --- hostile and broken input --------------------------------------------------------------


HOSTILE_LABEL = "<script>alert('label')</script>"
HOSTILE_CELL = '"><img src=x onerror=alert(1)>'


def test_hostile_names_render_as_text(tmp_path: Path) -> None:
    result = write_result(
        tmp_path / "result",
        findings=("effusion", HOSTILE_LABEL),
        cells=("GE", HOSTILE_CELL, "Philips", "Agfa"),
    )

    text = render_report(result.directory)
    page = parse(text)

    assert not [t for t, _ in page.tags if t in ("script", "img")]
    assert "<script>alert" not in text
    assert "<img src" not in text
    assert HOSTILE_LABEL in page.text
    assert HOSTILE_CELL in page.text
    assert page.row(label=HOSTILE_LABEL)[0] == HOSTILE_LABEL
    assert page.row(field="manufacturer", cell=HOSTILE_CELL)[1] == HOSTILE_CELL
    assert any(c["data-label"] == HOSTILE_LABEL for c in page.curves())


def test_the_page_references_nothing_outside_itself(result: Result) -> None:
    settlement = {"tx_hash": TX, "block": 1, "hospital_share_bps": 7000}
    page = parse(render_report(result.directory, settlement=settlement, checks=checks_of(result)))

    tags = {t for t, _ in page.tags}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "base", "form"}
    for tag, attributes in page.tags:
        for name, value in attributes.items():
            value = (value or "").strip().lower()
            assert name not in ("src", "href", "xlink:href", "srcset", "action", "ping"), tag
            assert not name.startswith("on"), (tag, name)
            assert "http:" not in value
            assert "https:" not in value
            assert not value.startswith("//")
            assert "url(" not in value, (tag, name, value)
    assert "url(" not in page.style
    assert "@import" not in page.style
    assert "@font-face" not in page.style
    csp = [a for t, a in page.tags if t == "meta" and a.get("http-equiv")]
    assert csp == [
        {
            "http-equiv": "Content-Security-Policy",
            "content": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
        }
    ]


def _rewrite_metrics(result: Result, doc: Any) -> None:
    (result.directory / "metrics.json").write_text(json.dumps(doc), encoding="utf-8")


def test_missing_null_and_mistyped_fields_render_as_not_available(result: Result) -> None:
    doc = result.metrics
    effusion = doc["labels"]["effusion"]
    effusion.update(auroc=None, auroc_ci=[0.1], sensitivity="high", ece=True)
    steps = [i / 99_999 for i in range(100_000)]
    effusion["roc"] = {"fpr": steps, "tpr": steps}
    effusion["calibration"] = [{"suppressed": True, "bin": [0.0, 0.1]}, 7, {"bin": "x"}]
    doc["labels"]["cardiomegaly"] = ["not", "a", "block"]
    doc["overall"] = 5
    doc["subgroups"] = {"sex": "nonsense", "manufacturer": {"GE": {"n": -3, "labels": []}}}
    doc["training"] = {"progress": [{"step": s, "loss": None if s % 2 else s} for s in range(5000)]}
    _rewrite_metrics(result, doc)

    page = parse(render_report(result.directory))

    row = page.row(label="effusion")
    assert row[3:8] == ["n/a", "n/a", "n/a", f"{effusion['specificity']:.3f}", "n/a"]
    assert page.row(label="cardiomegaly")[3] == "n/a"
    assert page.row(field="manufacturer", cell="GE")[2:] == ["n/a", "n/a", "n/a", "n/a"]
    roc = next(c for c in page.curves() if c["data-label"] == "effusion")
    assert roc["d"] is not None
    assert roc["d"].count("L") == MAX_POINTS - 1
    loss = next(c for c in page.curves() if c["data-label"] == "loss")
    assert loss["d"] is not None
    assert 0 < loss["d"].count("L") < MAX_POINTS


def test_summarise_turns_nan_and_infinity_into_none() -> None:
    summary = summarise(
        {
            "labels": {
                "a": {"auroc": math.nan, "auroc_ci": [math.inf, 0.9], "ece": -math.inf},
                "b": {"suppressed": True},
            },
            "subgroups": {"sex": {"F": {"suppressed": True}, "M": {"suppressed": True}}},
            "training": None,
        }
    )

    a, b = summary.labels
    assert (a.auroc, a.ci_low, a.ci_high, a.ece) == (None, None, None, None)
    assert a.status is Status.PUBLISHED
    assert b.status is Status.WITHHELD
    assert summary.published == (a,)
    assert summary.withheld_fields == ("sex",)
    assert summary.training is None
    assert summary.overall is None


def test_summarise_thins_long_curves_keeping_both_ends() -> None:
    n = 50_000
    summary = summarise(
        {
            "labels": {
                "a": {
                    "roc": {
                        "fpr": [i / n for i in range(n + 1)],
                        "tpr": [i / n for i in range(n + 1)],
                    }
                }
            }
        }
    )

    roc = summary.labels[0].roc
    assert len(roc) == MAX_POINTS
    assert roc[0] == (0.0, 0.0)
    assert roc[-1] == (1.0, 1.0)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda d: (d / "metrics.json").unlink(), DataError, r"no metrics\.json.*rapha job fetch"),
        (lambda d: (d / RECEIPT_FILE).unlink(), DataError, r"no receipt\.json.*rapha job fetch"),
        (
            lambda d: (d / "metrics.json").write_text("{not json"),
            DataError,
            r"not valid JSON.*rapha job fetch",
        ),
        (
            lambda d: (d / "metrics.json").write_text('{"auroc": NaN}'),
            DataError,
            r"not valid JSON.*rapha job fetch",
        ),
        (lambda d: (d / "metrics.json").write_text("[1, 2]"), DataError, r"not an object"),
        (lambda d: (d / RECEIPT_FILE).write_text('"a"'), DataError, r"not an object"),
    ],
    ids=["no-metrics", "no-receipt", "bad-json", "nan", "metrics-list", "receipt-string"],
)
def test_unusable_files_raise_saying_what_to_do(
    result: Result, edit: Any, error: type[Exception], message: str
) -> None:
    edit(result.directory)

    with pytest.raises(error, match=message):
        render_report(result.directory)


def test_a_file_instead_of_a_directory_is_a_usage_error(result: Result) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        render_report(result.directory / "metrics.json")


# --- writing -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["report.html", "sub/report.html", "."])
def test_write_refuses_a_path_inside_the_result_dir(result: Result, where: str) -> None:
    with pytest.raises(UsageError, match="rapha job verify"):
        write_report(result.directory, result.directory / where)

    assert not failed(checks_of(result))


def test_write_puts_the_page_beside_and_leaves_the_result_verifiable(
    result: Result, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"

    written = write_report(result.directory, out, checks=checks_of(result))

    assert written == out
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not failed(checks_of(result))


# --- the command ---------------------------------------------------------------------------

runner = CliRunner()


def _key_args(result: Result, tmp_path: Path) -> list[str]:
    node_pem, hub_pem = tmp_path / "node.pub", tmp_path / "hub.pub"
    crypto.save_public_key(result.node_key.public_key(), node_pem)
    crypto.save_public_key(result.hub_key.public_key(), hub_pem)
    return ["--node-key", str(node_pem), "--hub-key", str(hub_pem)]


def test_cli_writes_the_page_and_says_where(result: Result, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    args = ["job", "report", str(result.directory), "--out", str(out), "--tx", TX]

    outcome = runner.invoke(app, [*args, *_key_args(result, tmp_path)])

    assert outcome.exit_code == 0, outcome.output
    assert str(out) in " ".join(outcome.output.split())
    page = parse(out.read_text(encoding="utf-8"))
    assert TX in page.text
    assert page.row(check="node signature")[1] == "ok"  # pinned keys: the checks passed
    assert page.row(check="hub countersignature")[1] == "ok"
    assert not failed(checks_of(result))


def test_cli_reports_failed_checks_but_still_writes(result: Result, tmp_path: Path) -> None:
    out = tmp_path / "report.html"

    outcome = runner.invoke(app, ["job", "report", str(result.directory), "--out", str(out)])

    assert outcome.exit_code == 0, outcome.output
    assert "2 of" in outcome.output
    assert "checks failed" in outcome.output
    assert "no pinned key to check it against: pass --node-key" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "extra",
    [["--out", "{dir}/report.html"], ["--out", "{tmp}/r.html", "--tx", "0x1234"]],
    ids=["out-inside", "bad-tx"],
)
def test_cli_refuses_unusable_options(result: Result, tmp_path: Path, extra: list[str]) -> None:
    args = [a.format(dir=result.directory, tmp=tmp_path) for a in extra]

    outcome = runner.invoke(app, ["job", "report", str(result.directory), *args])

    assert outcome.exit_code == int(ExitCode.CONFIG), outcome.output
    assert sorted(p.name for p in result.directory.iterdir()) == [
        "metrics.json",
        "receipt.json",
        "weights.safetensors",
    ]


# --- with a real chain ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settled:
    result: Result
    rpc: str
    tx_hash: str
    block: int


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settled]:
    """A result whose job a real vault on anvil settled."""
    root = tmp_path_factory.mktemp("settled")
    with anvil_or_skip(root) as anvil:
        chain = DevNodeChain.connect(anvil.url, chain_id=ANVIL_CHAIN_ID)
        chain.deploy_rapha(accounts=2, registry_delay=60)
        vault = ClearingVault(chain, chain.vault)
        payer, payout = chain.accounts
        hospital_id = hashlib.sha256(b"hospital-a").digest()
        signer = Account.from_key(SETTLEMENT_KEY)
        vault.propose_hospital(
            chain.owner, hospital_id, payout=payout.address, signer=signer.address
        )
        chain.time_travel(61)
        job_id, _, _ = vault.deposit(
            payer, os.urandom(32), budget=5_000_000, max_price_per_record=PRICE, token=chain.token
        )
        terms = SettlementTerms(
            chain_id=chain.chain_id,
            vault=vault.address,
            token=str(chain.token.address),
            chain_job_id=job_id,
            hospital_id=hospital_id,
            payout=payout.address,
            budget=5_000_000,
            price_per_record=PRICE,
        )
        result = write_result(root / "result", terms=terms)
        tx = vault.settle(
            chain.operator,
            job_id,
            hospital_id=hospital_id,
            records=RECORDS,
            price_per_record=PRICE,
            receipt_hash=receipt_hash(result.receipt["body"]),
            node_signature=settlement_signature(result.receipt),
        )
        yield Settled(result, anvil.url, "0x" + tx.tx_hash.hex(), tx.block_number)


def test_cli_with_rpc_reads_the_settlement_from_the_vault(settled: Settled, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    args = ["job", "report", str(settled.result.directory), "--out", str(out), "--rpc", settled.rpc]

    outcome = runner.invoke(app, [*args, *_key_args(settled.result, tmp_path)])

    assert outcome.exit_code == 0, outcome.output
    page = parse(out.read_text(encoding="utf-8"))
    assert settled.tx_hash in page.text
    assert str(settled.block) in page.text
    assert "hospital 2.100000 USDC (2100000 base units) (70%)" in page.text
    assert page.row(check="on-chain settlement")[1] == "ok"
    assert all(cells[1] == "ok" for attrs, cells in page.rows if "check" in attrs)


def test_cli_with_rpc_refuses_a_tx_the_vault_does_not_hold(
    settled: Settled, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    args = ["job", "report", str(settled.result.directory), "--out", str(out)]

    outcome = runner.invoke(app, [*args, "--rpc", settled.rpc, "--tx", TX])

    assert outcome.exit_code == int(ExitCode.CONFIG)
    assert settled.tx_hash in " ".join(outcome.output.split())
    assert not out.exists()
