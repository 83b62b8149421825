"""``rapha job dry-run``: the exact node pipeline, locally, before anyone pays.

Companies debug their bundle on a synthetic hospital (``--synthetic``); hospitals test a
bundle on a view they built (``--view``). The run verifies the bundle, trains it in the
sandbox (train jobs), predicts in the sandbox, evaluates on the node side and applies the
output guard, exactly as :func:`rapha.node.job.run_job` does on a node. What would leave
the hospital is written under ``OUT/outbox/`` and nothing else is written there; the
synthetic archive, the view, the node's keys and its audit log go to ``OUT/work/``.

Errors raised inside the sandbox are shown in full here (a production node reports only
the error class and code). A rejected run exits non-zero (7 policy, 8 sandbox) and prints
the guard's or the admission policy's reasons.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rapha import crypto
from rapha.audit import AuditLog
from rapha.cli._app import err_console
from rapha.errors import UsageError
from rapha.node.synthetic import PreparedView, cohort_needles, prepare_synthetic_view
from rapha.runtime.bundle import verify_bundle
from rapha.runtime.manifest import load_manifest
from rapha.runtime.progress import ProgressEvent

if TYPE_CHECKING:
    from rapha.node.job import JobOutcome

__all__ = ["dry_run"]

console = Console()
_DEFAULT_STUDIES = 2000


class _Live:
    """Rich progress on stderr: the current phase, and epochs/steps while training."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=err_console,
        )
        self.task = self.progress.add_task("starting", total=None, note="")

    def phase(self, name: str) -> None:
        self.progress.reset(self.task, total=None, description=name, note="")

    def build(self, what: str, done: int, total: int) -> None:
        label = "writing the synthetic archive" if what == "archive" else "building the view"
        self.progress.update(self.task, description=label, total=total, completed=done, note="")

    def event(self, event: ProgressEvent) -> None:
        note = f"epoch {event.epoch}/{event.epochs}"
        if event.loss is not None:
            note += f" · loss {event.loss:g}"
        self.progress.update(
            self.task, description="train", total=event.steps, completed=event.step, note=note
        )


def dry_run(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory or .tar to run.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the results (new or empty).")],
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="Run on a freshly generated synthetic hospital.")
    ] = False,
    view: Annotated[
        Path | None, typer.Option("--view", help="Run on this view (built by a node).")
    ] = None,
    private: Annotated[
        Path | None,
        typer.Option(
            "--private", help="The view's private dir (test labels); default VIEW.private"
        ),
    ] = None,
    needles: Annotated[
        Path | None,
        typer.Option("--needles", help="With --view: file of extra identifiers to scan for."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Public key the bundle must be signed by (else any signer)."),
    ] = None,
    studies: Annotated[int, typer.Option(help="Studies in the synthetic archive.")] = (
        _DEFAULT_STUDIES
    ),
    seed: Annotated[int, typer.Option(help="Seed of the synthetic archive.")] = 1,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A node's node.toml: use its [policy], [sandbox] and audit log, as that "
            "hospital's node would.",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Wall-clock limit per sandbox step, seconds.")
    ] = None,
    bwrap: Annotated[
        Path | None, typer.Option(help="The bubblewrap binary (default: [sandbox] bwrap).")
    ] = None,
    dp_epsilon: Annotated[
        float | None, typer.Option(help="Demand DP-SGD at this epsilon (as a hospital would).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run BUNDLE through the node pipeline: verify, train, predict, evaluate, guard."""
    from rapha.node.job import (  # they load torch: only when a dry-run runs
        JobError,
        JobRules,
        run_job,
        sandbox_from_settings,
    )
    from rapha.node.quota import EvaluationQuota
    from rapha.node.settings import SandboxSettings, load_node_settings

    if synthetic == (view is not None):
        raise UsageError("give exactly one of --synthetic or --view VIEWDIR")
    out = out.absolute()
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty; choose a new --out directory")
    work = out / "work"
    work.mkdir(parents=True)
    live = _Live()
    job_id = f"dry-run-{secrets.token_hex(4)}"
    settings = load_node_settings(config) if config is not None else None
    sandbox_settings = settings.sandbox if settings is not None else SandboxSettings()
    overrides: dict[str, Any] = {"wall_seconds": timeout} if timeout is not None else {}
    if bwrap is not None:
        sandbox_settings = sandbox_settings.model_copy(update={"bwrap": bwrap})
    sandbox = sandbox_from_settings(sandbox_settings, **overrides)
    sandbox.ensure_available()  # refuse before any work when there is no sandbox
    trusted = [crypto.load_public_key(key)] if key is not None else None
    dp: dict[str, Any] = {"dp_required": True, "dp_epsilon": dp_epsilon} if dp_epsilon else {}
    rules = (
        JobRules.from_settings(settings.policy, **dp) if settings is not None else JobRules(**dp)
    )
    quota = None
    if settings is not None:  # the hospital's own dry-run goes into its audit log
        audit = AuditLog(settings.audit_log, settings.keys.load().signing_key)
        if settings.policy.evaluation_quota > 0:
            quota = EvaluationQuota(settings.state_dir, limit=settings.policy.evaluation_quota)
    else:
        audit = AuditLog.create(work / "audit.jsonl", crypto.generate_private_key())
    with live.progress:
        live.phase("verify")
        verified = verify_bundle(bundle, trusted_keys=trusted, workdir=work / "bundle")
        prepared = _view(
            verified.root, work, synthetic, view, private, needles, studies, seed, job_id, live
        )
        try:
            outcome = run_job(
                verified,
                job_id=job_id,
                org="dry-run",
                view=prepared.view,
                private_dir=prepared.private_dir,
                needles=prepared.needles,
                sandbox=sandbox,
                workdir=work / "job",
                outbox=out / "outbox",
                audit=audit,
                signer_pinned=True,
                rules=rules,
                quota=quota,
                on_phase=live.phase,
                on_event=live.event,
            )
        except JobError as exc:
            live.progress.stop()
            err_console.print(f"[bold red]{exc.code}[/]: the sandbox's stderr follows")
            err_console.print(escape(exc.detail or "(nothing on stderr)"), highlight=False)
            raise
    _report(outcome, out, as_json=as_json)


def _view(
    bundle_root: Path,
    work: Path,
    synthetic: bool,
    view: Path | None,
    private: Path | None,
    needles_file: Path | None,
    studies: int,
    seed: int,
    job_id: str,
    live: _Live,
) -> PreparedView | _GivenView:
    if synthetic:
        manifest = load_manifest(bundle_root / "bundle.toml")
        return prepare_synthetic_view(
            work / "synthetic",
            studies=studies,
            seed=seed,
            size=manifest.input.size,
            job_id=job_id,
            progress=live.build,
        )
    assert view is not None
    view = view.absolute()
    private_dir = (private or view.with_name(view.name + ".private")).absolute()
    found = [
        json.loads(line)["record_id"]
        for s in ("train", "val", "test")
        for line in (view / s / "records.jsonl").read_text().splitlines()
    ]
    if needles_file is not None:
        crypto.check_private_file(needles_file)
        found += [n.strip() for n in needles_file.read_text().splitlines() if n.strip()]
    return _GivenView(view, private_dir, cohort_needles(found))


class _GivenView:
    def __init__(self, view: Path, private_dir: Path, needles: tuple[str, ...]) -> None:
        self.view = view
        self.private_dir = private_dir
        self.needles = needles


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _report(outcome: JobOutcome, out: Path, *, as_json: bool) -> None:
    metrics = outcome.metrics
    if as_json:
        files = [
            {"name": f.name, "size": f.size, "sha256": f.sha256} for f in outcome.decision.files
        ]
        typer.echo(
            json.dumps(
                {
                    "outbox": str(outcome.outbox),
                    "files": files,
                    "metrics": metrics,
                    "records_billed": outcome.records_billed,
                },
                indent=2,
            )
        )
        return
    table = Table(title="metrics on the test split (computed by the node)")
    for column in ("label", "AUROC", "95% CI", "sensitivity", "specificity", "ECE", "n"):
        table.add_column(column)
    for name, row in {**metrics.get("labels", {}), "overall": metrics.get("overall", {})}.items():
        ci = row.get("auroc_ci")
        pair = isinstance(ci, list) and len(ci) == 2
        ci_text = f"{_fmt(ci[0])} to {_fmt(ci[1])}" if pair else "—"
        table.add_row(
            name,
            _fmt(row.get("auroc")),
            ci_text,
            _fmt(row.get("sensitivity")),
            _fmt(row.get("specificity")),
            _fmt(row.get("ece")),
            _fmt(row.get("n")),
        )
    console.print(table)
    if outcome.dp is not None:
        console.print(f"DP-SGD: ε = {outcome.dp.epsilon:.3f} at δ = {outcome.dp.delta:g}")
    console.print(f"records billed: {outcome.records_billed}")
    console.print("[green]guard: allowed[/]; what would leave the hospital:")
    for f in outcome.decision.files:
        console.print(f"  {f.name}  {f.size} bytes  sha256 {f.sha256}", highlight=False)
    console.print(f"outbox: {out / 'outbox'}", soft_wrap=True)
