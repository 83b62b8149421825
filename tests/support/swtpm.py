"""A real ``swtpm`` (Debian packages swtpm, swtpm-tools) in socket mode on loopback, for tests.

:func:`start_swtpm` "manufactures" a TPM 2.0 under a work directory, as a TPM vendor would:
``swtpm_setup --create-ek-cert --create-platform-cert`` with ``swtpm_localca`` as the
certificate tool, configured entirely by files in that directory (never ``/etc`` or
``/var/lib/swtpm-localca``). ``swtpm_localca`` creates its own root CA and an intermediate
("issuer") CA there, which signs the EK certificate stored in TPM NV. Then ``swtpm socket``
serves the TPM on a free loopback port ``P`` with its control channel on ``P + 1`` (where
the TSS ``swtpm`` TCTI expects it), started and cleared (``startup-clear``), so every start
is a fresh boot with reset PCRs.

:func:`swtpm_or_skip` wraps that for fixtures: without the binaries (or ``tpm2-pytss``) the
tests skip, except under ``CI=true``, where they fail: CI must not silently lose the TPM path.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from rapha.demo.processes import free_port_pair
from rapha.demo.tpm import SWTPM_TOOLS, Manufactured, manufacture_tpm, swtpm_command
from rapha.errors import DependencyError
from support.required import skip_or_fail

__all__ = ["SWTPM_TOOLS", "SwtpmServer", "missing_tools", "start_swtpm", "swtpm_or_skip"]

_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0


class SwtpmServer:
    """A running ``swtpm socket``; call :meth:`stop` (or leave the ``with`` block) when done.

    ``tcti`` is the TSS TCTI string (``swtpm:host=127.0.0.1,port=P``); ``root_ca`` and
    ``issuer_ca`` are the PEM certificates of the local CA that issued the EK certificate
    (root, and the intermediate that signed it).
    """

    def __init__(
        self, process: subprocess.Popen[bytes], *, port: int, made: Manufactured, log: Path
    ) -> None:
        self._process = process
        self.port = port
        self.tcti = f"swtpm:host=127.0.0.1,port={port}"
        self.state = made.state
        self.root_ca = made.root_ca
        self.issuer_ca = made.issuer_ca
        self._log = log

    @property
    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def stop(self) -> None:
        """Terminate swtpm; kill it if it does not exit in time."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=_STOP_TIMEOUT_S)

    def __enter__(self) -> SwtpmServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def missing_tools() -> list[str]:
    return [tool for tool in SWTPM_TOOLS if shutil.which(tool) is None]


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def start_swtpm(workdir: Path) -> SwtpmServer:
    """Manufacture a TPM under ``workdir`` and serve it on loopback until stopped.

    Raises ``RuntimeError`` with swtpm's output when setup fails or the server does not
    come up within 20 s.
    """
    try:
        made = manufacture_tpm(workdir)
    except DependencyError as exc:
        raise RuntimeError(str(exc)) from exc
    log_path = workdir / "swtpm.log"
    for _ in range(3):  # another process may take a port between probe and bind
        port = free_port_pair()
        command = swtpm_command(made, port)
        with log_path.open("ab") as log:
            process = subprocess.Popen(  # fixed system binary, loopback only
                command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir
            )
        server = SwtpmServer(process, port=port, made=made, log=log_path)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while process.poll() is None and not _answers(port + 1):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"swtpm did not listen on port {port + 1}:\n{server.log}")
            time.sleep(0.02)
        if process.poll() is None:
            return server
    raise RuntimeError(f"swtpm exited at start-up:\n{server.log}")


def _skip_or_fail(reason: str) -> NoReturn:
    skip_or_fail(reason, ci_must="run the TPM suite on a real swtpm")


@contextmanager
def swtpm_or_skip(workdir: Path) -> Iterator[SwtpmServer]:
    """A running swtpm, stopped on exit. Without swtpm or tpm2-pytss the caller's tests
    skip, or fail when the environment says ``CI=true``."""
    missing = missing_tools()
    if missing:
        _skip_or_fail(f"{', '.join(missing)} not found: install swtpm and swtpm-tools")
    try:
        import tpm2_pytss  # noqa: F401
    except (ImportError, OSError) as exc:
        _skip_or_fail(f"tpm2-pytss is not usable ({exc}): install rapha[attest]")
    server = start_swtpm(workdir)
    try:
        yield server
    finally:
        server.stop()
