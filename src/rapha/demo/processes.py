"""The processes the demo starts, and how it makes sure none outlives it.

Every child runs in its own session (so :meth:`Child.stop` reaches its whole process
group: an agent's sandboxes too) and is started with the kernel's parent-death signal set
to ``SIGKILL`` (``setpriv --pdeathsig``), so that even a demo killed with ``SIGKILL``, which
runs no clean-up of its own, takes its children with it. Children are started from the
main thread: the kernel sends the signal when the *thread* that forked a child ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import httpx

from rapha.errors import DependencyError

__all__ = [
    "ORTHANC",
    "Child",
    "free_port",
    "free_port_pair",
    "orthanc_config",
    "orthanc_plugin",
    "start_orthanc",
    "upload_to_orthanc",
    "wait_for_port",
]

ORTHANC: Final = Path("/usr/sbin/Orthanc")
_PLUGIN_DIRS: Final = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
_SETPRIV: Final = shutil.which("setpriv")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_pair() -> int:
    """A port ``P`` with ``P`` and ``P + 1`` free on 127.0.0.1 a moment ago (swtpm)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise DependencyError("no two adjacent free loopback ports")


def wait_for_port(port: int, *, what: str, timeout: float = 20.0) -> None:
    """Wait until something listens on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise DependencyError(f"{what} did not listen on port {port} within {timeout:g} s")
        time.sleep(0.05)


class Child:
    """One child process, its output in a log file; stopped with its whole group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log
        guard = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - our own commands and configs
                [*guard, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 20.0) -> None:
        """``SIGTERM`` the group, then ``SIGKILL`` whatever is left after ``timeout``."""
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        # The group may hold more than the leader (a sandbox): kill what is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


def orthanc_plugin() -> Path | None:
    """Debian's Orthanc DICOMweb plugin, or ``None`` when Orthanc or it is not installed."""
    if not ORTHANC.exists():
        return None
    for folder in _PLUGIN_DIRS:
        for candidate in sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else ():
            return candidate
    return None


def orthanc_config(workdir: Path, *, port: int, plugin: Path, name: str) -> dict[str, Any]:
    """An Orthanc configuration storing under ``workdir``: HTTP on ``127.0.0.1:port`` only
    (no DICOM listener, no remote access, no authentication), DICOMweb at ``/dicom-web/``."""
    return {
        "Name": name,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SaveJobs": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }


def start_orthanc(workdir: Path, *, log: Path, timeout: float = 30.0) -> tuple[Child, str]:
    """Orthanc with DICOMweb on a free loopback port, storing under ``workdir``.

    Returns the child and the server's base URL. The DICOM listener is off; only this
    machine can reach the HTTP port. Raises :class:`DependencyError` when Orthanc or its
    DICOMweb plugin is missing or the server does not answer within ``timeout``.
    """
    plugin = orthanc_plugin()
    if plugin is None:
        raise DependencyError(
            "Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, "
            "orthanc-dicomweb)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = orthanc_config(workdir, port=port, plugin=plugin, name="rapha-demo")
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    child = Child(
        "orthanc", [str(ORTHANC), str(path)], log=log, cwd=workdir, env={**os.environ, "LANG": "C"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if not child.running:
            raise DependencyError(f"Orthanc exited at start-up; see {log}")
        try:
            if httpx.get(f"{url}/system", timeout=2).status_code == 200:
                return child, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            child.stop()
            raise DependencyError(f"Orthanc did not answer within {timeout:g} s; see {log}")
        time.sleep(0.1)


def upload_to_orthanc(
    url: str,
    root: Path,
    *,
    auth: tuple[str, str] | None = None,
    verify: str | bool = True,
    cert: tuple[str, str] | None = None,
) -> int:
    """Store every file under ``root`` in Orthanc (``POST /instances``), sorted by path.

    Files Orthanc refuses (not DICOM, corrupt) are skipped. Returns how many files were
    stored as new instances; a second copy of an instance already stored does not count,
    and Orthanc keeps the first copy (``OverwriteInstances`` is false by default), so the
    stored copy is the one with the smallest path, as the folder source picks it.
    """
    stored = 0
    files = sorted((p for p in root.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())  # fmt: skip
    with httpx.Client(base_url=url, timeout=60, auth=auth, verify=verify, cert=cert) as http:
        for path in files:
            response = http.post("/instances", content=path.read_bytes())
            if response.status_code == 200 and response.json().get("Status") == "Success":
                stored += 1
    return stored
