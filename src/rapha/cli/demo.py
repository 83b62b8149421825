"""``rapha demo``: the one-machine demo and its synthetic hospital archive.

``rapha demo [--workdir DIR] [--studies N] [--seed S] [--keep-running] [--no-orthanc] [--no-tpm]``
    the whole flow on this machine (:mod:`rapha.demo.flow`): two hospitals, the embedded
    chain, the hub and two node agents, one AI company's job end to end; prints the
    summary and writes ``DIR/summary.json`` and ``DIR/report.html`` (default
    ``./rapha-demo``). Ctrl-C stops every process it started.
``rapha demo archive --out DIR --studies N --seed S [--hospital NAME]``
    writes just the archive (DICOM files, ``labels.csv``, ``truth.json``) to ``DIR``.

Both refuse a non-empty directory unless it holds a previous demo archive, which they
replace. Exit codes are those of :class:`rapha.errors.ExitCode`.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydicom.uid import UID
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rapha.cli._app import EXIT_CODES_HELP, new_app
from rapha.demo.flow import DEFAULT_STUDIES as DEMO_STUDIES
from rapha.demo.flow import MIN_STUDIES
from rapha.errors import DependencyError

if TYPE_CHECKING:
    from rapha.demo import ArchiveSummary

__all__ = ["app"]

DEFAULT_STUDIES = 60
DEFAULT_SEED = 1
DEFAULT_HOSPITAL = "Rapha General Hospital"

console = Console()
_stderr = Console(stderr=True)

app = new_app(
    "The one-machine demo: a synthetic hospital archive, then the whole flow.",
    epilog=EXIT_CODES_HELP,
    invoke_without_command=True,
    no_args_is_help=False,
)

StudiesOption = Annotated[
    int, typer.Option("--studies", min=1, max=100_000, help="Number of studies to generate.")
]
SeedOption = Annotated[
    int,
    typer.Option("--seed", min=0, help="Random seed; the same seed gives identical files."),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the summary as JSON on stdout instead of tables.")
]


@app.callback()
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Where the demo keeps everything it makes.")
    ] = Path("rapha-demo"),
    studies: Annotated[
        int,
        typer.Option(
            "--studies",
            min=MIN_STUDIES,
            max=20_000,
            help="Studies in each hospital's synthetic archive.",
        ),
    ] = DEMO_STUDIES,
    seed: SeedOption = DEFAULT_SEED,
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running",
            help="Leave the hub and both nodes running after the summary, until Ctrl-C.",
        ),
    ] = False,
    orthanc: Annotated[
        bool,
        typer.Option(
            "--orthanc/--no-orthanc",
            help="Serve the second hospital from Orthanc when it is installed.",
        ),
    ] = True,
    tpm: Annotated[
        bool,
        typer.Option(
            "--tpm/--no-tpm", help="Attest with a software TPM (swtpm) when installed, else dev."
        ),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Run the whole flow on this machine: two hospitals, the hub, the chain, one job.

    Prints the summary and writes WORKDIR/summary.json and WORKDIR/report.html.
    """
    if ctx.invoked_subcommand is not None:
        return
    from rapha.cli._demo_ui import RichUI, render_summary
    from rapha.demo.flow import Demo, DemoOptions, interrupts_as_keyboard

    ui = RichUI(_stderr, quiet=as_json)
    options = DemoOptions(workdir=workdir, studies=studies, seed=seed, orthanc=orthanc, tpm=tpm)
    with interrupts_as_keyboard(), ui, Demo(options, ui=ui) as run:
        try:
            summary = run.run()
        except KeyboardInterrupt:
            ui.stop()
            _stderr.print("[yellow]interrupted[/]: stopping every process the demo started …")
            raise typer.Exit(130) from None
        ui.stop()
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
        else:
            render_summary(summary, console)
        if keep_running:
            assert run.hub is not None
            console.print(f"the hub stays at {run.hub.url}; both nodes keep polling it. "
                          "Ctrl-C stops everything.", highlight=False)  # fmt: skip
            try:
                while all(c.running for c in run.children):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            _stderr.print("stopping every process the demo started …")


@app.command("archive")
def archive(
    out: Annotated[
        Path, typer.Option("--out", help="Directory to write (new, empty, or an old archive).")
    ],
    studies: StudiesOption = DEFAULT_STUDIES,
    seed: SeedOption = DEFAULT_SEED,
    hospital: Annotated[
        str, typer.Option("--hospital", help="Institution Name written into every file.")
    ] = DEFAULT_HOSPITAL,
    min_size: Annotated[
        int, typer.Option("--min-size", help="Smallest longer image side, in pixels.")
    ] = 256,
    max_size: Annotated[
        int, typer.Option("--max-size", help="Largest longer image side, in pixels.")
    ] = 512,
    as_json: JsonOption = False,
) -> None:
    """Write a synthetic PACS export: DICOM files with planted PHI, labels.csv, truth.json."""
    summary = _generate(
        out,
        studies=studies,
        seed=seed,
        hospital=hospital,
        size_range=(min_size, max_size),
        quiet=as_json,
    )
    _report(summary, as_json=as_json)


def _generate(
    out: Path,
    *,
    studies: int,
    seed: int,
    hospital: str,
    size_range: tuple[int, int],
    quiet: bool,
) -> ArchiveSummary:
    # Imported here so that ``rapha`` works without the node extra the demo needs (Pillow
    # for burned-in text); only the demo itself then reports what is missing.
    try:
        from rapha.demo import generate_archive
    except ImportError as exc:
        raise DependencyError(
            f"the demo needs the node extra ({exc.name or 'a module'} is missing); "
            "install it with: pip install 'rapha[node]'"
        ) from exc
    progress = Progress(
        TextColumn("[bold]generating studies"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_stderr,
        transient=True,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("studies", total=studies)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return generate_archive(
            out,
            studies=studies,
            seed=seed,
            hospital=hospital,
            size_range=size_range,
            progress=advance,
        )


def _label_counts(labels_csv: Path) -> dict[str, dict[str, int]]:
    """Per finding column: rows, positives, negatives, uncertain (-1) and missing cells."""
    with labels_csv.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        findings = [name for name in reader.fieldnames or () if name != "AccessionNumber"]
        rows = list(reader)
    counts: dict[str, dict[str, int]] = {}
    for name in findings:
        cells = [row[name] for row in rows]
        counts[name] = {
            "rows": len(cells),
            "positive": cells.count("1"),
            "negative": cells.count("0"),
            "uncertain": cells.count("-1"),
            "missing": cells.count(""),
        }
    return counts


def _report(summary: ArchiveSummary, *, as_json: bool) -> None:
    labels = _label_counts(summary.labels_csv)
    if as_json:
        data: dict[str, Any] = {
            "out": str(summary.out),
            "labels_csv": str(summary.labels_csv),
            "truth_json": str(summary.truth_json),
            "studies": summary.studies,
            "files": summary.files,
            "corrupt_files": summary.corrupt_files,
            "burned_in_studies": summary.burned_in_studies,
            "by_modality": dict(summary.by_modality),
            "by_transfer_syntax": dict(summary.by_transfer_syntax),
            "labels": labels,
        }
        typer.echo(json.dumps(data, indent=2))
        return

    console.print(
        f"[bold green]Wrote a synthetic archive[/] of {summary.studies} studies, "
        f"{summary.files} files ({summary.corrupt_files} deliberately corrupt, "
        f"{summary.burned_in_studies} studies with burned-in names)."
    )
    files = Table(title="Readable files")
    files.add_column("Modality")
    files.add_column("Files", justify="right")
    for modality, count in summary.by_modality.items():
        files.add_row(modality, str(count))
    syntaxes = Table(title="Transfer syntaxes")
    syntaxes.add_column("Transfer syntax")
    syntaxes.add_column("Files", justify="right")
    for uid, count in summary.by_transfer_syntax.items():
        syntaxes.add_row(f"{UID(uid).name} ({uid})", str(count))
    findings = Table(title="Labels (chest radiograph studies)")
    for column in ("Finding", "Positive", "Negative", "Uncertain (-1)", "Missing"):
        findings.add_column(column, justify="left" if column == "Finding" else "right")
    for name, c in labels.items():
        share = f"{c['positive']} ({100 * c['positive'] / max(c['rows'], 1):.0f} %)"
        findings.add_row(name, share, str(c["negative"]), str(c["uncertain"]), str(c["missing"]))
    console.print(files, syntaxes, findings)
    # soft_wrap: a path is never folded mid-name, so it can be copied from the terminal.
    console.print(f"DICOM files:  {summary.out / 'dicom'}", soft_wrap=True)
    console.print(f"labels CSV:   {summary.labels_csv}", soft_wrap=True)
    console.print(
        f"truth JSON:   {summary.truth_json}  (what was planted; for tests only)", soft_wrap=True
    )
