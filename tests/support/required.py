"""What a test does when a real server it needs is missing: skip, or fail under CI.

A developer's machine may lack anvil, swtpm or PostgreSQL; the tests that need one skip
with the reason. Under ``CI=true`` they fail instead: CI must never pass by silently
losing a suite.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["skip_or_fail"]


def skip_or_fail(reason: str, *, ci_must: str) -> NoReturn:
    """Skip with ``reason``; under ``CI=true`` fail with it and what CI must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must {ci_must}")
    pytest.skip(reason)
