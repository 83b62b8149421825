"""A real anvil (Foundry's dev node, npm package ``@foundry-rs/anvil``) on loopback, for tests.

``make setup`` installs the pinned version from the root ``package.json`` into
``node_modules/`` (when npm is on PATH). :func:`anvil_or_skip` starts it on a free
127.0.0.1 port, waits until it answers ``eth_chainId`` and stops it on exit. Without an
anvil the tests that need one skip, except under ``CI=true``, where they fail: CI must not
silently lose the JSON-RPC path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from support.orthanc import free_port
from support.required import skip_or_fail

__all__ = ["ANVIL_CHAIN_ID", "AnvilNode", "anvil_binary", "anvil_or_skip", "start_anvil"]

ANVIL_CHAIN_ID = 31337
_REPO = Path(__file__).resolve().parents[2]
_LOCAL_ANVIL = _REPO / "node_modules" / ".bin" / "anvil"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


def anvil_binary() -> Path | None:
    """The repository's ``node_modules/.bin/anvil``, else an ``anvil`` on PATH, else None."""
    if _LOCAL_ANVIL.is_file() and os.access(_LOCAL_ANVIL, os.X_OK):
        return _LOCAL_ANVIL
    found = shutil.which("anvil")
    return Path(found) if found is not None else None


class AnvilNode:
    """A running anvil process in its own process group; call :meth:`stop` when done."""

    def __init__(self, process: subprocess.Popen[bytes], *, port: int, log: Path) -> None:
        self._process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = log

    @property
    def log(self) -> str:
        """What anvil printed (stdout and stderr)."""
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def stop(self) -> None:
        """Terminate anvil; kill its whole process group if it does not exit in time.

        ``node_modules/.bin/anvil`` is a node wrapper around the real binary; it forwards
        SIGTERM, and the group kill reaches the binary when it does not.
        """
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=_STOP_TIMEOUT_S)


def _answers(url: str) -> bool:
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    try:
        response = requests.post(url, json=body, timeout=2)
        return response.status_code == 200 and "result" in response.json()
    except (requests.RequestException, ValueError):
        return False


def start_anvil(binary: Path, workdir: Path) -> AnvilNode:
    """Start ``binary`` on a free loopback port with chain id 31337; logs go to ``workdir``.

    Raises ``RuntimeError``, with anvil's output, when it exits or does not answer within
    30 s.
    """
    port = free_port()
    log_path = workdir / "anvil.log"
    command = [str(binary), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--chain-id", str(ANVIL_CHAIN_ID), "--silent"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # the pinned anvil, loopback only
            command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
    node = AnvilNode(process, port=port, log=log_path)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _answers(node.url):
        if process.poll() is not None:
            raise RuntimeError(f"anvil exited at start-up (code {process.returncode}):\n{node.log}")
        if time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"anvil did not answer on {node.url} within 30 s:\n{node.log}")
        time.sleep(0.05)
    return node


@contextmanager
def anvil_or_skip(workdir: Path) -> Iterator[AnvilNode]:
    """A running anvil, stopped on exit. Without one the caller's tests skip, or fail when
    the environment says ``CI=true``."""
    binary = anvil_binary()
    if binary is None:
        skip_or_fail(
            "anvil not found: run `make setup` (needs npm) to install node_modules/.bin/anvil",
            ci_must="run the ledger suite on a JSON-RPC node",
        )
    node = start_anvil(binary, workdir)
    try:
        yield node
    finally:
        node.stop()
