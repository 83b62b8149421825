"""Suite-wide ordering: the heaviest modules first.

``make test`` hands whole modules to its two workers (``--dist loadscope``) in collection
order. Left in path order, a long module collected late (the learning tests, the signal
proof) runs alone at the end while the other worker idles. Sorted longest first, both
workers start on long modules and the many short ones fill in behind (the
longest-processing-time rule). The weights are seconds measured on 2 cores; a module not
listed weighs 0 and keeps its place among the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HEAVY: dict[str, int] = {
    "runtime/test_dry_run.py": 270,
    "demo/test_signal.py": 250,
    "e2e/test_view_privacy.py": 190,
    "e2e/test_marketplace.py": 180,
    "runtime/attacks/test_sandbox_escape.py": 80,
    "runtime/attacks/test_smuggling.py": 60,
    "hub/test_chain_cli.py": 40,
}
_TESTS = Path(__file__).parent


def _weight(item: pytest.Item) -> int:
    try:
        relative = item.path.relative_to(_TESTS).as_posix()
    except ValueError:
        return 0
    return _HEAVY.get(relative, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -_weight(item))  # stable: modules keep their own order
