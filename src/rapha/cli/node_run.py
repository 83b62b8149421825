"""``rapha node run``: the node agent (:mod:`rapha.node.agent`) in the foreground.

It runs until interrupted (Ctrl-C or SIGTERM finish the current job's bookkeeping and
stop); ``--max-jobs N`` stops after N jobs. What it does goes to the console and, in full,
to the node's audit log.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["run"]

console = Console(stderr=True)


def run(
    config: Annotated[
        Path, typer.Option("--config", help="The node's node.toml, with its hub table.")
    ],
    max_jobs: Annotated[
        int | None, typer.Option("--max-jobs", min=1, help="Stop after this many jobs.")
    ] = None,
) -> None:
    """Connect to the hub (outbound only), attest, publish the profile, and run jobs."""
    from rapha.node.agent import NodeAgent
    from rapha.node.settings import load_node_settings

    settings = load_node_settings(config.absolute())
    agent = NodeAgent(settings, say=lambda text: console.print(text, highlight=False))

    def stop(_signum: int, _frame: FrameType | None) -> None:
        console.print("stopping after the current step…")
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    assert settings.hub is not None  # NodeAgent refuses a config without [hub]
    console.print(f"node {settings.hub.node_id} → {settings.hub.url}", highlight=False)
    taken = agent.run(max_jobs=max_jobs)
    console.print(f"stopped after {taken} job(s)")
