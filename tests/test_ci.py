"""scripts/run-pytest, which `make test` and CI use: red on failure, green on "no tests"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run-pytest"


def _run(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "-q", "-p", "no:cacheprovider", str(directory)],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PY": sys.executable},
    )


def test_a_failing_test_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_red.py").write_text("def test_red():\n    assert 1 == 2\n")

    assert _run(tmp_path).returncode == 1


def test_passing_tests_pass_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_green.py").write_text("def test_green():\n    assert 1 == 1\n")

    assert _run(tmp_path).returncode == 0


def test_no_collected_tests_is_not_exit_5(tmp_path: Path) -> None:
    (tmp_path / "empty.py").write_text("x = 1\n")

    result = _run(tmp_path)

    assert result.returncode == 0
    assert "collected no tests" in result.stdout


def test_ci_entry_point_runs_make_test() -> None:
    ci = (SCRIPT.parents[1] / ".ci" / "run").read_text()

    assert "make test" in ci
    assert "set -euo pipefail" in ci
