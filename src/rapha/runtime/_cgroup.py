"""A per-run cgroup capping memory and processes, where the host lets the node make one.

Both hierarchies are supported: cgroup v2 (one unified tree; the controllers must be
enabled in the parent's ``cgroup.subtree_control``) and cgroup v1 (one tree per
controller). The new group sits below the node's own group in each tree, so a node
confined by its host stays confined. When neither can be written (not root, no
delegation), :func:`create` returns ``None`` and the sandbox falls back to
``RLIMIT_NPROC`` on the dedicated uid and ``RLIMIT_AS``; that is the issue's rule:
"capped by the cgroup pids controller where present, or else by RLIMIT_NPROC".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["Cgroup", "create"]

_ROOT: Final = Path("/sys/fs/cgroup")


@dataclass
class Cgroup:
    """The directories of one run's group; ``procs_files`` are written by the child."""

    dirs: tuple[Path, ...]
    memory_dir: Path | None
    v2: bool

    @property
    def procs_files(self) -> tuple[str, ...]:
        return tuple(str(d / "cgroup.procs") for d in self.dirs)

    def peak_memory(self) -> int | None:
        if self.memory_dir is None:
            return None
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.memory_dir / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def destroy(self) -> None:
        """Kill whatever is still inside, then remove the group."""
        for directory in self.dirs:
            for _ in range(50):
                try:
                    pids = (directory / "cgroup.procs").read_text().split()
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.02)
            with contextlib.suppress(OSError):
                directory.rmdir()


def _own_path(controller: str) -> str | None:
    """This process's group in the v1 tree of ``controller`` (``""`` for v2's)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return None


def _make(parent: Path, name: str, settings: dict[str, str]) -> Path | None:
    directory = parent / name
    try:
        directory.mkdir()
    except OSError:
        return None
    try:
        for key, value in settings.items():
            (directory / key).write_text(value)
    except OSError:
        with contextlib.suppress(OSError):
            directory.rmdir()
        return None
    return directory


def create(memory: int, processes: int) -> Cgroup | None:
    """A new group limited to ``memory`` bytes and ``processes`` tasks, or ``None``."""
    name = f"rapha-sandbox-{secrets.token_hex(6)}"
    unified = _root_v2()
    if unified is not None:
        enabled = (unified / "cgroup.subtree_control").read_text().split()
        settings: dict[str, str] = {}
        if "memory" in enabled:
            settings |= {"memory.max": str(memory), "memory.swap.max": "0"}
        if "pids" in enabled:
            settings["pids.max"] = str(processes)
        if settings:
            made = _make(unified, name, settings)
            if made is not None:
                return Cgroup((made,), made if "memory" in enabled else None, v2=True)
    dirs: list[Path] = []
    memory_dir = None
    for controller, settings in (
        ("pids", {"pids.max": str(processes)}),
        ("memory", {"memory.limit_in_bytes": str(memory)}),
    ):
        own = _own_path(controller)
        base = _ROOT / controller
        if own is None or not (base / "cgroup.procs").exists():
            continue
        made = _make(base / own.lstrip("/"), name, settings)
        if made is not None:
            dirs.append(made)
            if controller == "memory":
                memory_dir = made
    return Cgroup(tuple(dirs), memory_dir, v2=False) if dirs else None


def _root_v2() -> Path | None:
    """The node's own group in a pure v2 hierarchy, if that is what the host has."""
    if not (_ROOT / "cgroup.controllers").exists():
        return None
    own = _own_path("")
    if own is None:
        return None
    path = _ROOT / own.lstrip("/")
    return path if (path / "cgroup.subtree_control").exists() else None
