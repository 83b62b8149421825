"""Compile the Vyper contracts in this package, in process, with the pinned ``vyper``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapha.errors import DependencyError

_CONTRACTS = Path(__file__).with_name("contracts")


@dataclass(frozen=True, slots=True)
class Compiled:
    """A contract's ABI and creation bytecode."""

    abi: list[dict[str, Any]]
    bytecode: str


@functools.cache
def compiled(name: str) -> Compiled:
    """Compile ``contracts/<name>.vy`` once per process."""
    try:
        import vyper
    except ImportError as exc:  # pragma: no cover - the ledger extra is missing
        raise DependencyError("the vyper compiler is not installed; install rapha[ledger]") from exc
    source = (_CONTRACTS / f"{name}.vy").read_text(encoding="utf-8")
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    return Compiled(abi=list(out["abi"]), bytecode=str(out["bytecode"]))
