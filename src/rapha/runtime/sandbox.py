"""The sandbox: one bubblewrap process tree per job, for untrusted model code.

Trust boundary 2 of DESIGN.md. Every rule is enforced by the kernel, not by the code that
runs inside:

* **identity**: bwrap is started as a dedicated unprivileged host uid (:data:`SANDBOX_UID`
  by default), never as root. As root, even inside a fresh user namespace, a process still
  reads root-owned 0600 files; as the dedicated uid it reads only what the binds expose
  and what is world-readable there. A node that is not root runs the sandbox as its own
  (unprivileged) uid and cannot cap scratch space with tmpfs (see :meth:`Workspace.scratch`).
* **namespaces**: new user, PID, IPC, UTS, cgroup and network namespaces; the network one
  has only loopback, so nothing can be reached, not even the host's loopback.
* **filesystem**: a fresh root holding only read-only binds of ``/usr`` (and the
  ``/lib*``, ``/bin``, ``/sbin`` links or directories), the runtime's Python packages (at
  fixed ``/runtime/N`` paths, so the host's layout stays hidden), and what the job passes
  (its inputs, the bundle, the job spec), plus ``/proc``, a minimal ``/dev``, and the
  writable scratch directories. ``/`` is never bound.
* **scratch**: ``/tmp`` and the output directory are host tmpfs mounts capped by size
  (:meth:`Workspace.scratch`), owned by the sandbox uid; inputs are staged into a
  workspace the sandbox uid can traverse (:meth:`Sandbox.workspace`);
* **environment**: ``--clearenv`` and only :data:`ENVIRONMENT` (plus thread counts);
* **lifetime**: ``--die-with-parent``, ``--new-session``, a wall-clock timeout on the
  whole tree (SIGKILL to the process group; the PID namespace dies with its init), and a
  check afterwards that no process of the sandbox uid is left;
* **limits**: ``RLIMIT_AS``, ``RLIMIT_CPU``, ``RLIMIT_NOFILE``, ``RLIMIT_FSIZE``, core
  dumps off, processes capped by the cgroup pids controller where present and always by
  ``RLIMIT_NPROC`` on the dedicated uid, memory by the cgroup memory controller where the
  host allows (:mod:`rapha.runtime._cgroup`);
* **seccomp**: :func:`rapha.runtime.seccomp.build_filter`.

If bwrap is missing, or user namespaces are not available, :meth:`Sandbox.ensure_available`
raises :class:`~rapha.errors.DependencyError` saying why. There is no fallback that runs
untrusted code unsandboxed.

Model code talks to the node over exactly one inherited pipe (its fd number is passed in
the argv, see :data:`PROGRESS_FD_ARG`), carrying numbers-only progress events
(:mod:`rapha.runtime.progress`); its stderr is kept (the last :data:`STDERR_TAIL` bytes)
for ``dry-run``, which shows it in full.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import rapha
from rapha.errors import DependencyError, SandboxError, UsageError
from rapha.runtime import _cgroup
from rapha.runtime.progress import ProgressEvent, ProgressReader
from rapha.runtime.seccomp import build_filter

__all__ = [
    "ENVIRONMENT",
    "PROGRESS_FD_ARG",
    "SANDBOX_UID",
    "STDERR_TAIL",
    "UID_POOL",
    "Bind",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "Workspace",
    "default_python",
]

SANDBOX_UID: Final = 61000
"""The first of the dedicated host uids (and gids) sandboxes run as; no accounts needed."""
UID_POOL: Final = 64
"""How many uids from :data:`SANDBOX_UID` on: one per concurrent run on a host."""
PROGRESS_FD_ARG: Final = "{progress_fd}"
"""In an argv given to :meth:`Sandbox.run`, replaced by the progress pipe's fd number."""
STDERR_TAIL: Final = 256 << 10
ENVIRONMENT: Final[Mapping[str, str]] = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",  # noqa: S108 - the sandbox's own private tmpfs
    "TMPDIR": "/tmp",  # noqa: S108
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    # The sandbox's uid has no passwd entry; getpass.getuser() (MONAI calls it on import)
    # reads these first instead of failing on getpwuid().
    "USER": "sandbox",
    "LOGNAME": "sandbox",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
}
"""The whole environment model code sees, besides the thread counts."""
_THREAD_VARS: Final = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_ROOT_LINKS: Final = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_MS_NOSUID: Final = 2
_MS_NODEV: Final = 4
_MNT_DETACH: Final = 2
RUNTIME_ROOT: Final = "/runtime"
"""Where the runtime's package directories appear inside the sandbox."""
_BOOT: Final = (
    "import sys; sys.path[:0] = sys.argv[1].split(':'); "
    "from rapha.runtime.harness import main; sys.exit(main(sys.argv[2:]))"
)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox run. Sizes in bytes, times in seconds."""

    wall_seconds: float = 6 * 3600.0
    cpu_seconds: int = 24 * 3600
    address_space: int = 32 << 30
    memory: int = 12 << 30
    open_files: int = 512
    processes: int = 512
    tmp_bytes: int = 1 << 30
    output_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int | float) or value <= 0:
                raise UsageError(f"sandbox limit {name} must be a positive number")


@dataclass(frozen=True)
class Bind:
    """A host path made visible at ``target`` inside; read-only unless ``writable``."""

    source: Path
    target: str
    writable: bool = False

    def __post_init__(self) -> None:
        if not self.target.startswith("/") or self.target == "/" or ".." in self.target:
            raise UsageError("a sandbox bind target must be an absolute path below /")
        if Path(self.source).resolve() == Path("/"):
            raise UsageError("the host's / is never bound into a sandbox")


@dataclass(frozen=True)
class SandboxResult:
    """How one run ended. ``stderr`` is the last :data:`STDERR_TAIL` bytes, decoded."""

    returncode: int
    timed_out: bool
    wall_seconds: float
    stderr: str
    events: int
    peak_memory_bytes: int | None
    leftover_processes: int
    limits: SandboxLimits = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def default_python() -> Path:
    """The interpreter sandboxes run: the system's ``python3.X`` of this minor version.

    It lives under ``/usr`` (bound read-only), so the sandbox uid can run it wherever the
    node's own interpreter is installed (a ``pyenv`` under ``/root`` is not readable by
    it); the same minor version keeps the runtime's compiled packages loadable.
    """
    candidate = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if candidate.is_file():
        return candidate
    return Path(sys.executable)


def _python_paths() -> list[str]:
    """The runtime's package directories: site-packages, and Rapha's own if outside it."""
    paths: list[str] = []
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    package_root = str(Path(rapha.__file__).resolve().parent.parent)
    if not any(package_root.startswith(p) for p in paths):
        paths.append(package_root)
    return paths


def _runtime_binds() -> list[Bind]:
    """The runtime's package directories, each mounted at a fixed ``/runtime/N``.

    Fixed targets keep the host's layout (where the node is checked out or installed)
    out of the sandbox: model code sees ``/runtime``, never the host path.
    """
    return [Bind(Path(p), f"{RUNTIME_ROOT}/{i}") for i, p in enumerate(_python_paths())]


class Sandbox:
    """Runs commands in bubblewrap under one fixed profile (see the module docstring)."""

    def __init__(
        self,
        *,
        bwrap: Path = Path("/usr/bin/bwrap"),
        python: Path | None = None,
        uid: int = SANDBOX_UID,
        limits: SandboxLimits | None = None,
        threads: int | None = None,
        staging_root: Path | None = None,
        uid_pool: int = UID_POOL,
    ) -> None:
        if uid <= 0:
            raise UsageError("the sandbox uid must be a dedicated unprivileged uid, never 0")
        self.bwrap = Path(bwrap)
        self.python = Path(python) if python is not None else default_python()
        self.limits = limits or SandboxLimits()
        self.threads = threads or max(1, len(os.sched_getaffinity(0)))
        self.uid = uid if os.geteuid() == 0 else os.geteuid()
        self.uid_pool = uid_pool if os.geteuid() == 0 else 1
        self.staging_root = Path(staging_root or Path(tempfile.gettempdir()) / "rapha-sandbox")
        self._filter = build_filter()
        self._checked = False

    # --- what the node's measurement covers ----------------------------------------------

    def profile(self) -> dict[str, Any]:
        """The profile as data: bwrap arguments (inputs as placeholders), seccomp, limits."""
        return {
            "bwrap_args": self._base_args(),
            "python_paths": _python_paths(),
            "seccomp_sha256": self._filter.digest,
            "seccomp_arch": self._filter.arch,
            "environment": dict(ENVIRONMENT),
            "limits": asdict(self.limits),
            "uids": [self.uid, self.uid + self.uid_pool - 1],
        }

    # --- refusal ---------------------------------------------------------------------------

    def ensure_available(self) -> None:
        """Prove that bwrap runs here with user and network namespaces, or refuse.

        Raises:
            DependencyError: bwrap is missing or cannot create the namespaces; untrusted
                code is then never run.
        """
        if self._checked:
            return
        if not (self.bwrap.is_file() and os.access(self.bwrap, os.X_OK)):
            raise DependencyError(
                f"the sandbox binary {self.bwrap} is missing or not executable; untrusted "
                "model code is never run without a sandbox. Install bubblewrap "
                "(apt-get install bubblewrap) or fix [sandbox] bwrap in node.toml"
            )
        if not self.python.is_file():
            raise DependencyError(
                f"the sandbox interpreter {self.python} is missing; install python3.11 "
                "from Debian (apt-get install python3.11)"
            )
        probe = [str(self.bwrap), *self._namespace_args(), *self._root_args(), "/usr/bin/true"]
        try:
            with self._lease() as uid:
                done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                    probe,
                    capture_output=True,
                    timeout=30,
                    check=False,
                    preexec_fn=lambda: _drop_identity(uid),
                )
        except (OSError, subprocess.SubprocessError) as exc:
            raise DependencyError(f"the sandbox binary {self.bwrap} cannot be run") from exc
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise DependencyError(
                "bubblewrap cannot create the sandbox's user and network namespaces here "
                f"({why[-1] if why else 'no reason given'}); untrusted model code is never "
                "run without them. Enable unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0)"
            )
        self._checked = True

    # --- staging and scratch space -------------------------------------------------------

    @contextlib.contextmanager
    def workspace(self) -> Iterator[Workspace]:
        """A fresh staging directory the sandbox uid can traverse, removed on exit.

        Bind sources must be reachable by the sandbox uid (bwrap binds as that uid), and a
        node's own directories are usually not (``0700``). Inputs are staged here
        (:meth:`Workspace.stage`) and scratch space is mounted here
        (:meth:`Workspace.scratch`); everything is unmounted and removed on exit.
        """
        with self._lease() as uid:
            root = Path(tempfile.mkdtemp(prefix="job-", dir=self.staging_root))
            root.chmod(0o711)
            ws = Workspace(root, self, uid)
            try:
                yield ws
            finally:
                ws.close()

    @contextlib.contextmanager
    def _lease(self) -> Iterator[int]:
        """A uid of the pool that no other run on this host holds, for as long as needed.

        Each concurrent run gets its own uid, so ``RLIMIT_NPROC`` counts only its own
        processes and the leftover check after a run can never touch another job's tree.
        """
        root = self.staging_root
        root.mkdir(parents=True, exist_ok=True)
        st = root.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise SandboxError(f"{root} is not a directory owned by the node; remove it")
        root.chmod(0o711)
        if self.uid_pool == 1:
            yield self.uid
            return
        for uid in range(self.uid, self.uid + self.uid_pool):
            fd = os.open(root / f".uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)
            return
        raise SandboxError(f"all {self.uid_pool} sandbox uids are in use; wait for a job to finish")

    # --- running ---------------------------------------------------------------------------

    def run_harness(
        self,
        args: Sequence[str],
        *,
        binds: Sequence[Bind],
        on_event: Callable[[ProgressEvent], None] | None = None,
        uid: int | None = None,
    ) -> SandboxResult:
        """Run ``rapha.runtime.harness`` inside with ``args`` (see :meth:`run`)."""
        paths = ":".join(b.target for b in _runtime_binds())
        argv = [str(self.python), "-I", "-S", "-B", "-c", _BOOT, paths]
        argv += [*args, "--progress-fd", PROGRESS_FD_ARG]
        return self.run(argv, binds=binds, on_event=on_event, uid=uid)

    def run(
        self,
        argv: Sequence[str],
        *,
        binds: Sequence[Bind],
        on_event: Callable[[ProgressEvent], None] | None = None,
        uid: int | None = None,
    ) -> SandboxResult:
        """Run ``argv`` inside a new sandbox and wait for the whole tree to end.

        Progress events are parsed (untrusted input) and passed to ``on_event`` as they
        arrive, at most one a second. The run is killed at the wall-clock limit. ``uid``
        is the workspace's leased uid (:meth:`Workspace.run_harness` passes it); without
        one, a uid is leased for this run alone.

        Raises:
            DependencyError: no usable sandbox (nothing was run).
            SandboxError: the sandbox could not be started.
        """
        self.ensure_available()
        if uid is None:
            with self._lease() as leased:
                return self.run(argv, binds=binds, on_event=on_event, uid=leased)
        targets = [b.target for b in binds]
        if len(set(targets)) != len(targets):
            raise UsageError("two sandbox binds share a target")
        read_end, write_end = os.pipe()
        seccomp = _sealed_file(self._filter.program)
        cmd = [str(self.bwrap), *self._base_args(), "--seccomp", str(seccomp)]
        runtime = _runtime_binds()
        if any(Path(b.target).is_relative_to(RUNTIME_ROOT) for b in binds):
            raise UsageError(f"sandbox binds may not target {RUNTIME_ROOT}")
        # Parents before children, so no bind is hidden by a later one on its parent.
        for bind in sorted([*runtime, *binds], key=lambda b: len(Path(b.target).parts)):
            flag = "--bind" if bind.writable else "--ro-bind"
            cmd += [flag, str(Path(bind.source).resolve()), bind.target]
        # The fresh root itself (a tmpfs) becomes read-only: only /out and /tmp are writable.
        cmd += ["--remount-ro", "/", "--chdir", "/", "--"]
        cmd += [a.replace(PROGRESS_FD_ARG, str(write_end)) for a in argv]
        cgroup = _cgroup.create(self.limits.memory, self.limits.processes)
        started = time.monotonic()
        try:
            proc = self._spawn(cmd, seccomp, write_end, cgroup, uid)
        finally:
            os.close(write_end)
            os.close(seccomp)
        try:
            timed_out, stderr, events = self._wait(proc, read_end, started, on_event)
        finally:
            os.close(read_end)
            if proc.stderr is not None:
                proc.stderr.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            peak = cgroup.peak_memory() if cgroup is not None else None
            if cgroup is not None:
                cgroup.destroy()
            leftover = self._reap_leftovers(uid)
        return SandboxResult(
            returncode=proc.returncode,
            timed_out=timed_out,
            wall_seconds=time.monotonic() - started,
            stderr=stderr.decode("utf-8", "replace"),
            events=events,
            peak_memory_bytes=peak if peak is not None else _children_peak_rss(),
            leftover_processes=leftover,
            limits=self.limits,
        )

    # --- internals -------------------------------------------------------------------------

    def _namespace_args(self) -> list[str]:
        return [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--cap-drop",
            "ALL",
        ]

    def _root_args(self) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for link in _ROOT_LINKS:
            path = Path(link)
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), link]
            elif path.is_dir():
                args += ["--ro-bind", link, link]
        if Path("/etc/ld.so.cache").is_file():
            args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        return args

    def _base_args(self) -> list[str]:
        args = [*self._namespace_args(), "--hostname", "sandbox", *self._root_args()]
        python_home = str(self.python.resolve().parent.parent)
        if not python_home.startswith("/usr"):  # a node whose interpreter lives elsewhere
            args += ["--ro-bind", python_home, python_home]
        args += ["--proc", "/proc", "--dev", "/dev"]
        for key, value in ENVIRONMENT.items():
            args += ["--setenv", key, value]
        for key in _THREAD_VARS:
            args += ["--setenv", key, str(self.threads)]
        return args

    def _spawn(
        self,
        cmd: list[str],
        seccomp: int,
        write_end: int,
        cgroup: _cgroup.Cgroup | None,
        uid: int,
    ) -> subprocess.Popen[bytes]:
        limits = self.limits
        rlimits = [
            (resource.RLIMIT_AS, limits.address_space),
            (resource.RLIMIT_CPU, limits.cpu_seconds),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_FSIZE, max(limits.output_bytes, limits.tmp_bytes)),
            (resource.RLIMIT_NPROC, limits.processes),
        ]
        procs_files = cgroup.procs_files if cgroup is not None else ()

        def child() -> None:
            for procs in procs_files:
                with open(procs, "w") as fh:
                    fh.write(str(os.getpid()))
            for kind, value in rlimits:
                resource.setrlimit(kind, (value, value))
            _drop_identity(uid)

        try:
            return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(seccomp, write_end),
                start_new_session=True,
                preexec_fn=child,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxError("the sandbox could not be started") from exc

    def _wait(
        self,
        proc: subprocess.Popen[bytes],
        progress_fd: int,
        started: float,
        on_event: Callable[[ProgressEvent], None] | None,
    ) -> tuple[bool, bytes, int]:
        assert proc.stderr is not None
        reader = ProgressReader()
        tail = bytearray()
        open_fds = {progress_fd, proc.stderr.fileno()}
        deadline = started + self.limits.wall_seconds
        events = 0
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return True, bytes(tail[-STDERR_TAIL:]), events
            ready, _, _ = select.select(list(open_fds), [], [], min(left, 1.0))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                elif fd == progress_fd:
                    for event in reader.feed(chunk, now=time.monotonic()):
                        events += 1
                        if on_event is not None:
                            on_event(event)
                else:
                    tail += chunk
                    del tail[:-STDERR_TAIL]
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                return True, bytes(tail), events
            time.sleep(0.02)
        return False, bytes(tail), events

    def _reap_leftovers(self, uid: int) -> int:
        """Count, then kill, processes of the sandbox uid still alive after the run.

        When bwrap's init ends, the kernel kills the rest of the PID namespace; those
        processes may take a moment to go, so they get a grace period before they count.
        """
        if uid == os.getuid():
            return 0  # a non-root node runs sandboxes as itself; the PID namespace reaps them
        deadline = time.monotonic() + 5.0
        pids = _processes_of(uid)
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = _processes_of(uid)
        for _ in range(3):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(0.05)
            pids = _processes_of(uid)
        return len(pids)


class Workspace:
    """One job's staging directory and leased uid (see :meth:`Sandbox.workspace`)."""

    def __init__(self, root: Path, sandbox: Sandbox, uid: int) -> None:
        self.root = root
        self.uid = uid
        self._sandbox = sandbox
        self._mounts: list[Path] = []

    def run_harness(
        self,
        args: Sequence[str],
        *,
        binds: Sequence[Bind],
        on_event: Callable[[ProgressEvent], None] | None = None,
    ) -> SandboxResult:
        """:meth:`Sandbox.run_harness` as this workspace's uid (its scratch is its own)."""
        return self._sandbox.run_harness(args, binds=binds, on_event=on_event, uid=self.uid)

    def stage(self, source: Path, name: str) -> Path:
        """A read-only-for-the-sandbox copy of file or directory ``source`` under ``name``.

        World-readable files are hard-linked when they share the file system (free for
        large image arrays), others copied; directories are recreated. Links and special
        files are refused.
        """
        if "/" in name or name in ("", ".", ".."):
            raise UsageError("a staged name is one path component")
        target = self.root / name
        _stage(Path(source), target)
        return target

    def path(self, name: str) -> Path:
        """A new world-traversable directory ``name`` for inputs the node writes itself."""
        target = self.root / name
        target.mkdir(mode=0o755)
        target.chmod(0o755)
        return target

    def scratch(self, name: str, size: int) -> Path:
        """A directory the sandbox may write ``size`` bytes into.

        As root it is a tmpfs of that size owned by the sandbox uid, unmounted (and so
        emptied) when the workspace closes; otherwise a plain directory, where only
        ``RLIMIT_FSIZE`` bounds each file. Read what you need before the workspace closes.
        """
        path = self.root / name
        path.mkdir()
        if os.geteuid() == 0:
            _mount_tmpfs(
                path, size=size, uid=self.uid, gid=self.uid if os.geteuid() == 0 else os.getegid()
            )
            self._mounts.append(path)
        else:
            path.chmod(0o700)
        return path

    def close(self) -> None:
        for path in reversed(self._mounts):
            _umount(path)
        self._mounts.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _stage(source: Path, target: Path) -> None:
    st = source.lstat()
    if stat.S_ISDIR(st.st_mode):
        target.mkdir(mode=0o755)
        target.chmod(0o755)
        for child in sorted(source.iterdir()):
            _stage(child, target / child.name)
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{source} is not a regular file; only plain files are staged")
    if st.st_mode & 0o004 and st.st_uid == os.geteuid():
        try:
            os.link(source, target, follow_symlinks=False)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copyfile(source, target, follow_symlinks=False)
    target.chmod(0o644)


def _drop_identity(uid: int) -> None:
    """In the child, before exec: no core dumps, then the leased uid (when root)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                if int(line.split()[1]) == uid:
                    pids.append(int(entry.name))
                break
    return pids


def _children_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _sealed_file(data: bytes) -> int:
    """An fd positioned at the start of ``data`` (memfd where the kernel has it)."""
    try:
        fd = os.memfd_create("rapha-seccomp", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        handle, name = tempfile.mkstemp(prefix="rapha-seccomp-")
        os.unlink(name)
        fd = handle
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount_tmpfs(path: Path, *, size: int, uid: int, gid: int) -> None:
    options = f"size={size},nr_inodes=65536,mode=0700,uid={uid},gid={gid}".encode()
    rc = _libc().mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options)
    if rc != 0:
        errno = ctypes.get_errno()
        raise SandboxError(
            f"cannot mount a size-capped tmpfs for the sandbox at {path} "
            f"({os.strerror(errno)}); the node needs CAP_SYS_ADMIN (run it as root)"
        )


def _umount(path: Path) -> None:
    _libc().umount2(os.fsencode(path), _MNT_DETACH)
