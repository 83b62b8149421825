"""What ``rapha demo`` shows: Rich progress while it runs, then the summary's tables."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

__all__ = ["RichUI", "render_summary"]

_USDC = 10**6


class RichUI:
    """One spinner line per step, a bar when the step counts something, notes between."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        self.console = console
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
            transient=False,
        )
        self._task: TaskID | None = None
        self._title = ""
        self._since = 0.0
        self.quiet = quiet

    def __enter__(self) -> RichUI:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._close_step()
        self.bar.stop()

    def _close_step(self) -> None:
        if self._task is not None:
            took = time.monotonic() - self._since
            self.bar.update(
                self._task,
                total=1,
                completed=1,
                description=f"[green]✓[/] {escape(self._title)} ({took:.0f} s)",
            )
            self.bar.stop_task(self._task)
            self._task = None

    def step(self, title: str) -> None:
        self._close_step()
        self._title, self._since = title, time.monotonic()
        self._task = self.bar.add_task(escape(title), total=None)

    def progress(self, done: int, total: int, what: str = "") -> None:
        if self._task is None:
            return
        label = escape(self._title + (f" · {what}" if what else ""))
        self.bar.update(self._task, completed=done, total=total or None, description=label)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bar.console.print(f"[yellow]note:[/] {escape(text)}", highlight=False)


def _usdc(units: int | None, digits: int = 6) -> str:
    return "—" if units is None else f"{units / _USDC:,.{digits}f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_summary(summary: Mapping[str, Any], console: Console) -> None:
    """The demo's summary (``summary.json``) as tables on ``console``."""
    from rapha.client.report import Status, summarise

    console.rule("[bold]Rapha demo: the summary")
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)

    route = summary["route"]
    table = Table(
        title=f"Route: the hub sent job {summary['job']['id']} to "
        f"{escape(route['chosen_hospital'])}"
    )
    for column in ("", "node", "hospital", "cohort", "records", "USDC/record", "why"):
        table.add_column(column)
    for node in route["nodes"]:
        chosen = "→" if node["node_id"] == route["chosen"] else ""
        table.add_row(
            chosen,
            node["node_id"],
            escape(node["hospital"]),
            f"{node['modality']} {node['body_part']}",
            str(node["records"]),
            _usdc(node["price_per_record"]),
            escape(node["reason"]),
        )
    console.print(table)
    need = route["requirements"]
    labels = ", ".join(f"{n['name']} ≥ {n['min_positives']} positives" for n in need["labels"])
    console.print(
        f"the job needs {need['modality']} {need['body_part']}, ≥ "
        f"{need['min_records']} records, {labels}, ≤ "
        f"{_usdc(need['max_price_per_record'])} USDC per record",
        highlight=False,
    )

    records = summary.get("records") or {}
    console.print(
        f"records used: {records.get('train', 0)} train, {records.get('val', 0)} "
        f"val (billed: {records.get('billed', 0)}), {records.get('test', 0)} test "
        "(scored by the node, never seen with labels by the model)",
        highlight=False,
    )

    metrics = summarise(summary["metrics"])
    table = Table(title=f"Metrics on the test split, computed by the node (k = {metrics.k})")
    for column in ("label", "AUROC", "95% CI", "sensitivity", "specificity", "ECE", "pos/neg"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for row in metrics.labels:
        if row.status is not Status.PUBLISHED:
            table.add_row(escape(row.label), f"{row.status.value} (< k)", "", "", "", "", "")
            continue
        ci = f"[{_num(row.ci_low)}, {_num(row.ci_high)}]"
        table.add_row(
            escape(row.label),
            _num(row.auroc),
            ci,
            _num(row.sensitivity),
            _num(row.specificity),
            _num(row.ece),
            f"{row.n_pos}/{row.n_neg}",
        )
    console.print(table)
    names = [row.label for row in metrics.labels]
    table = Table(title="Subgroups (AUROC per cell; cells under k records are suppressed)")
    for column in ("field", "cell", "n", *names):
        table.add_column(escape(column))
    for cell in metrics.subgroups:
        if cell.status is Status.SUPPRESSED:
            table.add_row(
                escape(cell.field),
                escape(cell.cell),
                "[dim]suppressed[/]",
                *["[dim]suppressed[/]"] * len(names),
            )
            continue
        values = {m.label: m for m in cell.labels}
        table.add_row(
            escape(cell.field),
            escape(cell.cell),
            str(cell.n),
            *[
                _num(values[n].auroc)
                if n in values and values[n].status is Status.PUBLISHED
                else f"[dim]{values[n].status.value if n in values else 'withheld'}[/]"
                for n in names
            ],
        )
    console.print(table)

    table = Table(title="Output guard decisions (from the node's audit log)")
    for column in ("decision", "reasons", "files"):
        table.add_column(column)
    for decision in summary["guard"]:
        allowed = "[green]allowed[/]" if decision["allowed"] else "[red]denied[/]"
        files = ", ".join(f["name"] for f in decision.get("files", []))
        table.add_row(allowed, escape(", ".join(decision["reasons"]) or "—"), escape(files))
    console.print(table)

    _left_and_stayed(summary, console)
    _receipt_and_chain(summary, console)

    for audit in summary["audit"]:
        verdict = (
            f"[green]verified[/], {audit['entries']} entries, head {audit['head'][:16]}…"
            if audit["verified"]
            else f"[red]FAILED[/]: {escape(audit['error'])}"
        )
        console.print(f"audit log of {escape(audit['hospital'])}: {verdict}", highlight=False)
    console.print(f"report: {summary['report']}", soft_wrap=True, highlight=False)
    console.print(
        f"everything: {summary['workdir']} (summary.json); "
        f"took {summary.get('wall_seconds', 0):.0f} s",
        soft_wrap=True,
        highlight=False,
    )


def _left_and_stayed(summary: Mapping[str, Any], console: Console) -> None:
    table = Table(title=f"What left {escape(summary['route']['chosen_hospital'])}")
    for column in ("file", "bytes", "SHA-256"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for f in summary["left"]["files"]:
        table.add_row(escape(f["name"]), f"{f['size']:,}", f["sha256"])
    table.add_row("receipt.json", "", "signed by the node, countersigned by the hub")
    console.print(table)
    stayed = summary["stayed"]
    counts = stayed.get("view_records") or {}
    console.print(
        f"what stayed: {stayed['dicom_files']:,} DICOM files ({stayed['dicom_bytes']:,} bytes), "
        f"the view ({', '.join(f'{v} {k}' for k, v in counts.items())}), test labels and "
        f"predictions; never sent: {', '.join(stayed['never_left'])}",
        highlight=False,
    )
    scan = summary["egress_scan"]
    found = sum(scan["found"].values())
    colour = "green" if found == 0 else "red"
    console.print(
        f"egress scan: [{colour}]{found} of {scan['identifiers']:,}[/] planted "
        f"identifiers of both hospitals found in {', '.join(scan['scanned'])}",
        highlight=False,
    )


def _receipt_and_chain(summary: Mapping[str, Any], console: Console) -> None:
    receipt = summary["receipt"]
    table = Table(title="Receipt verification (pinned node and hub keys, the chain)")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for check in receipt["checks"]:
        ok = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "[dim]not run[/]"}[check["ok"]]
        table.add_row(escape(check["name"]), ok, escape(check["detail"]))
    console.print(table)
    verdict = "[green]verified[/]" if receipt["verified"] else "[red]NOT verified[/]"
    console.print(f"receipt {receipt['hash']}: {verdict}", highlight=False)
    chain = summary["chain"]
    split = summary["split"]
    console.print(
        f"settled on chain {chain['chain_id']} in tx {chain['tx_hash']} (block "
        f"{chain['block']}); on-chain receipt hash "
        f"{'matches' if chain['receipt_hash_matches'] else 'DIFFERS'}; "
        f"due {_usdc(split['amount_due'])} USDC: {_usdc(split['hospital'])} to the hospital "
        f"({split['hospital_percent']}%), {_usdc(split['treasury'])} to the protocol, "
        f"{_usdc(split['refund'])} back to the company",
        highlight=False,
    )
    table = Table(title="Balances (USDC): wallet + credit in the vault")
    for column in ("party", "wallet before", "wallet after", "vault before", "vault after"):
        table.add_column(column, justify="left" if column == "party" else "right")
    for b in summary["balances"]:
        table.add_row(
            escape(b["who"]),
            _usdc(b["before"]["wallet"], 2),
            _usdc(b["after"]["wallet"], 2),
            _usdc(b["before"]["vault_credit"]),
            _usdc(b["after"]["vault_credit"]),
        )
    console.print(table)
