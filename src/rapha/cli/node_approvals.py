"""``rapha node approvals …``: a person decides on each job before the node runs it.

Used when ``[hub] approvals = true`` in ``node.toml``: the node agent puts every job it
claims up for approval (:class:`rapha.node.approvals.ApprovalStore`) and runs it only
once approved. ``list`` shows the waiting jobs, ``show`` everything a job would do,
``approve`` and ``reject`` decide (final; each decision is written to the audit log).
Errors exit with the codes of :class:`rapha.errors.ExitCode`: 2 for an unknown job id, a
job already decided or a missing ``--by``/``--reason``; 6 for a corrupt approval file.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rapha.audit import AuditLog
from rapha.cli._app import err_console, new_app
from rapha.errors import UsageError
from rapha.node.approvals import Approval, ApprovalStatus, ApprovalStore
from rapha.node.settings import NodeSettings, load_node_settings

__all__ = ["app"]

console = Console()

app = new_app(
    "Manual approvals: see what each job would do, then approve or reject it before it runs."
)

#: USDC, the token prices are paid in, has 6 decimals: 1 USDC = 10**6 base units.
_USDC_DECIMALS: Final = 6
_KNOWN_FIELDS: Final = (
    "org",
    "kind",
    "bundle_digest",
    "signer_fingerprint",
    "signer_pinned",
    "model",
    "hparams",
    "outputs",
    "dp",
    "price_per_record",
    "records",
    "requirements",
)
_STATUS_STYLE: Final = {
    ApprovalStatus.PENDING: "bold yellow",
    ApprovalStatus.APPROVED: "bold green",
    ApprovalStatus.REJECTED: "bold red",
}

ConfigOption = Annotated[
    Path, typer.Option("--config", help="The node's node.toml (written by rapha node init).")
]
JobIdArgument = Annotated[
    str, typer.Argument(help="The hub's job id, as `rapha node approvals list` shows it.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the record(s) as JSON.")]
ByOption = Annotated[
    str, typer.Option("--by", help="Who decides: your name, as the audit log should record it.")
]


def _store(settings: NodeSettings) -> ApprovalStore:
    return ApprovalStore(settings.state_dir)


def _audit(settings: NodeSettings) -> AuditLog:
    return AuditLog(settings.audit_log, settings.keys.load().signing_key)


def _usdc(units: int) -> str:
    """``units`` token base units as USDC with all 6 decimals: ``2500`` → ``0.002500 USDC``."""
    whole, frac = divmod(units, 10**_USDC_DECIMALS)
    return f"{whole:,}.{frac:0{_USDC_DECIMALS}d} USDC"


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _clean(value: str) -> str:
    """``value`` with control characters replaced: company-chosen text must not drive the
    terminal (escape sequences) when shown."""
    return "".join(ch if ch.isprintable() else "\N{REPLACEMENT CHARACTER}" for ch in value)


def _value(value: Any) -> str:
    """A JSON value as one line: strings as they are, everything else as compact JSON."""
    if isinstance(value, str):
        return _clean(value)
    return _clean(json.dumps(value, sort_keys=True, separators=(", ", ": ")))


def _model(model: dict[str, Any]) -> str:
    name = model.get("name")
    return str(model["source"]) if name is None else f"{model['source']}: {_clean(str(name))}"


# --- list --------------------------------------------------------------------------------


@app.command("list")
def list_command(
    config: ConfigOption,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list jobs already approved or rejected.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List the jobs waiting for a decision (with --all: every job put up for approval)."""
    settings = load_node_settings(config)
    store = _store(settings)
    records = store.all() if show_all else store.pending()
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in records], sort_keys=True))
        return
    if settings.hub is None or not settings.hub.approvals:
        err_console.print(
            "[yellow]note:[/] approvals are off in this node.toml (\\[hub] approvals = true "
            "turns them on); the node does not wait for a decision",
            highlight=False,
        )
    if not records:
        what = "job has been put up for approval" if show_all else "job is waiting for approval"
        console.print(f"No {what}.", highlight=False)
        return
    table = Table(show_edge=False)
    # Only the company's name may fold: a folded id or price misreads.
    table.add_column("job", no_wrap=True)
    table.add_column("company", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("per record", justify="right", no_wrap=True)
    table.add_column("requested", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for r in records:
        request = r.request
        price = request["price_per_record"]
        table.add_row(
            Text(r.job_id),
            Text(_clean(request["org"])),
            Text(request["kind"]),
            Text(request["model"]["source"]),
            Text(f"{_usdc(price)}\n{price:,} units"),
            Text(r.requested_at.astimezone(UTC).strftime("%Y-%m-%d\n%H:%M UTC")),
            Text(r.status.value, style=_STATUS_STYLE[r.status]),
        )
    title = "approval records" if show_all else "waiting for approval"
    console.print(f"[bold]{title} ({len(records)})[/]", highlight=False)
    console.print(table)
    if not show_all:
        console.print(
            "Details: rapha node approvals show JOB_ID --config " + str(config),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


# --- show --------------------------------------------------------------------------------


def _line(label: str, value: str, *, style: str | None = None) -> None:
    text = Text(f"{label + ':':<22}")
    text.append(value, style=style)
    console.print(text, highlight=False, soft_wrap=True)


def _mapping(label: str, values: dict[str, Any]) -> None:
    if not values:
        _line(label, "(none)")
        return
    console.print(Text(f"{label}:"), highlight=False)
    for key in sorted(values):
        console.print(
            Text(f"  {_clean(key)} = {_value(values[key])}"), highlight=False, soft_wrap=True
        )


def _dp(dp: dict[str, Any] | None) -> str:
    if dp is None:
        return "off (no DP-SGD)"
    return "yes, DP-SGD: " + ", ".join(f"{_clean(k)} = {_value(v)}" for k, v in sorted(dp.items()))


def _print_record(record: Approval, config: Path) -> None:
    request = record.request
    price, records = request["price_per_record"], request["records"]
    console.print(
        Text.assemble(
            ("job ", "bold"),
            (record.job_id, "bold"),
            ": ",
            (record.status.value, _STATUS_STYLE[record.status]),
        ),
        highlight=False,
    )
    _line("requested", _time(record.requested_at))
    _line("company", _clean(request["org"]))
    _line("kind", request["kind"])
    _line("bundle digest", request["bundle_digest"])
    if request["signer_pinned"]:
        _line("signer", f"{request['signer_fingerprint']} (pinned by this hospital)")
    else:
        _line(
            "signer",
            f"{request['signer_fingerprint']} (NOT pinned by this hospital)",
            style="bold yellow",
        )
    model = request["model"]
    _line(
        "model",
        _model(model) + (" (the company's own code)" if model["source"] == "custom" else ""),
    )
    if model.get("kwargs"):
        _mapping("model arguments", model["kwargs"])
    _mapping("hyperparameters", request["hparams"])
    outputs = request["outputs"]
    _line("files that leave", ", ".join(_clean(o) for o in outputs) if outputs else "(none)")
    _line("differential privacy", _dp(request["dp"]))
    _line("price", f"{_usdc(price)} per record ({price:,} base units)")
    _line("records (estimated)", f"{records:,}")
    _line("total (estimated)", f"{_usdc(price * records)} ({price * records:,} base units)")
    _mapping("requirements", request["requirements"])
    extra = {k: v for k, v in request.items() if k not in _KNOWN_FIELDS}
    if extra:
        _mapping("also in the request", extra)
    if record.status is ApprovalStatus.PENDING:
        console.print(
            f"\nDecide with: rapha node approvals approve {record.job_id} --config {config} "
            "--by NAME [--note TEXT]\n"
            f"         or: rapha node approvals reject {record.job_id} --config {config} "
            "--by NAME --reason TEXT",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return
    _line(record.status.value, f"{_time(record.decided_at)} by {_clean(record.decided_by or '')}")
    if record.note:
        label = "reason" if record.status is ApprovalStatus.REJECTED else "note"
        _line(label, _clean(record.note.replace("\n", " / ")))


@app.command("show")
def show(config: ConfigOption, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Everything a job would do here, to read before deciding.

    Company, bundle signer (and whether you pinned its key), model, hyperparameters, the
    files that would leave, differential privacy, price and the estimated total.
    """
    store = _store(load_node_settings(config))
    record = store.get(job_id)
    if record is None:
        raise UsageError(
            f"no approval request for job {job_id}; `rapha node approvals list --all` shows "
            "the jobs this node has put up for approval"
        )
    if as_json:
        typer.echo(json.dumps(record.to_json(), sort_keys=True))
        return
    _print_record(record, config)


# --- approve, reject ---------------------------------------------------------------------


def _decided(record: Approval, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record.to_json(), sort_keys=True))
        return
    then = (
        "the node may now run it"
        if record.status is ApprovalStatus.APPROVED
        else "the node will not run it"
    )
    console.print(
        Text.assemble(
            f"job {record.job_id}: ",
            (record.status.value, _STATUS_STYLE[record.status]),
            f" by {_clean(record.decided_by or '')} at {_time(record.decided_at)}; {then}.",
        ),
        highlight=False,
        soft_wrap=True,
    )


@app.command("approve")
def approve(
    config: ConfigOption,
    job_id: JobIdArgument,
    by: ByOption,
    note: Annotated[
        str, typer.Option("--note", help="Optional note, kept with the decision (not logged).")
    ] = "",
    as_json: JsonOption = False,
) -> None:
    """Approve a waiting job: the node may run it. Final, and written to the audit log."""
    settings = load_node_settings(config)
    record = _store(settings).approve(job_id, by=by, note=note, audit=_audit(settings))
    _decided(record, as_json)


@app.command("reject")
def reject(
    config: ConfigOption,
    job_id: JobIdArgument,
    by: ByOption,
    reason: Annotated[
        str,
        typer.Option("--reason", help="Why the job may not run (kept with the decision)."),
    ],
    as_json: JsonOption = False,
) -> None:
    """Reject a waiting job: the node will not run it. Final, and written to the audit log."""
    settings = load_node_settings(config)
    record = _store(settings).reject(job_id, by=by, reason=reason, audit=_audit(settings))
    _decided(record, as_json)
