"""A real PostgreSQL (Debian's ``postgresql`` package) on loopback, for the hub's tests.

:func:`start_postgres` creates a throwaway cluster, starts ``postgres`` on a free 127.0.0.1
port, waits until it accepts a password login and creates one database; the returned
:class:`PostgresServer` stops the server and deletes the cluster on :meth:`PostgresServer.stop`
or at the end of a ``with`` block, so no process and no file of it is left.

PostgreSQL refuses to run as root. Run as root (as CI and the dev machines are), the helper
runs ``initdb`` and ``postgres`` as the dedicated system user :data:`SERVICE_USER`, created
on first use with ``useradd --system`` (no home, no login shell). The child drops to that uid
and gid, with no supplementary groups, before ``exec`` (``subprocess.Popen(user=…)``), so the
PID we hold is the postmaster itself, not a ``runuser``/``su`` wrapper that might swallow
signals. Run as any other user, the helper runs the server as that user.

The cluster lives in a fresh ``rapha-pg-*`` directory under the system temporary directory
(``/tmp``), not under the caller's ``workdir``: pytest's directories under
``/tmp/pytest-of-root`` are mode 0700 and owned by root, so the service user could not reach
a data directory there, and their long paths would overflow the 107-byte limit of the Unix
socket path. The ``rapha-pg-*`` directory is mode 0700 and owned by the server's user; only
``/tmp`` (1777) has to be traversable. The server's log is written to ``workdir/postgres.log``
through a file descriptor the parent opens, so the log survives the cluster for post-mortems.

The cluster is for tests only: a random password, SCRAM-SHA-256 for every login (TCP and
socket), and ``fsync``, ``full_page_writes`` and ``synchronous_commit`` off, which trades
crash safety for speed: a crash loses the cluster, which is deleted anyway.

:func:`postgres_or_skip` wraps that for fixtures: without PostgreSQL (or ``psycopg``) the
tests skip, except under ``CI=true``, where they fail: CI must not silently lose PostgreSQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from support.orthanc import free_port
from support.required import skip_or_fail

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "SERVICE_USER",
    "PostgresServer",
    "ensure_service_user",
    "postgres_bindir",
    "postgres_or_skip",
    "start_postgres",
]

SERVICE_USER = "rapha-pg"
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_TOOLS = ("initdb", "postgres")
_ROLE = "rapha"
_DATABASE = "rapha"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_USER_LOCK = Path("/run/rapha-pg-useradd.lock")


@dataclass(frozen=True)
class _RunAs:
    """Who the server processes run as; ``uid is None`` means "as we are"."""

    name: str
    uid: int | None = None
    gid: int | None = None

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or ``None``.

    Debian installs the server binaries under ``/usr/lib/postgresql/<major>/bin`` (only the
    client wrappers are on PATH); the newest major there wins, else the directory of an
    ``initdb`` found on PATH (symlinks resolved), as other distributions install it.
    """
    candidates: list[Path] = []
    if _DEBIAN_ROOT.is_dir():
        majors = [p for p in _DEBIAN_ROOT.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(majors, key=lambda p: int(p.name), reverse=True)]
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in _TOOLS):
            return folder
    return None


def ensure_service_user(name: str = SERVICE_USER) -> pwd.struct_passwd:
    """The system user ``name``, created with ``useradd --system`` when it does not exist.

    Idempotent, and safe when several processes (pytest-xdist workers) race: concurrent
    ``useradd`` runs were seen to overwrite each other's ``/etc/passwd`` (both "succeed",
    one entry is lost), so creation is serialised by ``flock`` on a file in ``/run``, which
    only root can write, and the user is looked up again under the lock. Only root may
    call this.
    """
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    command = [useradd, "--system", "--user-group", "--no-create-home"]
    command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
    command += ["--comment", "Rapha test PostgreSQL", name]
    with _USER_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
        result = subprocess.run(  # a fixed system tool, a fixed user name
            command, capture_output=True, text=True, timeout=60, check=False
        )
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(
                f"could not create the system user {name!r} (useradd exited with code "
                f"{result.returncode}: {result.stderr.strip()}); create it by hand with: "
                f"{' '.join(command)}"
            ) from None


def _check_traversable(directory: Path) -> None:
    """Raise unless every ancestor of ``directory`` lets other users pass (``o+x``)."""
    for parent in directory.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{parent} is not traversable by other users, so {SERVICE_USER} cannot reach "
                f"a cluster under {directory}: point TMPDIR at a directory like /tmp"
            )


def _parent(pid: int) -> int | None:
    """The parent PID of ``pid`` from ``/proc``, or ``None`` when it is gone."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(line.rsplit(")", 1)[1].split()[1])


class PostgresServer:
    """A running postmaster (in a session of its own) and its throwaway cluster.

    ``url`` is the SQLAlchemy URL (``postgresql+psycopg://…``) of the database created at
    start; :meth:`url_for` names any other database of the cluster. ``os_user`` is the
    system user the server runs as; ``startup_seconds`` how long ``initdb`` plus start-up
    took.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        port: int,
        password: str,
        cluster: Path,
        log: Path,
        os_user: str,
    ) -> None:
        self._process = process
        self.port = port
        self.user = _ROLE
        self.password = password
        self.database = _DATABASE
        self.cluster = cluster
        self.os_user = os_user
        self._log = log
        self.startup_seconds = 0.0

    @property
    def pid(self) -> int:
        """The postmaster's PID."""
        return self._process.pid

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    @property
    def log(self) -> str:
        """What the server printed (stderr and stdout)."""
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def url_for(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server (psycopg 3 driver)."""
        _check_name(database)
        return (
            f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{database}"
        )

    def processes(self) -> list[int]:
        """PIDs of the postmaster and its children (backends, checkpointer …) while it runs.

        By parent, not by process group: every postmaster child calls ``setsid()``.
        """
        if self._process.poll() is not None:
            return []
        pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
        return [self.pid, *sorted(pid for pid in pids if _parent(pid) == self.pid)]

    def _connect(
        self, database: str = "postgres", timeout: float = 5.0
    ) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=max(1, round(timeout)),
            autocommit=True,
        )

    def create_database(self, name: str) -> str:
        """Create the empty database ``name``; return its SQLAlchemy URL."""
        from psycopg import sql

        _check_name(name)
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting any session still on it (``WITH (FORCE)``)."""
        from psycopg import sql

        _check_name(name)
        with self._connect() as conn:
            statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(statement.format(sql.Identifier(name)))

    def stop(self) -> None:
        """Stop the server and delete the cluster directory.

        SIGINT is PostgreSQL's "fast" shutdown (roll back, disconnect clients, checkpoint);
        the postmaster exits only after all its children. If it has not within 10 s, SIGQUIT
        ("immediate" shutdown), then SIGKILL to the postmaster and each child it had: they
        are listed while the postmaster is still unreaped, so no PID has been reused.
        """
        for sig in (signal.SIGINT, signal.SIGQUIT):
            if self._process.poll() is not None:
                break
            self._process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=_STOP_TIMEOUT_S)
        if self._process.poll() is None:
            for pid in reversed(self.processes()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._process.wait(timeout=_STOP_TIMEOUT_S)
        shutil.rmtree(self.cluster, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a plain PostgreSQL name (a-z, 0-9, _; 63 at most): {name!r}")


def _initdb(
    bindir: Path, cluster: Path, run_as: _RunAs, password: str, env: dict[str, str]
) -> None:
    pwfile = cluster / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if run_as.uid is not None:
        os.chown(pwfile, run_as.uid, -1)
    command = [str(bindir / "initdb"), "--pgdata", str(cluster / "data"), "--username", _ROLE]
    command += ["--pwfile", str(pwfile), "--auth", "scram-sha-256", "--encoding", "UTF8"]
    command += ["--locale", "C", "--no-sync", "--no-instructions"]
    try:
        result = subprocess.run(  # the distribution's initdb, arguments we built
            command,
            capture_output=True,
            cwd=cluster,
            env=env,
            timeout=120,
            check=False,
            umask=0o077,
            **run_as.popen_kwargs(),
        )
    finally:
        pwfile.unlink()
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise RuntimeError(f"initdb failed (code {result.returncode}):\n{output[-3000:]}")


def _wait_until_ready(server: PostgresServer, process: subprocess.Popen[bytes]) -> bool:
    """``True`` once a password login succeeds, ``False`` if the server exited first."""
    import psycopg

    deadline = time.monotonic() + _START_TIMEOUT_S
    while process.poll() is None:
        try:
            with server._connect(timeout=2):
                return True
        except psycopg.OperationalError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"PostgreSQL did not accept logins within 30 s:\n{server.log}")
        time.sleep(0.05)
    return False


def start_postgres(bindir: Path, workdir: Path) -> PostgresServer:
    """Create a test cluster with ``bindir``'s tools and serve it on a free loopback port.

    As root the server runs as :data:`SERVICE_USER` (created if missing). Raises
    ``RuntimeError`` with PostgreSQL's output when ``initdb`` fails or the server does not
    come up within 30 s.
    """
    started = time.monotonic()
    if os.geteuid() == 0:
        entry = ensure_service_user()
        run_as = _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    else:
        run_as = _RunAs(pwd.getpwuid(os.geteuid()).pw_name)
    base = Path(tempfile.gettempdir())
    _check_traversable(base / "x")
    cluster = Path(tempfile.mkdtemp(prefix="rapha-pg-", dir=base))
    server: PostgresServer | None = None
    try:
        if run_as.uid is not None:
            os.chown(cluster, run_as.uid, run_as.gid if run_as.gid is not None else -1)
        # TZ set: initdb otherwise probes /usr/share/zoneinfo for the system's zone (slow).
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C"}
        env |= {"TZ": "UTC", "HOME": str(cluster)}
        password = secrets.token_hex(24)
        _initdb(bindir, cluster, run_as, password, env)
        log_path = workdir / "postgres.log"
        for _ in range(3):  # another process may take the port between probe and bind
            port = free_port()
            command = [str(bindir / "postgres"), "-D", str(cluster / "data"), "-p", str(port)]
            for setting in (
                "listen_addresses=127.0.0.1",
                f"unix_socket_directories={cluster}",
                "fsync=off",
                "full_page_writes=off",
                "synchronous_commit=off",
            ):
                command += ["-c", setting]
            with log_path.open("ab") as log:
                process = subprocess.Popen(  # the distribution's postgres, loopback only
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cluster,
                    env=env,
                    start_new_session=True,
                    umask=0o077,
                    **run_as.popen_kwargs(),
                )
            server = PostgresServer(
                process,
                port=port,
                password=password,
                cluster=cluster,
                log=log_path,
                os_user=run_as.name,
            )
            if _wait_until_ready(server, process):
                server.create_database(_DATABASE)
                server.startup_seconds = time.monotonic() - started
                return server
        raise RuntimeError(f"PostgreSQL exited at start-up:\n{log_path.read_text()[-3000:]}")
    except BaseException:
        if server is not None:
            server.stop()
        shutil.rmtree(cluster, ignore_errors=True)
        raise


def _skip_or_fail(reason: str) -> NoReturn:
    skip_or_fail(reason, ci_must="run the hub's database suite on a real PostgreSQL")


@contextmanager
def postgres_or_skip(workdir: Path) -> Iterator[PostgresServer]:
    """A running PostgreSQL, stopped and deleted on exit. Without the server binaries or
    psycopg the caller's tests skip, or fail when the environment says ``CI=true``."""
    bindir = postgres_bindir()
    if bindir is None:
        _skip_or_fail(
            "PostgreSQL server binaries (initdb, postgres) not found: install the Debian "
            "package postgresql (scripts/install-system-deps)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        _skip_or_fail(f"psycopg is not usable ({exc}): install rapha[hub]")
    with start_postgres(bindir, Path(workdir)) as server:
        yield server
