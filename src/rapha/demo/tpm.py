"""A software TPM (swtpm) for a demo node, "manufactured" as a TPM vendor would.

:func:`manufacture_tpm` runs ``swtpm_setup --create-ek-cert --create-platform-cert`` with
``swtpm_localca`` as the certificate tool, configured entirely by files under a work
directory (never ``/etc`` or ``/var/lib/swtpm-localca``): the local CA (a root and an
issuing intermediate, kept in ``ca_dir``, which several TPMs may share) signs the EK
certificate stored in the TPM's NV. :func:`swtpm_command` serves it on a loopback port
``P`` with its control channel on ``P + 1``, where the TSS ``swtpm`` TCTI expects it,
started and cleared, so every start is a fresh boot with reset PCRs.

A software TPM proves nothing about hardware (docs/security.md): it exercises the real
enrolment, credential activation and quote path, nothing more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rapha.errors import DependencyError

__all__ = ["SWTPM_TOOLS", "Manufactured", "manufacture_tpm", "missing_tpm", "swtpm_command"]

SWTPM_TOOLS: Final = ("swtpm", "swtpm_setup", "swtpm_localca")


@dataclass(frozen=True)
class Manufactured:
    """A manufactured TPM's state directory and its EK certificate's CA (PEM files)."""

    state: Path
    root_ca: Path
    issuer_ca: Path


def missing_tpm() -> str | None:
    """Why no software TPM can run here, or ``None`` when one can."""
    missing = [tool for tool in SWTPM_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian packages swtpm, swtpm-tools)"
    try:
        import tpm2_pytss  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"tpm2-pytss is not usable ({exc}); install rapha[attest]"
    return None


def manufacture_tpm(workdir: Path, *, ca_dir: Path | None = None) -> Manufactured:
    """Manufacture a TPM 2.0 under ``workdir``; its EK certificate is signed by the local
    CA in ``ca_dir`` (default ``workdir/ca``), which is created on first use.

    Raises :class:`DependencyError` with swtpm_setup's output when it fails.
    """
    state, ca = workdir / "state", ca_dir or workdir / "ca"
    state.mkdir(parents=True)
    ca.mkdir(parents=True, exist_ok=True)
    localca_conf = workdir / "swtpm-localca.conf"
    localca_conf.write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    localca_options = workdir / "swtpm-localca.options"
    localca_options.write_text(
        "--platform-manufacturer Rapha\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup_conf = workdir / "swtpm_setup.conf"
    setup_conf.write_text(
        f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
        f"create_certs_tool_config = {localca_conf}\n"
        f"create_certs_tool_options = {localca_options}\n"
        "active_pcr_banks = sha256\n"
    )
    command = ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--config", str(setup_conf)]
    command += ["--create-ek-cert", "--create-platform-cert", "--overwrite"]
    if os.geteuid() == 0:
        # Name the user explicitly: the state must belong to whoever owns the directory,
        # never to the distribution's tss user.
        command += ["--runas", "root"]
    # XDG_CONFIG_HOME/HOME point at workdir, so no user configuration is picked up.
    env = {**os.environ, "XDG_CONFIG_HOME": str(workdir), "HOME": str(workdir), "LANG": "C"}
    result = subprocess.run(  # noqa: S603 - fixed system binaries, arguments we built
        command, capture_output=True, env=env, cwd=workdir, timeout=120, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise DependencyError(f"swtpm_setup failed (code {result.returncode}):\n{output[-3000:]}")
    return Manufactured(state, ca / "swtpm-localca-rootca-cert.pem", ca / "issuercert.pem")


def swtpm_command(made: Manufactured, port: int) -> list[str]:
    """``swtpm socket`` serving ``made`` on ``127.0.0.1:port`` (control on ``port + 1``)."""
    command = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={made.state}"]
    command += ["--server", f"type=tcp,port={port},bindaddr=127.0.0.1"]
    command += ["--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1"]
    command += ["--flags", "not-need-init,startup-clear"]
    return command
