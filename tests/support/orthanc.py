"""A real Orthanc (Debian's ``/usr/sbin/Orthanc`` + DICOMweb plugin) on loopback, for tests.

:func:`start_orthanc` writes a JSON configuration into a temporary directory (storage and
index there too), starts the server on a free loopback port with the DICOM (C-STORE)
listener disabled, waits until ``/system`` answers, and returns an :class:`OrthancServer`
that stops the process on :meth:`OrthancServer.stop` or at the end of a ``with`` block.

Optional HTTP Basic users (``AuthenticationEnabled``) exercise PACS authentication.
``tls`` configures Orthanc's own HTTPS (``SslEnabled``, client certificate verification
when ``tls.client_ca`` is given), but Debian bookworm's Orthanc 1.10 crashes (SIGSEGV in
its civetweb, built against the OpenSSL 1.1 API, on OpenSSL 3) on the first TLS
handshake; tests put a TLS-terminating :class:`support.proxy.RecordingProxy` in front
instead. :func:`upload_folder` stores a folder of DICOM files through ``POST /instances``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
import requests

from rapha.demo.processes import orthanc_config, orthanc_plugin, upload_to_orthanc

__all__ = [
    "ORTHANC_BINARY",
    "OrthancServer",
    "OrthancTls",
    "dicomweb_plugin",
    "free_port",
    "orthanc_or_skip",
    "start_orthanc",
    "upload_folder",
]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
_START_TIMEOUT_S = 30.0


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin shared object of the Debian package, or ``None``."""
    return orthanc_plugin()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class OrthancTls:
    """TLS settings for the test server.

    ``certificate`` is a PEM file holding the server's private key and certificate (the
    format Orthanc's ``SslCertificate`` expects); ``ca`` is the PEM CA certificate that
    signed it (clients verify against it). When ``client_ca`` is set, Orthanc requires a
    client certificate signed by that CA (``SslVerifyPeers``); ``admin_cert`` and
    ``admin_key`` are then a client certificate the test helpers use themselves.
    """

    certificate: Path
    ca: Path
    client_ca: Path | None = None
    admin_cert: Path | None = None
    admin_key: Path | None = None


class OrthancServer:
    """A running Orthanc process; use as a context manager or call :meth:`stop`."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        port: int,
        workdir: Path,
        username: str | None,
        password: str | None,
        tls: OrthancTls | None,
    ) -> None:
        self._process = process
        self.port = port
        self.workdir = workdir
        self.username = username
        self.password = password
        self.tls = tls
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.dicomweb_url = f"{self.url}/dicom-web"

    def session(self) -> requests.Session:
        """A ``requests`` session with the credentials the server was started with."""
        session = requests.Session()
        if self.username is not None and self.password is not None:
            session.auth = (self.username, self.password)
        if self.tls is not None:
            session.verify = str(self.tls.ca)
            if self.tls.admin_cert is not None and self.tls.admin_key is not None:
                session.cert = (str(self.tls.admin_cert), str(self.tls.admin_key))
        return session

    def clear(self) -> None:
        """Delete every stored patient (and so every instance)."""
        with self.session() as http:
            for patient in http.get(f"{self.url}/patients", timeout=10).json():
                http.delete(f"{self.url}/patients/{patient}", timeout=10).raise_for_status()

    @property
    def log(self) -> str:
        """Orthanc's own log (stderr and stdout)."""
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_orthanc(
    tmpdir: Path,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: OrthancTls | None = None,
) -> OrthancServer:
    """Start Orthanc with the DICOMweb plugin on a free loopback port under ``tmpdir``.

    Raises ``FileNotFoundError`` when the Orthanc binary or the DICOMweb plugin is not
    installed (callers skip), ``RuntimeError`` when the server does not come up.
    """
    plugin = dicomweb_plugin()
    if not ORTHANC_BINARY.exists() or shutil.which(str(ORTHANC_BINARY)) is None:
        raise FileNotFoundError(f"{ORTHANC_BINARY} is not installed (Debian package orthanc)")
    if plugin is None:
        raise FileNotFoundError("the Orthanc DICOMweb plugin is not installed (orthanc-dicomweb)")
    workdir = Path(tmpdir)
    (workdir / "storage").mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = orthanc_config(workdir, port=port, plugin=plugin, name="rapha-test")
    config.update({"AuthenticationEnabled": username is not None, "HttpsVerifyPeers": True})
    if username is not None:
        if password is None:
            raise ValueError("a username needs a password")
        config["RegisteredUsers"] = {username: password}
    if tls is not None:
        config["SslEnabled"] = True
        config["SslCertificate"] = str(tls.certificate)
        if tls.client_ca is not None:
            config["SslVerifyPeers"] = True
            config["SslTrustedClientCertificates"] = str(tls.client_ca)
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    with (workdir / "orthanc.log").open("wb") as log:
        process = subprocess.Popen(  # a fixed system binary and a config we wrote
            [str(ORTHANC_BINARY), str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, "LANG": "C"},
        )
    server = OrthancServer(
        process, port=port, workdir=workdir, username=username, password=password, tls=tls
    )
    deadline = time.monotonic() + _START_TIMEOUT_S
    with server.session() as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start-up:\n{server.log[-2000:]}")
            try:
                if http.get(f"{server.url}/system", timeout=2).status_code == 200:
                    return server
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"Orthanc did not answer /system:\n{server.log[-2000:]}")
            time.sleep(0.1)


def upload_folder(server: OrthancServer, root: Path) -> int:
    """Store every file under ``root`` through ``POST /instances``, with the server's
    credentials (:func:`rapha.demo.processes.upload_to_orthanc`); returns how many."""
    tls = server.tls
    auth = (server.username, server.password) if server.username and server.password else None
    cert = None
    if tls is not None and tls.admin_cert is not None and tls.admin_key is not None:
        cert = (str(tls.admin_cert), str(tls.admin_key))
    verify = str(tls.ca) if tls is not None else True
    return upload_to_orthanc(server.url, Path(root), auth=auth, verify=verify, cert=cert)


@contextmanager
def orthanc_or_skip(directory: Path) -> Iterator[OrthancServer]:
    """A running Orthanc for a fixture, stopped on exit; skips the tests when Orthanc is
    not installed (``scripts/install-system-deps`` installs it)."""
    try:
        server = start_orthanc(directory)
    except FileNotFoundError as exc:
        pytest.skip(f"Orthanc is not installed: {exc}")
    with server:
        yield server
