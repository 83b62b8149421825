"""What every ``rapha`` sub-command shares: the group class that turns errors into exit codes."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.core import Context as _ClickContext
from typer.core import TyperGroup

from rapha.errors import ExitCode, RaphaError

__all__ = ["EXIT_CODES_HELP", "RaphaGroup", "err_console", "new_app"]

err_console = Console(stderr=True)

EXIT_CODES_HELP = (
    "Exit codes: 0 ok · 1 error · 2 config or usage · 3 key file · 4 integrity · 5 scope · "
    "6 data · 7 policy · 8 sandbox · 9 remote · 10 missing dependency · 130 interrupted."
)


class RaphaGroup(TyperGroup):
    """A Typer group that reports :class:`RaphaError` as one line and its exit code.

    Users see what went wrong and what to do, not a traceback; scripts get a stable code
    (see :class:`rapha.errors.ExitCode`).
    """

    def invoke(self, ctx: _ClickContext) -> Any:
        try:
            return super().invoke(ctx)
        except RaphaError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            ctx.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            ctx.exit(int(ExitCode.INTERRUPTED))


def new_app(help_text: str, **kwargs: Any) -> typer.Typer:
    """A Typer app with Rapha's defaults: Rich help, no shell-completion noise, error mapping."""
    return typer.Typer(
        cls=RaphaGroup,
        help=help_text,
        no_args_is_help=kwargs.pop("no_args_is_help", True),
        add_completion=False,
        rich_markup_mode="rich",
        pretty_exceptions_enable=False,
        **kwargs,
    )
