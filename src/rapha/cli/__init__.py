"""The ``rapha`` command: one sub-command group per persona (DESIGN.md, "The people")."""

from __future__ import annotations

from importlib.metadata import version
from typing import Annotated

import typer

from rapha.cli import demo, hub, job, keys, node
from rapha.cli._app import EXIT_CODES_HELP, new_app

__all__ = ["app", "main"]

app = new_app(
    "Rapha: compute-to-data for medical imaging AI. The model goes to the hospital; "
    "the DICOM never leaves.",
    epilog=EXIT_CODES_HELP,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"rapha {version('rapha')}")
        raise typer.Exit()


@app.callback()
def _root(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Rapha: compute-to-data for medical imaging AI."""


app.command("keygen")(keys.keygen)
app.add_typer(demo.app, name="demo")
app.add_typer(hub.app, name="hub")
app.add_typer(job.app, name="job")
app.add_typer(node.app, name="node")


def main() -> None:
    """Entry point of the ``rapha`` console script."""
    app()
