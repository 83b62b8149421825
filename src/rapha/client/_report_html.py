"""The HTML of the results report: sections, tables and charts (:mod:`rapha.client.report`).

Values from ``metrics.json`` arrive here already read into a
:class:`~rapha.client.report.MetricsSummary`; the receipt and the settlement mapping are
read here, field by field, with anything missing or mistyped shown as "n/a". Every
string is escaped with :func:`html.escape` (quotes too) and cut to a readable length
before it reaches the page.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from html import escape
from typing import Any, Final

from rapha.client._report_svg import PALETTE, Axis, Band, Series, line_chart, nice_axis
from rapha.client.escrow import USDC_DECIMALS
from rapha.client.report import LabelRow, MetricsSummary, Status, TrainingPoint
from rapha.receipt import Check

__all__ = ["DASH", "NA", "render"]

NA: Final = "n/a"
#: Between the ends of an interval (an en dash: 0.871 to 0.930).
DASH: Final = "\u2013"
_MINUS: Final = "\u2212"
_MAX_TEXT = 200
_MAX_ROWS = 200
_MAX_VERTICALS = 12
_UNITS = re.compile(r"[0-9]{1,78}")
_UNIT_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

_CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;
background:#f6f7f9;margin:0}
header{background:#12355b;color:#fff;padding:20px 32px}
header h1{margin:0 0 4px;font-size:22px}
main{max-width:1120px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:16px 20px;
margin:16px 0}
h2{font-size:17px;margin:0 0 10px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef1;vertical-align:top}
th{background:#f2f4f7;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
td,th{overflow-wrap:break-word}
.na{color:#888}
.note{color:#555;font-size:12.5px}
.suppressed,.withheld{background:#f1f1f1;color:#555;font-style:italic}
.ok{color:#0a7a32;font-weight:600}.failed{color:#b00020;font-weight:600}
.notrun{color:#8a6d00;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{border:1px solid #eceef1;border-radius:4px}
.tick{font-size:11px;fill:#444}.axis-label{font-size:12px;fill:#222}
.legend{font-size:12px;fill:#222}.chart-title{font-size:13px;font-weight:600;fill:#222}
.band-caption{font-size:10px;fill:#555}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-top:12px}
.card{background:rgba(255,255,255,.12);border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:19px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
"""
_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_SUPPRESSED_NOTE: Final = (
    "suppressed: the cell has fewer than k = {k} test records, or was hidden as well so that "
    "such a cell cannot be worked out from the others. withheld: fewer than k positives or k "
    "negatives for that label in that cell. n/a: not available."
)


def render(
    summary: MetricsSummary,
    receipt: Mapping[str, Any],
    *,
    settlement: Mapping[str, Any] | None,
    checks: Sequence[Check] | None,
    source: str,
) -> str:
    """The whole page."""
    body = _map(receipt.get("body"))
    colors = {row.label: c for row, c in zip(summary.published, PALETTE, strict=False)}
    job_id = _e(_map(body.get("job")).get("id"))
    sections = [
        _section("roc", "ROC curves (test split)", _roc(summary, colors)),
        _section(
            "calibration", "Calibration (reliability diagrams)", _calibration(summary, colors)
        ),
        _section("training", "Training curve", _training(summary.training)),
        _section("metrics", "Metrics per label", _metrics_table(summary, colors)),
        _section("subgroups", "Subgroups", _subgroup_table(summary)),
        _section("receipt", "Receipt", _receipt(receipt, body, settlement)),
        _section("settlement", "Settlement", _settlement(settlement, body)),
        _section("verification", "Verification", _checks(checks)),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>Rapha results: job {job_id}</title>",
            f"<style>{_CSS}</style></head><body>",
            _header(summary, body, job_id, checks),
            "<main>",
            *sections,
            f'<p class="note">Made by <span class="mono">rapha job report</span> from '
            f'<span class="mono">{_e(source)}</span>. This page is self-contained: it loads '
            "nothing and runs no script.</p>",
            "</main></body></html>",
        ]
    )


# --- small helpers -------------------------------------------------------------------------


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _e(value: object, limit: int = _MAX_TEXT) -> str:
    """Escaped text; ``None`` is n/a, anything too long is cut with an ellipsis."""
    if value is None:
        return NA
    text = value if isinstance(value, str) else str(value)
    return escape(text if len(text) <= limit else text[: limit - 1] + "…", quote=True)


def _f(value: float | None, digits: int = 3) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _ci(low: float | None, high: float | None) -> str:
    return NA if low is None or high is None else f"{low:.3f}{DASH}{high:.3f}"


def _units(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _UNITS.fullmatch(value):
        return int(value)
    return None


def _usdc(units: int | None) -> str:
    if units is None:
        return NA
    amount = Decimal(units).scaleb(-USDC_DECIMALS)
    return f"{amount:.{USDC_DECIMALS}f} USDC ({units} base units)"


def _section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{content}\n</section>'


def _na(reason: str) -> str:
    return f'<p class="na">Not available: {escape(reason)}</p>'


def _table(head: Sequence[str], rows: Iterable[str], total: int) -> str:
    shown = list(rows)
    more = total - len(shown)
    extra = f'<p class="note">{more} more rows not shown.</p>' if more > 0 else ""
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(shown)}</tbody></table>{extra}"


def _pairs(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="pairs"><tbody>{cells}</tbody></table>'


def _mono(value: object) -> str:
    return f'<span class="mono">{_e(value)}</span>' if value is not None else NA


def _swatch(color: str | None) -> str:
    return f'<span class="swatch" style="background:{color}"></span>' if color else ""


def _legend_name(label: str, limit: int = 40) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


# --- header and charts ---------------------------------------------------------------------


def _header(
    summary: MetricsSummary, body: Mapping[str, Any], job_id: str, checks: Sequence[Check] | None
) -> str:
    overall = summary.overall
    cards = [
        ("kind", _e(summary.kind or _map(body.get("job")).get("kind"))),
        ("test records", _e(summary.n)),
        ("k (smallest published count)", _e(summary.k)),
        ("macro AUROC", _f(overall.auroc) if overall else NA),
        ("95% CI", _ci(overall.ci_low, overall.ci_high) if overall else NA),
        ("verification", _verdict(checks)),
    ]
    html_cards = "".join(f'<div class="card">{escape(k)}<b>{v}</b></div>' for k, v in cards)
    return (
        f'<header><h1>Results of job <span class="mono">{job_id}</span></h1>'
        f"<div>Computed by the hospital's node on its test split; the images never left "
        f'the hospital.</div><div class="cards">{html_cards}</div></header>'
    )


def _verdict(checks: Sequence[Check] | None) -> str:
    if checks is None:
        return "not run"
    bad = sum(c.ok is False for c in checks)
    return f"{bad} of {len(checks)} failed" if bad else f"{len(checks)} checks passed or skipped"


def _roc(summary: MetricsSummary, colors: Mapping[str, str]) -> str:
    drawn = [row for row in summary.published if row.label in colors and len(row.roc) >= 2]
    if not drawn:
        return _na("no published label has a ROC curve") + _withheld(summary)
    series = [
        Series(
            label=row.label,
            legend=f"{_legend_name(row.label)}: AUROC {_f(row.auroc)} "
            f"(95% CI {_ci(row.ci_low, row.ci_high)})",
            color=colors[row.label],
            segments=(row.roc,),
        )
        for row in drawn
    ]
    chart = line_chart(
        chart_id="chart-roc",
        kind="roc",
        title="ROC curves on the test split",
        x=Axis(f"false positive rate (1 {_MINUS} specificity)", 0.0, 1.0, _UNIT_TICKS),
        y=Axis("true positive rate (sensitivity)", 0.0, 1.0, _UNIT_TICKS),
        series=series,
        width=620,
        height=440,
        diagonal="chance (AUROC 0.5)",
    )
    return chart + _not_drawn(summary, drawn) + _withheld(summary)


def _not_drawn(summary: MetricsSummary, drawn: Sequence[LabelRow]) -> str:
    missing = sum(row not in drawn for row in summary.published)
    if not missing:
        return ""
    return (
        f'<p class="note">{missing} published labels are not drawn (no curve, or beyond '
        f"{len(PALETTE)} labels); their figures are in the table.</p>"
    )


def _withheld(summary: MetricsSummary) -> str:
    names = [row.label for row in summary.labels if row.status is Status.WITHHELD]
    if not names:
        return ""
    shown = ", ".join(_e(n, 60) for n in names[:20])
    return f'<p class="note">Withheld (fewer than k positives or negatives): {shown}.</p>'


def _calibration(summary: MetricsSummary, colors: Mapping[str, str]) -> str:
    drawn = [row for row in summary.published if row.label in colors and row.calibration]
    if not drawn:
        return _na("no published label has calibration bins")
    charts = "".join(_reliability(i, row, colors[row.label]) for i, row in enumerate(drawn))
    note = (
        '<p class="note">10 equal-width bins of the predicted probability. Grey bands are '
        "suppressed bins: fewer than k records, or hidden so that such a bin cannot be worked "
        "out. Their values are unknown, not zero.</p>"
    )
    return f'<div class="charts">{charts}</div>{note}{_not_drawn(summary, drawn)}'


def _reliability(index: int, row: LabelRow, color: str) -> str:
    """One label's reliability diagram; a suppressed or empty bin breaks the line."""
    segments: list[tuple[tuple[float, float], ...]] = []
    current: list[tuple[float, float]] = []
    bands = []
    for b in row.calibration:
        if b.mean_predicted is not None and b.observed is not None and not b.suppressed:
            current.append((b.mean_predicted, b.observed))
            continue
        if current:
            segments.append(tuple(current))
            current = []
        if b.suppressed and b.low is not None and b.high is not None:
            where = f"bin {b.low:.1f}{DASH}{b.high:.1f}: suppressed"
            bands.append(Band(b.low, b.high, "suppressed", where))
    if current:
        segments.append(tuple(current))
    name = _legend_name(row.label, 26)
    return line_chart(
        chart_id=f"chart-calibration-{index}",
        kind="calibration",
        title=f"Calibration: {name}",
        x=Axis("mean predicted probability", 0.0, 1.0, _UNIT_TICKS),
        y=Axis("observed frequency", 0.0, 1.0, _UNIT_TICKS),
        series=[
            Series(row.label, f"{name}: ECE {_f(row.ece)}", color, tuple(segments), markers=True)
        ],
        width=340,
        height=300,
        diagonal="perfect calibration",
        bands=bands,
    )


def _training(points: Sequence[TrainingPoint] | None) -> str:
    if points is None:
        return _na("this job trained nothing (an evaluate job scores submitted weights)")
    with_loss = [p for p in points if p.loss is not None]
    if not with_loss:
        return _na("the training run reported no loss")
    by_step = all(p.step is not None for p in with_loss)
    by_epoch = not by_step and all(p.epoch is not None for p in with_loss)
    xs = [
        float(p.step) if by_step and p.step is not None
        else float(p.epoch) if by_epoch and p.epoch is not None
        else float(i)
        for i, p in enumerate(with_loss)
    ]  # fmt: skip
    ys = [p.loss for p in with_loss if p.loss is not None]
    verticals = [
        (x, f"epoch {p.epoch}")
        for i, (x, p) in enumerate(zip(xs, with_loss, strict=True))
        if p.epoch is not None and (i == 0 or with_loss[i - 1].epoch != p.epoch)
    ]
    stride = max(1, -(-len(verticals) // _MAX_VERTICALS))
    last = with_loss[-1]
    total = f" ({last.epochs} epochs, {last.steps} steps)" if last.epochs and last.steps else ""
    if by_epoch:
        total = f" (last loss of each epoch, {last.epochs} epochs)" if last.epochs else ""
        verticals = []
    return line_chart(
        chart_id="chart-training",
        kind="training",
        title=f"Training loss as the run reported it{total}",
        x=nice_axis(
            "step" if by_step else "epoch" if by_epoch else "progress event", min(xs), max(xs)
        ),
        y=nice_axis("loss", min(ys), max(ys)),
        series=[
            Series(
                "loss",
                "loss reported by the training loop (at most one event a second; numbers only)",
                PALETTE[0],
                (tuple(zip(xs, ys, strict=True)),),
            )
        ],
        width=900,
        height=320,
        verticals=verticals[::stride],
    )


# --- tables --------------------------------------------------------------------------------


def _metrics_table(summary: MetricsSummary, colors: Mapping[str, str]) -> str:
    if not summary.labels:
        return _na("metrics.json names no labels")
    head = [
        "label",
        "positives",
        "negatives",
        "AUROC",
        "95% CI",
        "sensitivity",
        "specificity",
        "ECE",
        "threshold",
        "status",
    ]
    rows = []
    for row in summary.labels[:_MAX_ROWS]:
        name = f"{_swatch(colors.get(row.label))}{_e(row.label)}"
        if row.status is Status.WITHHELD:
            rows.append(
                f'<tr data-label="{_e(row.label)}"><td>{name}</td>'
                '<td class="withheld" colspan="8">withheld: fewer than k positives or '
                "k negatives on the test split</td><td>withheld</td></tr>"
            )
            continue
        values = [
            _e(row.n_pos),
            _e(row.n_neg),
            _f(row.auroc),
            _ci(row.ci_low, row.ci_high),
            _f(row.sensitivity),
            _f(row.specificity),
            _f(row.ece),
            _f(row.threshold, 4),
        ]
        cells = "".join(f'<td class="num">{v}</td>' for v in values)
        rows.append(
            f'<tr data-label="{_e(row.label)}"><td>{name}</td>{cells}<td>published</td></tr>'
        )
    o = summary.overall
    if o is not None:
        values = [
            "",
            "",
            _f(o.auroc),
            _ci(o.ci_low, o.ci_high),
            _f(o.sensitivity),
            _f(o.specificity),
            _f(o.ece),
            "",
        ]
        cells = "".join(f'<td class="num">{v}</td>' for v in values)
        over = ", ".join(_e(n, 40) for n in o.labels[:20]) or NA
        rows.append(f'<tr class="overall"><td><b>macro mean</b> ({over})</td>{cells}<td></td></tr>')
    note = (
        '<p class="note">AUROC with its 95% percentile-bootstrap CI on the test records; '
        "sensitivity and specificity at the threshold chosen on validation (Youden's J); "
        "ECE over 10 bins. The macro mean averages the published labels only.</p>"
    )
    return _table(head, rows, len(summary.labels) + (o is not None)) + note


def _subgroup_table(summary: MetricsSummary) -> str:
    if not summary.subgroups:
        return _na("metrics.json has no subgroups")
    names = [row.label for row in summary.labels][:12]
    head = ["field", "cell", "n", *(f"AUROC {_legend_name(n)}" for n in names)]
    rows = []
    for sg in summary.subgroups[:_MAX_ROWS]:
        key = f'data-field="{_e(sg.field)}" data-cell="{_e(sg.cell)}"'
        start = f"<tr {key}><td>{_e(sg.field)}</td><td>{_e(sg.cell)}</td>"
        if sg.status is Status.SUPPRESSED:
            rows.append(
                f'{start}<td class="num suppressed">suppressed</td>'
                f'<td class="suppressed" colspan="{max(1, len(names))}">suppressed'
                "</td></tr>"
            )
            continue
        by_name = {m.label: m for m in sg.labels}
        cells = []
        for name in names:
            m = by_name[name]
            if m.status is not Status.PUBLISHED:
                cells.append('<td class="num withheld">withheld</td>')
            elif m.auroc is None:
                cells.append(f'<td class="num na">{NA}</td>')
            else:
                cells.append(
                    f'<td class="num">{_f(m.auroc)}<br><span class="note">'
                    f"{_ci(m.ci_low, m.ci_high)}</span></td>"
                )
        rows.append(f'{start}<td class="num">{_e(sg.n)}</td>{"".join(cells)}</tr>')
    notes = [_SUPPRESSED_NOTE.format(k=_e(summary.k))]
    if summary.withheld_fields:
        fields = ", ".join(_e(f, 60) for f in summary.withheld_fields[:20])
        notes.append(f"Every cell suppressed (field withheld): {fields}.")
    return _table(head, rows, len(summary.subgroups)) + "".join(
        f'<p class="note">{n}</p>' for n in notes
    )


def _receipt(
    receipt: Mapping[str, Any], body: Mapping[str, Any], settlement: Mapping[str, Any] | None
) -> str:
    job, terms = _map(body.get("job")), _map(body.get("settlement"))
    budget, due = _units(terms.get("budget")), _units(terms.get("amount_due"))
    refund = budget - due if budget is not None and due is not None and budget >= due else None
    dp = _map(body.get("dp"))
    signer = _map(_map(receipt.get("signatures")).get("settlement")).get("address")
    rows = [
        ("job id", _mono(job.get("id"))),
        ("kind", _e(job.get("kind"))),
        ("vault job id", _mono(job.get("chain_job_id"))),
        ("bundle digest", _mono(body.get("bundle_digest"))),
        ("view digest", _mono(body.get("view_digest"))),
        ("records counted", _e(body.get("records"))),
        ("price per record", _usdc(_units(terms.get("price_per_record")))),
        ("budget", _usdc(budget)),
        ("amount due", _usdc(due)),
        ("hospital / treasury split", _split(due, _map(settlement).get("hospital_share_bps"))),
        ("refund to the payer", _usdc(refund)),
        ("hospital id", _mono(terms.get("hospital_id"))),
        ("payout address", _mono(terms.get("payout"))),
        ("hospital settlement signer", _mono(signer)),
        ("chain id", _e(terms.get("chain_id"))),
        ("vault", _mono(terms.get("vault"))),
        ("token", _mono(terms.get("token"))),
        ("receipt hash", _mono(receipt.get("receipt_hash"))),
        ("node id", _mono(body.get("node_id"))),
        ("hub id", _mono(body.get("hub_id"))),
        ("started", _e(_map(body.get("times")).get("started"))),
        ("finished", _e(_map(body.get("times")).get("finished"))),
        (
            "differential privacy",
            f"ε = {_e(dp.get('epsilon'))}, δ = {_e(dp.get('delta'))}" if dp else "not used",
        ),
        ("attestation verdict", _e(_map(body.get("attestation")).get("verdict"))),
        ("audit-log head", _mono(body.get("audit_head"))),
    ]
    files = body.get("outbox")
    entries = [_map(f) for f in files] if isinstance(files, list) else []
    file_rows = [
        f'<tr><td>{_mono(f.get("name"))}</td><td class="num">{_e(f.get("size"))}</td>'
        f"<td>{_mono(f.get('sha256'))}</td></tr>"
        for f in entries[:_MAX_ROWS]
    ]
    return (
        '<p class="note">As receipt.json states it; the Verification section says whether '
        "its signatures, files and on-chain record check out.</p>"
        + _pairs(rows)
        + "<h3>Outbox files</h3>"
        + _table(["file", "bytes", "SHA-256"], file_rows, len(entries))
    )


def _split(due: int | None, bps: object) -> str:
    share = _units(bps)
    if due is None or share is None or share > 10_000:
        return f'<span class="na">{NA}: the vault sets it; pass --rpc URL to read it</span>'
    hospital = due * share // 10_000
    return (
        f"hospital {_usdc(hospital)} ({share / 100:g}%), "
        f"treasury {_usdc(due - hospital)} ({100 - share / 100:g}%)"
    )


def _settlement(settlement: Mapping[str, Any] | None, body: Mapping[str, Any]) -> str:
    if settlement is None:
        return _na("pass --tx HASH or --rpc URL to `rapha job report` to show the settlement")
    chain_id = settlement.get("chain_id", _map(body.get("settlement")).get("chain_id"))
    rows = [
        ("transaction", _mono(settlement.get("tx_hash"))),
        ("block", _e(settlement.get("block"))),
        ("chain id", _e(chain_id)),
    ]
    balances = settlement.get("balances")
    entries = [_map(b) for b in balances] if isinstance(balances, list) else []
    balance_rows = []
    for entry in entries[:_MAX_ROWS]:
        before, after = _units(entry.get("before")), _units(entry.get("after"))
        change = NA
        if before is not None and after is not None:
            change = f"{'+' if after >= before else _MINUS}{_usdc(abs(after - before))}"
        balance_rows.append(
            f"<tr><td>{_e(entry.get('who'))}</td><td>{_mono(entry.get('address'))}</td>"
            f'<td class="num">{_usdc(before)}</td><td class="num">{_usdc(after)}</td>'
            f'<td class="num">{change}</td></tr>'
        )
    table = (
        "<h3>Token balances</h3>"
        + _table(["who", "address", "before", "after", "change"], balance_rows, len(entries))
        if entries
        else ""
    )
    return _pairs(rows) + table


def _checks(checks: Sequence[Check] | None) -> str:
    if checks is None:
        return _na("no checks were run; `rapha job verify DIR` runs them")
    marks = {True: ("ok", "ok"), False: ("failed", "failed"), None: ("notrun", "not run")}
    rows = []
    for c in checks[:_MAX_ROWS]:
        css, word = marks[c.ok]
        rows.append(
            f'<tr data-check="{_e(c.name)}"><td>{_e(c.name)}</td><td class="{css}">{word}</td>'
            f"<td>{_e(c.detail, 400)}</td></tr>"
        )
    return _table(["check", "result", "detail"], rows, len(checks))
