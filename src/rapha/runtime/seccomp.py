"""The sandbox's seccomp filter, compiled here to classic BPF for ``bwrap --seccomp FD``.

bubblewrap loads the program (``struct sock_filter[]``, see ``linux/filter.h`` and
``linux/seccomp.h``) right before it executes the sandboxed command, with
``PR_SET_NO_NEW_PRIVS`` set, so neither the model code nor anything it starts can lift it.

What it denies (the sandbox issue's list), every other system call being allowed:

* ``socket`` and ``socketpair`` for any address family but ``AF_UNIX`` → ``EAFNOSUPPORT``;
  the network namespace has no interface but loopback anyway, this also closes raw,
  netlink, packet and vsock sockets;
* ``ptrace``, ``mount`` and the new mount API (``open_tree``, ``move_mount``, ``fsopen``,
  ``fsconfig``, ``fsmount``, ``mount_setattr``), ``umount2``, ``pivot_root``, ``unshare``,
  ``setns`` → ``EPERM``;
* ``clone`` with any ``CLONE_NEW*`` flag → ``EPERM``; ``clone3`` → ``ENOSYS``, because its
  flags live in a struct in memory that seccomp cannot read; glibc then falls back to
  ``clone``, whose flags it can (flatpak and Chromium do the same);
* ``io_uring_setup``/``enter``/``register`` (it performs I/O that seccomp never sees),
  ``userfaultfd``, ``perf_event_open``, ``bpf``, ``keyctl``, ``add_key``, ``request_key``
  → ``EPERM``.

A call from a foreign ABI (``AUDIT_ARCH`` mismatch, or an x32 call on x86-64, where the
same numbers with bit 30 set reach the same kernel code) kills the process: it is the
classic way around a filter written for one ABI.
"""

from __future__ import annotations

import platform
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from rapha.crypto import digest_bytes
from rapha.errors import DependencyError

__all__ = [
    "CLONE_NAMESPACE_FLAGS",
    "DENIED_SYSCALLS",
    "SeccompFilter",
    "build_filter",
]

# linux/filter.h opcodes
_LD_W_ABS: Final = 0x20
_JEQ_K: Final = 0x15
_JSET_K: Final = 0x45
_RET_K: Final = 0x06
# linux/seccomp.h return actions
_RET_KILL_PROCESS: Final = 0x80000000
_RET_ERRNO: Final = 0x00050000
_RET_ALLOW: Final = 0x7FFF0000
# struct seccomp_data offsets
_NR: Final = 0
_ARCH: Final = 4
_ARG0_LO: Final = 16  # little-endian: the low 32 bits of args[0]

_EPERM: Final = 1
_ENOSYS: Final = 38
_EAFNOSUPPORT: Final = 97
_AF_UNIX: Final = 1
_X32_BIT: Final = 0x40000000

CLONE_NAMESPACE_FLAGS: Final = (
    0x00000080  # CLONE_NEWTIME
    | 0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)

DENIED_SYSCALLS: Final = (
    "ptrace",
    "mount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "mount_setattr",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "perf_event_open",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
)
"""Calls refused with ``EPERM`` whatever their arguments."""


@dataclass(frozen=True)
class _Arch:
    audit: int
    numbers: Mapping[str, int]
    x32: bool


# Numbers from the kernel's syscall tables (arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h); only the ones the filter names.
_ARCHES: Final[Mapping[str, _Arch]] = {
    "x86_64": _Arch(
        audit=0xC000003E,
        x32=True,
        numbers={
            "socket": 41,
            "socketpair": 53,
            "clone": 56,
            "clone3": 435,
            "ptrace": 101,
            "mount": 165,
            "umount2": 166,
            "pivot_root": 155,
            "unshare": 272,
            "setns": 308,
            "open_tree": 428,
            "move_mount": 429,
            "fsopen": 430,
            "fsconfig": 431,
            "fsmount": 432,
            "mount_setattr": 442,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "userfaultfd": 323,
            "perf_event_open": 298,
            "bpf": 321,
            "keyctl": 250,
            "add_key": 248,
            "request_key": 249,
        },
    ),
    "aarch64": _Arch(
        audit=0xC00000B7,
        x32=False,
        numbers={
            "socket": 198,
            "socketpair": 199,
            "clone": 220,
            "clone3": 435,
            "ptrace": 117,
            "mount": 40,
            "umount2": 39,
            "pivot_root": 41,
            "unshare": 97,
            "setns": 268,
            "open_tree": 428,
            "move_mount": 429,
            "fsopen": 430,
            "fsconfig": 431,
            "fsmount": 432,
            "mount_setattr": 442,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "userfaultfd": 282,
            "perf_event_open": 241,
            "bpf": 280,
            "keyctl": 219,
            "add_key": 217,
            "request_key": 218,
        },
    ),
}


@dataclass(frozen=True)
class SeccompFilter:
    """A compiled filter: ``program`` is what bwrap reads from ``--seccomp FD``."""

    arch: str
    program: bytes

    @property
    def digest(self) -> str:
        """SHA-256 of the program; part of the sandbox profile a node's measurement covers."""
        return digest_bytes(self.program)

    @property
    def instructions(self) -> int:
        return len(self.program) // 8


class _Assembler:
    """Straight-line BPF with forward jumps to named labels, resolved at the end."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | int, str | int, int]] = []
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: str | int, false: str | int = 0) -> None:
        self._code.append((op, true, false, k))

    def ret(self, action: int) -> None:
        self._code.append((_RET_K, 0, 0, action))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def assemble(self) -> bytes:
        out = bytearray()
        for at, (code, jt, jf, k) in enumerate(self._code):
            out += struct.pack("<HBBI", code, self._offset(at, jt), self._offset(at, jf), k)
        return bytes(out)

    def _offset(self, at: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        distance = self._labels[target] - at - 1
        if not 0 <= distance <= 255:  # pragma: no cover - the program is short
            raise AssertionError("BPF jump out of range")
        return distance


def build_filter(arch: str | None = None) -> SeccompFilter:
    """Compile the deny-list filter for ``arch`` (default: this machine's).

    Raises:
        DependencyError: the architecture has no syscall table here; the sandbox refuses
            to run rather than run without the filter.
    """
    name = arch or platform.machine()
    table = _ARCHES.get(name)
    if table is None:
        raise DependencyError(
            f"no seccomp filter is defined for the {name} architecture; the sandbox "
            f"refuses to run untrusted code without one (supported: {sorted(_ARCHES)})"
        )
    nr = table.numbers
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump(_JEQ_K, table.audit, 1, 0)
    asm.ret(_RET_KILL_PROCESS)
    asm.load(_NR)
    if table.x32:
        asm.jump(_JSET_K, _X32_BIT, "kill")
    asm.jump(_JEQ_K, nr["socket"], "socket")
    asm.jump(_JEQ_K, nr["socketpair"], "socket")
    asm.jump(_JEQ_K, nr["clone"], "clone")
    asm.jump(_JEQ_K, nr["clone3"], "enosys")
    for call in DENIED_SYSCALLS:
        asm.jump(_JEQ_K, nr[call], "eperm")
    asm.ret(_RET_ALLOW)
    asm.label("socket")
    asm.load(_ARG0_LO)
    asm.jump(_JEQ_K, _AF_UNIX, "allow")
    asm.ret(_RET_ERRNO | _EAFNOSUPPORT)
    asm.label("clone")
    asm.load(_ARG0_LO)
    asm.jump(_JSET_K, CLONE_NAMESPACE_FLAGS, "eperm")
    asm.label("allow")
    asm.ret(_RET_ALLOW)
    asm.label("eperm")
    asm.ret(_RET_ERRNO | _EPERM)
    asm.label("enosys")
    asm.ret(_RET_ERRNO | _ENOSYS)
    asm.label("kill")
    asm.ret(_RET_KILL_PROCESS)
    return SeccompFilter(arch=name, program=asm.assemble())
