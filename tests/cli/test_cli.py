"""The ``rapha`` command: help, version, keygen, and how errors reach the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from rapha import crypto
from rapha.cli import app
from rapha.errors import ExitCode

runner = CliRunner()


def test_help_lists_the_commands_and_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])

    assert result.exit_code == 0
    assert "keygen" in result.output
    assert "demo" in result.output
    assert "Exit codes" in result.output


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.output.strip() == f"rapha {version('rapha')}"


def test_keygen_writes_a_private_key_0600_and_a_public_key(tmp_path: Path) -> None:
    out = tmp_path / "company.key"

    result = runner.invoke(app, ["keygen", "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600
    key = crypto.load_private_key(out)
    pub = crypto.load_public_key(tmp_path / "company.key.pub")
    assert crypto.public_key_bytes(pub) == crypto.public_key_bytes(key.public_key())
    assert crypto.public_key_bytes(pub).hex() in result.output


def test_keygen_refuses_to_overwrite_with_key_file_exit_code(tmp_path: Path) -> None:
    out = tmp_path / "company.key"
    runner.invoke(app, ["keygen", "--out", str(out)])
    before = out.read_bytes()

    result = runner.invoke(app, ["keygen", "--out", str(out)])

    assert result.exit_code == ExitCode.KEY_FILE
    assert "already exists" in result.output
    assert "Traceback" not in result.output
    assert out.read_bytes() == before


def test_keygen_force_replaces_the_key(tmp_path: Path) -> None:
    out = tmp_path / "company.key"
    runner.invoke(app, ["keygen", "--out", str(out)])
    before = out.read_bytes()

    result = runner.invoke(app, ["keygen", "--out", str(out), "--force"])

    assert result.exit_code == 0
    assert out.read_bytes() != before


def test_console_script_runs_as_a_process() -> None:
    rapha = Path(sys.executable).parent / "rapha"

    proc = subprocess.run(
        [str(rapha), "--version"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("rapha ")
