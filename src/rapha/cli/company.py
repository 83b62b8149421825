"""``rapha job list | status | cancel``: an AI company following its jobs at the hub.

The hub's URL and the company's API key come from ``--hub`` / ``--api-key`` or the
environment (``RAPHA_HUB_URL``, ``RAPHA_API_KEY``), so the key never has to appear on a
command line. Only node-side phases are shown: nothing from inside the sandbox.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rapha.client import RaphaClient
from rapha.errors import UsageError

__all__ = ["cancel", "list_jobs", "status"]

console = Console()

HubOption = Annotated[
    str | None, typer.Option("--hub", envvar="RAPHA_HUB_URL", help="The hub's URL.")
]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="RAPHA_API_KEY", help="Your API key (better: RAPHA_API_KEY)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _client(hub: str | None, api_key: str | None) -> RaphaClient:
    if not hub:
        raise UsageError("no hub: pass --hub URL or set RAPHA_HUB_URL")
    if not api_key:
        raise UsageError("no API key: set RAPHA_API_KEY (or pass --api-key)")
    return RaphaClient(hub, api_key)


def _row(job: dict[str, Any]) -> list[str]:
    detail = job.get("failure") or job.get("explanation") or ""
    return [job["id"], job["state"], job["kind"], job.get("node_id") or "—", detail]


def _print(jobs: list[dict[str, Any]]) -> None:
    table = Table("job", "state", "kind", "node", "detail")
    for job in jobs:
        table.add_row(*_row(job))
    console.print(table)


def list_jobs(
    hub: HubOption = None, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """List your jobs and their states."""
    with _client(hub, api_key) as client:
        jobs = client.jobs()
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
    else:
        _print(jobs)


def status(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    hub: HubOption = None,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one job: its state, its node, and why it waits or failed."""
    with _client(hub, api_key) as client:
        job = client.job(job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    else:
        _print([job])


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    hub: HubOption = None,
    api_key: KeyOption = None,
) -> None:
    """Cancel a job that no node has taken yet (then refund its escrow on chain)."""
    with _client(hub, api_key) as client:
        job = client.cancel(job_id)
    console.print(f"job {job['id']} is {job['state']}; refund the escrow with the vault's refund")
