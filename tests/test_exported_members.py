"""Each module's public surface is a sorted ``__all__`` of names that exist (STYLE.md rule 2)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import rapha


def _modules() -> list[str]:
    names = ["rapha"]
    for info in pkgutil.walk_packages(rapha.__path__, prefix="rapha."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            names.append(info.name)
    return sorted(names)


def _isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions, each sorted."""
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("name", _modules())
def test_all_is_sorted_and_every_name_exists(name: str) -> None:
    module = importlib.import_module(name)

    exported = getattr(module, "__all__", None)

    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported, key=_isort_key), f"{name}.__all__ is not sorted"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
