"""``rapha job submit | watch | list | status | cancel | fetch | refund``: an AI company's
jobs at the hub.

The hub's URL and the company's API key come from ``--hub`` / ``--api-key`` or the
environment (``RAPHA_HUB_URL``, ``RAPHA_API_KEY``), so the key never has to appear on a
command line. ``submit`` and ``refund`` also need the company's wallet key file
(``--wallet``, 0600, hex) and the hub's chain (``--rpc`` or ``RAPHA_RPC_URL``). Only
node-side phases are shown: nothing from inside the sandbox.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rapha.client import RaphaClient
from rapha.errors import UsageError

__all__ = ["cancel", "fetch", "list_jobs", "refund", "status", "submit", "watch"]

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


WalletOption = Annotated[
    Path, typer.Option("--wallet", help="Your wallet's secp256k1 key file (hex, mode 0600).")
]
RpcOption = Annotated[
    str | None,
    typer.Option("--rpc", envvar="RAPHA_RPC_URL", help="JSON-RPC URL of the hub's chain."),
]
_ENDED = ("settled", "failed", "cancelled")


def _phase(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    phase = progress.get("phase")
    if not phase or job["state"] not in ("assigned", "running"):
        return "—"
    if progress.get("epochs"):
        return f"{phase} (epoch {progress.get('epoch')}/{progress['epochs']})"
    return str(phase)


def _row(job: dict[str, Any]) -> list[str]:
    detail = job.get("failure") or job.get("explanation") or ""
    return [job["id"], job["state"], _phase(job), job["kind"], job.get("node_id") or "—", detail]


def _print(jobs: list[dict[str, Any]]) -> None:
    table = Table("job", "state", "phase", "kind", "node", "detail")
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
    console.print(
        f"job {job['id']} is {job['state']}; once the hub releases the escrow (seconds), "
        f"`rapha job refund {job['id']}` returns the deposit"
    )


def _requirements(profile: Path) -> dict[str, Any]:
    from rapha.hub.profiles import JobRequirements

    try:
        data = tomllib.loads(profile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{profile} is not a readable TOML job profile: {exc}") from exc
    return JobRequirements.parse(data).model_dump(mode="json", exclude_none=True)


def submit(
    bundle: Annotated[Path, typer.Argument(help="The signed bundle (directory or .tar).")],
    profile: Annotated[
        Path, typer.Option("--profile", help="TOML: modality, body_part, labels, min_records.")
    ],
    budget: Annotated[str, typer.Option("--budget", help="Escrow deposit, in USDC.")],
    max_price: Annotated[
        str, typer.Option("--max-price", help="Most you pay per record, in USDC.")
    ],
    wallet: WalletOption,
    rpc: RpcOption = None,
    environment: Annotated[
        str | None,
        typer.Option("--environment", help="demo or production; must be your key's."),
    ] = None,
    hub: HubOption = None,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload BUNDLE, submit it for datasets matching --profile, and deposit the escrow."""
    from rapha.client.escrow import base_units, rpc_chain, submit_job, wallet_from_file

    requirements = _requirements(profile)
    units = base_units(budget, what="--budget")
    price = base_units(max_price, what="--max-price")
    if units == 0:
        raise UsageError("--budget must be above 0")
    account = wallet_from_file(wallet)
    chain = rpc_chain(rpc)
    with _client(hub, api_key) as client:
        job = submit_job(client, bundle, requirements=requirements, budget=units,
                         max_price_per_record=price, wallet=account, chain=chain,
                         environment=environment)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    console.print(
        f"submitted job [bold]{job['id']}[/] ({job['kind']}), {budget} USDC in escrow from "
        f"{account.address}; follow it with `rapha job watch {job['id']}`",
        highlight=False,
    )


def watch(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between looks.")] = 2.0,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds (exit 1).")
    ] = None,
    hub: HubOption = None,
    api_key: KeyOption = None,
) -> None:
    """Follow a job until it is settled, failed or cancelled: state, phase, epochs."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    with _client(hub, api_key) as client:
        while True:
            job = client.job(job_id)
            line = (job["state"], _phase(job), job.get("node_id"), job.get("failure") or
                    job.get("explanation"))  # fmt: skip
            if line != last:
                console.print(" · ".join(str(part) for part in line if part), highlight=False)
                last = line
            if job["state"] in _ENDED:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise typer.Exit(1)
            time.sleep(interval)
    if job["state"] == "settled":
        console.print(f"settled: `rapha job fetch {job_id} --out DIR`, then `rapha job verify DIR`")
    elif job["state"] in ("failed", "cancelled"):
        console.print(f"{job['state']}: `rapha job refund {job_id}` returns the deposit")
        raise typer.Exit(1)


def fetch(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the results (new or empty).")],
    hub: HubOption = None,
    api_key: KeyOption = None,
) -> None:
    """Download a settled job's outbox and countersigned receipt into --out."""
    with _client(hub, api_key) as client:
        client.fetch(job_id, out)
    files = sorted(p.name for p in out.iterdir())
    console.print(f"wrote {', '.join(files)} to {out}; check it with `rapha job verify {out}`")


def refund(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    wallet: WalletOption,
    rpc: RpcOption = None,
    hub: HubOption = None,
    api_key: KeyOption = None,
) -> None:
    """Take back the whole deposit of a failed or cancelled job."""
    from rapha.client.escrow import USDC_DECIMALS, rpc_chain, wallet_from_file
    from rapha.client.escrow import refund as refund_job

    account = wallet_from_file(wallet)
    with _client(hub, api_key) as client:
        amount = refund_job(client, job_id, wallet=account, chain=rpc_chain(rpc))
    console.print(f"refunded {amount / 10**USDC_DECIMALS:.6f} USDC to {account.address}")
