"""Fixtures for the privacy tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._support import HAVE_ARCHIVE, Archive, make_archive


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """40 studies at 64 x 64 pixels: every header variant the generator plants, quickly."""
    if not HAVE_ARCHIVE:
        pytest.skip("rapha.demo.archive is not available")
    root: Path = tmp_path_factory.mktemp("archive64") / "a"
    return make_archive(root, studies=40, seed=3, size_range=(64, 64))
