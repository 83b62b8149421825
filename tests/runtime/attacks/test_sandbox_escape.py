"""Attacks on the sandbox itself: network, files, environment, resources, system calls.

Every probe prints its verdict and stops the job; each test asserts the verdict, that the
job failed, and that nothing happened on the host (nothing received, nothing written, no
process left). The ``node`` fixture (conftest) checks afterwards that the node is healthy.
"""

from __future__ import annotations

import os
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rapha
from rapha.node.job import JobError

from .conftest import Node, Secrets, attack_limits, no_sandbox_processes

pytestmark = pytest.mark.slow


def blocked(node: Node, body: str, **limits: float) -> str:
    """Run a probe; assert it reported only blocks and the job failed; return stderr."""
    with pytest.raises(JobError) as info:
        node.run(textwrap.dedent(body) + "\nraise SystemExit(3)\n", limits=attack_limits(**limits))
    detail = info.value.detail
    assert "ATTACK escaped" not in detail, detail
    assert "ATTACK blocked" in detail, detail
    assert not node.outbox.exists()
    return detail


class Listener:
    """A host socket that records whether anything reached it."""

    def __init__(self, family: int, kind: int, address: object) -> None:
        self.sock = socket.socket(family, kind)
        self.sock.bind(address)  # type: ignore[arg-type]
        if kind == socket.SOCK_STREAM:
            self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.sock.type == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    self.received.append(b"connection:" + conn.recv(100))
                    conn.close()
                else:
                    self.received.append(self.sock.recv(100))
            except (TimeoutError, OSError):
                continue

    def close(self) -> list[bytes]:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.received


@pytest.fixture
def tcp() -> Iterator[Listener]:
    listener = Listener(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
    yield listener
    listener.close()


# --- network -----------------------------------------------------------------------------


def test_tcp_to_a_host_listener_is_blocked(node: Node, tcp: Listener) -> None:
    host, port = tcp.address
    blocked(
        node,
        f"""
        import socket
        try:
            s = socket.create_connection(("{host}", {port}), timeout=3)
            s.sendall(b"LEAK")
            verdict(False, "tcp connected")
        except OSError as exc:
            verdict(True, "tcp " + type(exc).__name__)
        """,
    )
    assert tcp.close() == []


def test_udp_to_a_host_listener_is_blocked(node: Node) -> None:
    listener = Listener(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
    host, port = listener.address
    blocked(
        node,
        f"""
        import socket
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"LEAK", ("{host}", {port}))
            verdict(False, "udp sent")
        except OSError as exc:
            verdict(True, "udp " + type(exc).__name__)
        """,
    )
    assert listener.close() == []


def test_ipv6_loopback_is_blocked(node: Node) -> None:
    try:
        listener = Listener(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0))
    except OSError:
        pytest.skip("the host has no IPv6 loopback")
    port = listener.address[1]
    blocked(
        node,
        f"""
        import socket
        try:
            s = socket.create_connection(("::1", {port}), timeout=3)
            verdict(False, "ipv6 connected")
        except OSError as exc:
            verdict(True, "ipv6 " + type(exc).__name__)
        """,
    )
    assert listener.close() == []


def test_dns_and_raw_sockets_are_blocked(node: Node) -> None:
    blocked(
        node,
        """
        import socket
        try:
            socket.getaddrinfo("localhost.localdomain", 80)
            socket.getaddrinfo("example.org", 80)
            verdict(False, "dns resolved")
        except OSError as exc:
            verdict(True, "dns " + type(exc).__name__)
        for family, kind in ((socket.AF_INET, socket.SOCK_RAW), (socket.AF_PACKET, socket.SOCK_RAW),
                             (socket.AF_NETLINK, socket.SOCK_RAW)):
            try:
                socket.socket(family, kind, 0)
                verdict(False, "raw socket")
            except OSError as exc:
                verdict(True, "raw " + str(exc.errno))
        """,
    )


def test_unix_sockets_of_the_host_are_unreachable(node: Node, host_secrets: Secrets) -> None:
    path = host_secrets.root / "node.sock"
    named = Listener(socket.AF_UNIX, socket.SOCK_STREAM, str(path))
    path.chmod(0o777)
    abstract_name = f"\0rapha-attack-{os.getpid()}"
    abstract = Listener(socket.AF_UNIX, socket.SOCK_STREAM, abstract_name)
    blocked(
        node,
        f"""
        import socket
        for address in ({str(path)!r}, {abstract_name!r}):
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(address)
                s.sendall(b"LEAK")
                verdict(False, "unix connected")
            except OSError as exc:
                verdict(True, "unix " + type(exc).__name__)
        """,
    )
    assert named.close() == []
    assert abstract.close() == []


# --- files and environment -----------------------------------------------------------------


def test_host_files_are_invisible(node: Node, host_secrets: Secrets) -> None:
    view = node.view
    targets = [
        "/etc/shadow",
        "/etc/passwd",
        str(host_secrets.secret_file),
        str(host_secrets.node_dir / "node.toml"),
        str(host_secrets.node_dir / "keys" / "hmac.key"),
        str(view.node_dir / "keys" / "node.key"),
        str(view.node_dir / "node.toml"),
        str(view.private_dir / "test-labels.json"),
        str(view.view / "test" / "records.jsonl"),
        str(view.archive / "labels.csv"),
        "/view/test/images.npy",
        "/proc/1/root/etc/hostname",
    ]
    archive = view.archive / "dicom"
    one_dicom = next(p for p in archive.rglob("*") if p.is_file())
    targets.append(str(one_dicom))
    body = "import os\n"
    for target in targets:
        body += f"""
try:
    data = open({target!r}, "rb").read()
    verdict({host_secrets.token.encode()!r} not in data and b"effusion" not in data
            and len(data) < 8, "read " + {target!r})
except OSError as exc:
    verdict(True, "read " + type(exc).__name__)
"""
    checkout = str(Path(rapha.__file__).resolve().parent)
    body += f"verdict(not os.path.exists({checkout!r}), 'host checkout hidden')\n"
    body += """
seen = sorted(os.listdir("/"))
verdict(set(seen) <= {"bin", "bundle", "dev", "etc", "job", "lib", "lib32", "lib64", "libx32",
        "out", "proc", "runtime", "sbin", "tmp", "usr", "view"},
        "root listing " + ",".join(seen))
verdict(sorted(os.listdir("/view")) == ["train", "val"], "splits " + ",".join(os.listdir("/view")))
verdict(os.listdir("/etc") == ["ld.so.cache"], "etc " + ",".join(os.listdir("/etc")))
"""
    detail = blocked(node, body)
    assert host_secrets.token not in detail


def test_host_environment_is_invisible(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "RAPHA-ENV-" + os.urandom(6).hex()
    monkeypatch.setenv("RAPHA_ATTACK_SECRET", secret)
    detail = blocked(
        node,
        f"""
        env = dict(os.environ)
        verdict({secret!r} not in repr(env), "environment")
        allowed = {{"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "USER", "LOGNAME", "PYTHONHASHSEED",
                   "PYTHONDONTWRITEBYTECODE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                   "OPENBLAS_NUM_THREADS", "PWD"}}
        verdict(set(env) <= allowed, "env keys " + ",".join(sorted(set(env) - allowed)))
        verdict(os.getuid() != 0, "uid " + str(os.getuid()))
        """,
    )
    assert secret not in detail


def test_writes_outside_the_output_directory_fail(node: Node, host_secrets: Secrets) -> None:
    targets = [
        "/bundle/evil.py",
        "/view/train/evil",
        "/usr/evil",
        "/evil",
        "/etc/evil",
        str(host_secrets.root / "evil"),
        str(node.view.view / "evil"),
    ]
    body = ""
    for target in targets:
        body += f"""
try:
    open({target!r}, "w").write("x")
    verdict(False, "wrote " + {target!r})
except OSError as exc:
    verdict(True, "write " + type(exc).__name__)
"""
    blocked(node, body)
    assert not (host_secrets.root / "evil").exists()
    assert not (node.view.view / "evil").exists()
    assert not Path("/evil").exists()
    assert not (node.view.view / "train" / "evil").exists()


@pytest.mark.parametrize("target", ["/tmp", "/out"])
def test_filling_scratch_space_hits_its_cap(node: Node, target: str) -> None:
    blocked(
        node,
        f"""
        import errno
        written = 0
        chunk = b"x" * (1 << 20)
        try:
            with open("{target}/fill", "wb") as fh:
                for _ in range(64):
                    fh.write(chunk)
                    fh.flush()
                    written += len(chunk)
            verdict(False, "wrote 64 MiB into {target}")
        except OSError as exc:
            verdict(exc.errno in (errno.ENOSPC, errno.EFBIG), "fill " + str(exc.errno))
        """,
        tmp_bytes=8 << 20,
        output_bytes=8 << 20,
    )


# --- resources and lifetime ------------------------------------------------------------------


def test_a_fork_bomb_is_capped(node: Node) -> None:
    blocked(
        node,
        """
        import time
        children = []
        try:
            for _ in range(10000):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                children.append(pid)
            verdict(False, "forked 10000 processes")
        except OSError as exc:
            verdict(len(children) < 100, "fork stopped at " + str(len(children)))
        """,
        processes=64,
    )
    assert no_sandbox_processes()


def test_a_memory_bomb_is_capped(node: Node) -> None:
    # Either the address-space limit refuses the allocation (MemoryError) or the cgroup's
    # memory limit kills the tree first; both stop it, and the node stays healthy.
    with pytest.raises(JobError) as info:
        node.run(
            textwrap.dedent(
                """
        hoard = []
        try:
            for _ in range(64):
                hoard.append(bytearray(256 << 20))  # 16 GiB in all
            verdict(False, "allocated 16 GiB")
        except MemoryError:
            verdict(True, "memory capped at " + str(len(hoard) * 256) + " MiB")
        raise SystemExit(3)
        """
            ),
            limits=attack_limits(address_space=6 << 30, memory=2 << 30),
        )
    assert "ATTACK escaped" not in info.value.detail
    assert "ATTACK blocked" in info.value.detail or info.value.code == "killed"


def test_an_infinite_loop_is_killed_at_the_wall_clock(node: Node) -> None:
    with pytest.raises(JobError) as info:
        node.run("while True:\n    pass\n", limits=attack_limits(wall_seconds=20))
    assert info.value.code == "timeout"
    assert no_sandbox_processes()


def test_no_process_outlives_the_job(node: Node) -> None:
    blocked(
        node,
        """
        import subprocess
        subprocess.Popen(["/usr/bin/sleep", "600"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                import time
                time.sleep(600)
            os._exit(0)
        verdict(True, "left two sleepers behind")
        """,
    )
    assert no_sandbox_processes()


# --- system calls ---------------------------------------------------------------------------


def test_dangerous_system_calls_are_refused(node: Node) -> None:
    blocked(
        node,
        """
        import ctypes, errno, struct
        libc = ctypes.CDLL(None, use_errno=True)
        def refused(name, rc):
            err = ctypes.get_errno()
            verdict(rc == -1 and err in (errno.EPERM, errno.ENOSYS), name + " " + str(err))
        refused("ptrace", libc.ptrace(0, 0, None, None))
        refused("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        refused("setns", libc.setns(fd, 0))
        refused("unshare", libc.unshare(0x10000000))
        # clone3 with CLONE_NEWUSER | CLONE_NEWNET: struct clone_args, 88 bytes
        args = ctypes.create_string_buffer(struct.pack("<11Q", 0x10000000 | 0x40000000,
                                                       0, 0, 0, 17, 0, 0, 0, 0, 0, 0), 88)
        refused("clone3", libc.syscall(435, args, 88))
        refused("clone-newns", libc.syscall(56, 0x00020000 | 17, 0, 0, 0, 0))
        params = ctypes.create_string_buffer(120)
        refused("io_uring_setup", libc.syscall(425, 8, params))
        refused("bpf", libc.syscall(321, 0, None, 0))
        refused("userfaultfd", libc.syscall(323, 0))
        refused("keyctl", libc.syscall(250, 0, 0, 0, 0, 0))
        """,
    )
