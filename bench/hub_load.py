"""The hub under load on PostgreSQL, in two uvicorn processes, against a bare FastAPI app.

Both apps are served the same way in the same run: two uvicorn processes (asyncio loop,
h11) on one loopback port, each with its own ``SO_REUSEPORT`` socket (:func:`serve_one`).
Not ``uvicorn --workers 2``: its sockets keep Nagle's algorithm on, so every keep-alive
response waits ~40 ms for the client's delayed ACK (Kludex/uvicorn#3149); the script
measures that on the bare app. :func:`hub_app` reads the database URL, API-key pepper and
artifact directory from ``RAPHA_HUB_DATABASE_URL``, ``RAPHA_HUB_API_KEY_PEPPER`` and
``RAPHA_HUB_ARTIFACTS``, and lets every node take every job: the claim path is the lease
query alone (matching is measured on its own). The database is the tests' throwaway
cluster (``tests/support/postgres.py``); the load generator is this process.

1. **Long polls.** :data:`NODES` nodes enrolled with ``Hub.enroll_node`` (Ed25519 keys) each
   send a signed ``POST /v1/node/claim?wait=HOLD_WAIT`` at once, with no job funded: how
   many were open together and answered ``null``, the errors, the workers' RSS, and the
   cost of holding them: PostgreSQL commits per second (``pg_stat_database``) and CPU.
2. **Assignment latency**, from ``JobService.mark_funded``'s commit (as the chain watcher
   funds) to the claim response naming the job at the node (one clock, this process),
   with every node long-polling and then with one.
3. **Submissions per second**: ``POST /v1/jobs`` with a company API key (the bundle uploaded
   once) against the bare app's trivial ``POST``, closed loop, interleaved rounds. The load
   generator writes raw HTTP/1.1 on asyncio streams: httpx would spend more CPU per request
   than the bare app, on the same 2 cores.
4. **Matching** over 10,000 profiles: ``bench/matching.py``'s measurement, called on a
   second database of the cluster once the servers have stopped.

A poll the node abandons is not noticed by the hub: ``request.is_disconnected()`` does not
see the disconnect through the app's ``@app.middleware("http")`` (a Starlette
``BaseHTTPMiddleware``), so the claim loop runs to its deadline and may lease a job to a
node that is gone. The latency phases therefore let every poll end before the next phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fastapi import FastAPI

from _summary import summary_line  # bench/ is the script's directory
from rapha.hub.app import create_app
from rapha.hub.artifacts import FilesystemArtifactStore
from rapha.hub.db import open_database
from rapha.hub.services import Hub

if TYPE_CHECKING:
    import httpx

    from rapha.crypto import Ed25519PrivateKey
    from rapha.hub.db import Database
    from rapha.hub.jobs import JobService
    from rapha.hub.services import Principal

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

NODES = int(os.environ.get("RAPHA_BENCH_HUB_NODES", "1000"))
WORKERS = 2
HOLD_WAIT = 20  # seconds each poll of the hold phase asks the hub to wait
HOLD_WINDOW = (4.0, 14.0)  # seconds after the first poll: where the costs are measured
LATENCY_WAIT = 10  # polls of the latency phases renew, then drain at the end
LATENCY_JOBS, FUND_INTERVAL = 100, 0.1  # while every node waits: one per 0.1 s on average
SINGLE_NODE_JOBS = 10  # one at a time, 0-2 s after the last was claimed
CONNECTIONS = (4, 16)  # keep-alive connections of the throughput phase
ROUNDS, ROUND_SECONDS = 2, 3.0  # per app and connection count, interleaved
PROBE_SECONDS = 2.0  # the bare app on one connection, our serving and uvicorn --workers
ENVIRONMENT: Final = "demo"
WALLET = "0x" + "ab" * 20
BUDGET, PRICE = 1_000_000, 100
REQUIREMENTS = {"modality": "DX", "body_part": "CHEST", "labels": [], "min_records": 10}
CLAIM_PATH = "/v1/node/claim"


# --- the apps and how they are served ------------------------------------------------------


def _anyone(_node_id: str, _requirements: dict[str, Any]) -> bool:
    return True


def hub_app() -> FastAPI:
    """The hub's app over the database and artifact store the environment names."""
    env = os.environ
    db = open_database(env["RAPHA_HUB_DATABASE_URL"], migrate=False)  # main migrated it
    hub = Hub(db, pepper=env["RAPHA_HUB_API_KEY_PEPPER"], eligible=_anyone)
    return create_app(hub, artifacts=FilesystemArtifactStore(Path(env["RAPHA_HUB_ARTIFACTS"])))


def bare_app() -> FastAPI:
    """The baseline: one trivial POST route, a plain function as the hub's routes are."""
    app = FastAPI()

    @app.post("/v1/jobs", status_code=201)
    def submit(body: dict[str, Any]) -> dict[str, bool]:
        return {"ok": bool(body)}

    return app


def serve_one(factory: str, port: int) -> None:
    """One uvicorn process on a socket shared with its siblings (``SO_REUSEPORT``: the
    kernel spreads connections over them), made with ``IPPROTO_TCP`` so that asyncio sets
    ``TCP_NODELAY`` on each accepted connection (it skips sockets of protocol 0)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    app = {"hub_app": hub_app, "bare_app": bare_app}[factory]
    config = uvicorn.Config(app, factory=True, loop="asyncio", http="h11", log_level="info",
                            access_log=False, backlog=4096)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT is how main stops us
        uvicorn.Server(config).run(sockets=[sock])


@dataclass
class Served:
    """The uvicorn processes we started on ``port``; ``workers`` serve the requests."""

    processes: list[subprocess.Popen[bytes]]
    port: int
    logs: list[Path]
    workers: list[int] = field(default_factory=list)

    def alive(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def log_text(self) -> str:
        return "".join(log.read_text() for log in self.logs)


@contextmanager
def _serve(factory: str, env: dict[str, str], workdir: Path, *,
           supervisor: bool = False) -> Iterator[Served]:  # fmt: skip
    """:data:`WORKERS` processes serving ``factory``: :func:`serve_one` each, or with
    ``supervisor`` uvicorn's ``--workers`` (a parent that binds, its children serve)."""
    from support.orthanc import free_port

    port = free_port()
    commands = [[sys.executable, __file__, "--serve", factory, str(port)]] * WORKERS
    if supervisor:
        commands = [[sys.executable, "-m", "uvicorn", f"hub_load:{factory}", "--factory",
                     "--app-dir", str(BENCH_DIR), "--port", str(port), "--workers",
                     str(WORKERS), "--loop", "asyncio", "--http", "h11"]]  # fmt: skip
    served = Served([], port, [])
    try:
        for i, command in enumerate(commands):
            served.logs.append(workdir / f"uvicorn-{factory}-{supervisor}-{i}.log")
            with served.logs[-1].open("wb") as out:
                served.processes.append(subprocess.Popen(  # this Python, our arguments
                    command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
                ))  # fmt: skip
        deadline = time.monotonic() + 60
        while served.log_text().count("Application startup complete") < WORKERS:
            if not served.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start:\n{served.log_text()[-3000:]}")
            time.sleep(0.1)
        found = re.findall(r"Started server process \[(\d+)\]", served.log_text())
        served.workers = [int(pid) for pid in found]
        yield served
    finally:
        for process in served.processes:
            process.send_signal(signal.SIGINT)
        for process in served.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for line in served.log_text().splitlines():  # for the run's log, not the report
            if not line.startswith("INFO"):
                print(f"hub_load: uvicorn {factory}: {line}"[:300], file=sys.stderr)


# --- what the processes use ----------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    found = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    if found is None:
        raise RuntimeError(f"process {pid} reports no VmRSS")
    return int(found[1]) / 1024


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User plus system CPU of each process still running."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two samples; a process started between them counts in full."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def _established(port: int) -> int:
    """TCP connections the server side of ``port`` holds open (IPv4)."""
    rows = (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
    return sum(row[3] == "01" and int(row[1].rsplit(":", 1)[1], 16) == port for row in rows)


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``)."""
    user, nice, system, _idle, _iowait, *rest = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + sum(rest)) / os.sysconf("SC_CLK_TCK")


def _ours() -> float:
    """CPU seconds of this process and its reaped children (uvicorn, PostgreSQL)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _others(since: tuple[float, float, float]) -> float:
    """Cores other processes used on average since ``(perf_counter, machine busy, ours)``."""
    started, busy, ours = since
    used = _busy_seconds() - busy - (_ours() - ours)
    return max(0.0, used) / (time.perf_counter() - started)


def _commits(db: Database) -> int:
    from sqlalchemy import text

    query = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    with db.engine.connect() as connection:
        return int(connection.execute(text(query)).scalar_one())


def _ms(seconds: list[float]) -> tuple[float, float, float]:
    """p50, p99 and the maximum, in milliseconds."""
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return statistics.median(seconds) * 1000, cuts[98] * 1000, max(seconds) * 1000


# --- the world: organisations, keys, nodes and jobs ----------------------------------------


@dataclass(frozen=True)
class BenchNode:
    node_id: str
    key: Ed25519PrivateKey


@dataclass
class World:
    db: Database
    hub: Hub
    jobs: JobService
    company: Principal
    token: str
    nodes: list[BenchNode]
    enroll_seconds: float

    def submit(self, count: int) -> list[str]:
        return [
            self.jobs.submit(
                self.company, kind="train", bundle_sha256="11" * 32, bundle_digest="22" * 32,
                requirements=REQUIREMENTS, budget=BUDGET, max_price_per_record=PRICE,
                client_job_id="0x" + secrets.token_hex(32),
            ).id
            for _ in range(count)
        ]  # fmt: skip

    def fund(self, job_id: str) -> float:
        """Fund ``job_id``; the ``perf_counter`` once the commit returned."""
        self.jobs.mark_funded(job_id, chain_job_id="0x" + secrets.token_hex(32), payer=WALLET,
                              budget=BUDGET, max_price_per_record=PRICE, wallet=WALLET)  # fmt: skip
        return time.perf_counter()

    def alone_ms(self) -> tuple[float, float]:
        """CPU milliseconds of one claim poll, and of one submission's service calls (the
        API key's check, then the insert), each called alone in this process."""

        def timed(call: Callable[[], object]) -> float:  # the best of 5 batches: least noise
            call()
            batches = []
            for _ in range(5):
                started = time.process_time()
                for _ in range(50):
                    call()
                batches.append((time.process_time() - started) / 50 * 1000)
            return min(batches)

        claim = timed(lambda: self.jobs.claim("nobody", ENVIRONMENT, _anyone, now=0.0))
        return claim, timed(lambda: (self.hub.authenticate(self.token), self.submit(1)))


def _world(url: str, pepper: str) -> World:
    from rapha import crypto
    from rapha.hub.db import Role
    from rapha.hub.jobs import JobService
    from rapha.hub.services import SYSTEM

    hub = Hub(open_database(url), pepper=pepper, eligible=_anyone)
    hub.create_org(SYSTEM, "bench-ai", Role.COMPANY, wallet=WALLET)
    hub.create_org(SYSTEM, "bench-hospital", Role.HOSPITAL)
    token = hub.create_key(SYSTEM, "bench-ai", ENVIRONMENT).token
    started = time.perf_counter()
    nodes = [BenchNode(f"bench-node-{i:04d}", crypto.generate_private_key()) for i in range(NODES)]
    for node in nodes:
        hub.enroll_node(SYSTEM, node_id=node.node_id, org_name="bench-hospital",
                        public_key_pem=crypto.public_key_pem(node.key.public_key()),
                        environment=ENVIRONMENT, kind="dev")  # fmt: skip
    enrolled = time.perf_counter() - started
    jobs = JobService(hub.db)
    return World(hub.db, hub, jobs, hub.authenticate(token), token, nodes, enrolled)


# --- node long polls -----------------------------------------------------------------------


async def _claim(client: httpx.AsyncClient, node: BenchNode, wait: int) -> Any:
    """One signed long poll: the lease (a dict) or ``None``; raises on anything but 200."""
    from rapha.hub.auth import sign_node_request

    headers = sign_node_request(node.key, node_id=node.node_id, method="POST",
                                path=CLAIM_PATH, query=f"wait={wait}")  # fmt: skip
    response = await client.post(f"{CLAIM_PATH}?wait={wait}", headers=headers, timeout=wait + 60)
    if response.status_code != 200:
        raise RuntimeError(f"claim answered {response.status_code}: {response.text[:200]}")
    return response.json()


def _client(port: int) -> httpx.AsyncClient:
    import httpx

    limits = httpx.Limits(max_connections=NODES + 50, max_keepalive_connections=NODES + 50)
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits)


@dataclass
class Hold:
    spans: list[tuple[float, float]]  # sent and answered null, per poll
    errors: list[str]
    connections: int  # the most TCP connections the hub's side held open
    rss_idle: list[float]
    rss_held: list[float]
    commits_per_s: float
    cpu: tuple[float, float, float]  # cores: hub workers, PostgreSQL, load generator

    def at_once(self) -> int:
        """The most polls open at one moment."""
        steps = sorted([(s, 1) for s, _ in self.spans] + [(e, -1) for _, e in self.spans])
        running = [0]
        for _, step in steps:
            running.append(running[-1] + step)
        return max(running)


async def _hold(world: World, served: Served, postgres_pids: Callable[[], list[int]]) -> Hold:
    async with _client(served.port) as client:  # warm the thread and database pools
        await asyncio.gather(*(_claim(client, node, 0) for node in world.nodes[:50]))
    rss_idle = [_rss_mib(pid) for pid in served.workers]
    spans: list[tuple[float, float]] = []
    errors: list[str] = []

    async def poll(node: BenchNode) -> None:
        sent = time.perf_counter()
        try:
            lease = await _claim(client, node, HOLD_WAIT)
        except Exception as exc:  # every failure is counted and reported
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        if lease is not None:
            errors.append("a lease with no job funded")
        else:
            spans.append((sent, time.perf_counter()))

    def sample() -> tuple[float, int, float, dict[int, float], dict[int, float]]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (time.perf_counter(), _commits(world.db), usage.ru_utime + usage.ru_stime,
                _cpu_seconds(served.workers), _cpu_seconds(postgres_pids()))  # fmt: skip

    async with _client(served.port) as client:
        first = time.perf_counter()
        tasks = [asyncio.create_task(poll(node)) for node in world.nodes]
        await asyncio.sleep(HOLD_WINDOW[0])
        t0, commits0, own0, workers0, pg0 = sample()
        rss_held, connections = rss_idle, 0
        while time.perf_counter() < first + HOLD_WINDOW[1]:
            await asyncio.sleep(1.0)
            rss_held = [max(m, _rss_mib(p)) for m, p in zip(rss_held, served.workers, strict=True)]
            connections = max(connections, _established(served.port))
        t1, commits1, own1, workers1, pg1 = sample()
        await asyncio.gather(*tasks)
    span = t1 - t0
    cpu = (_cpu_used(workers0, workers1) / span, _cpu_used(pg0, pg1) / span, (own1 - own0) / span)
    return Hold(spans, errors, connections, rss_idle, rss_held, (commits1 - commits0) / span, cpu)


@dataclass
class Latency:
    nodes: int
    seconds: list[float]
    errors: list[str]


async def _latency(world: World, port: int, nodes: list[BenchNode], jobs: int) -> Latency:
    """Fund ``jobs`` jobs while ``nodes`` long-poll; with one node, one job at a time."""
    job_ids = await asyncio.to_thread(world.submit, jobs)
    claimed: dict[str, float] = {}
    errors: list[str] = []
    progress, stop = asyncio.Condition(), asyncio.Event()

    async def node_loop(node: BenchNode) -> None:
        while not stop.is_set():
            try:
                lease = await _claim(client, node, LATENCY_WAIT)
            except Exception as exc:  # counted; the node polls again, as a node agent would
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.5)
                continue
            if lease is not None:
                claimed[lease["job_id"]] = time.perf_counter()
                async with progress:
                    progress.notify_all()

    async def claimed_at_least(count: int, *, timeout: float) -> None:
        async with progress:
            await asyncio.wait_for(progress.wait_for(lambda: len(claimed) >= count), timeout)

    rng = random.Random(7)
    funded: dict[str, float] = {}
    async with _client(port) as client:
        tasks = [asyncio.create_task(node_loop(node)) for node in nodes]
        await asyncio.sleep(2.0)  # every poll has reached the hub
        for done, job_id in enumerate(job_ids):
            funded[job_id] = await asyncio.to_thread(world.fund, job_id)
            if len(nodes) == 1:  # the next job once this one is claimed, out of step
                await claimed_at_least(done + 1, timeout=10)
                await asyncio.sleep(rng.uniform(0.0, 2.0))
            else:
                await asyncio.sleep(rng.uniform(0.5, 1.5) * FUND_INTERVAL)
        await claimed_at_least(jobs, timeout=60)
        stop.set()  # drain, not cancel: see the module docstring
        await asyncio.gather(*tasks)
    return Latency(len(nodes), [claimed[j] - funded[j] for j in job_ids], errors)


# --- submissions per second ----------------------------------------------------------------


@dataclass
class Load:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    cpu: float  # the app's workers, CPU seconds

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


async def _closed_loop(served: Served, request: Callable[[int], bytes], seconds: float,
                       connections: int) -> Load:  # fmt: skip
    """``connections`` keep-alive connections, each sending its next request as soon as the
    last was answered, for ``seconds``."""
    counter = iter(range(1 << 62))
    latencies: list[float] = []
    errors = 0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        while (started := time.perf_counter()) < deadline:
            writer.write(request(next(counter)))
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            await reader.readexactly(int(length[1]) if length else 0)
            latencies.append(time.perf_counter() - started)
            errors += head[9:12] != b"201"
        writer.close()
        await writer.wait_closed()

    cpu0, begun = _cpu_seconds(served.workers), time.perf_counter()
    deadline = begun + seconds
    await asyncio.gather(*(connection() for _ in range(connections)))
    took, cpu = time.perf_counter() - begun, _cpu_used(cpu0, _cpu_seconds(served.workers))
    return Load(len(latencies), errors, took, latencies, cpu)


def _submission(port: int, token: str, bundle_sha256: str) -> Callable[[int], bytes]:
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer "
            f"{token}\r\nContent-Type: application/json\r\n").encode()  # fmt: skip

    def request(i: int) -> bytes:
        body = json.dumps({
            "kind": "train", "bundle_sha256": bundle_sha256, "bundle_digest": "22" * 32,
            "requirements": REQUIREMENTS, "budget": BUDGET, "max_price_per_record": PRICE,
            "client_job_id": f"0x{i:064x}",
        }).encode()  # fmt: skip
        return head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body

    return request


async def _throughput(world: World, hub: Served, bare: Served) -> dict[tuple[str, int], Load]:
    """Each app at each of :data:`CONNECTIONS`, in interleaved rounds, after a warm-up."""
    import httpx

    bundle = random.Random(3).randbytes(64 << 10)
    sha256 = hashlib.sha256(bundle).hexdigest()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hub.port}") as client:
        auth = {"Authorization": f"Bearer {world.token}"}
        (
            await client.put(f"/v1/artifacts/{sha256}", content=bundle, headers=auth)
        ).raise_for_status()
    apps = {"bare": bare, "hub": hub}
    requests = {name: _submission(s.port, world.token, sha256) for name, s in apps.items()}
    for name, served in apps.items():
        await _closed_loop(served, requests[name], 1.0, max(CONNECTIONS))
    runs: dict[tuple[str, int], list[Load]] = {}
    for _ in range(ROUNDS):
        for connections in CONNECTIONS:
            for name, served in apps.items():
                load = await _closed_loop(served, requests[name], ROUND_SECONDS, connections)
                runs.setdefault((name, connections), []).append(load)
    return {
        key: Load(sum(r.requests for r in rs), sum(r.errors for r in rs),
                  sum(r.seconds for r in rs), [s for r in rs for s in r.latencies],
                  sum(r.cpu for r in rs))
        for key, rs in runs.items()
    }  # fmt: skip


# --- the report ----------------------------------------------------------------------------


@dataclass
class Results:
    world: World
    alone: tuple[float, float]  # ms: one claim poll, one submission's service calls
    bare_rss: list[float]
    hold: Hold
    latencies: list[Latency]
    loads: dict[tuple[str, int], Load]
    probe: tuple[Load, Load]  # the bare app on one connection: ours, uvicorn --workers
    matching: dict[str, Any]
    others: float  # cores the machine's other processes used on average during the run


def _report(r: Results) -> None:
    from rapha.hub.routes_jobs import _CLAIM_POLL, MAX_CLAIM_WAIT

    hold, (many, single) = r.hold, r.latencies
    mib = " / ".join
    answered = [e - s for s, e in hold.spans] or [0.0]
    per_poll = (sum(hold.rss_held) - sum(hold.rss_idle)) * 1024 / max(hold.at_once(), 1)
    polls = hold.commits_per_s / 2
    print(
        f"## Hub under load\n\nThe hub's app in {WORKERS} uvicorn processes sharing one port "
        "(`SO_REUSEPORT`; asyncio loop, h11) on PostgreSQL (the tests' cluster, loopback), "
        f"{NODES:,} nodes enrolled with `Hub.enroll_node` ({r.world.enroll_seconds:.1f} s). "
        "The baseline is a minimal FastAPI app with one trivial `POST` route (a plain "
        "function, as the hub's are), served the same way in the same run. The load "
        "generator is a third process on the same 2 cores. Every node may take every job "
        "here (the claim is the lease query alone); matching is measured on its own. Other "
        f"processes on the machine used {r.others:.2f} of its cores on average during the run "
        "(`/proc/stat` less this run's own): they show as noise.\n"
    )
    print(
        f"### Long polls\n\n{NODES:,} signed `POST /v1/node/claim?wait={HOLD_WAIT}` sent at "
        "once, no job funded. Costs over the 10 s when all are held; CPU in cores.\n"
    )
    print(
        "| sent | answered `null` | open at one moment | TCP connections at the hub | errors "
        "| answered after (s) |\n|---:|---:|---:|---:|---:|---:|"
    )
    print(
        f"| {NODES:,} | {len(hold.spans):,} | {hold.at_once():,} | {hold.connections:,} "
        f"| {len(hold.errors)} | {min(answered):.1f}-{max(answered):.1f} |\n"
    )
    print(
        "| hub worker RSS, idle → holding (MiB) | per held poll (KiB) | PostgreSQL commits/s "
        "| CPU: hub workers / PostgreSQL / load generator |\n|---|---:|---:|---|"
    )
    print(
        f"| {mib(f'{v:.0f}' for v in hold.rss_idle)} → {mib(f'{v:.0f}' for v in hold.rss_held)} "
        f"| {per_poll:.0f} | {hold.commits_per_s:,.0f} | "
        f"{' / '.join(f'{c:.2f}' for c in hold.cpu)} |"
    )
    if hold.errors:
        print(f"\nErrors: `{'`, `'.join(sorted(set(hold.errors))[:3])}`")
    print(f"\nA bare FastAPI worker idles at {mib(f'{v:.0f}' for v in r.bare_rss)} MiB RSS.\n")

    print(
        "### Assignment latency\n\nFrom `mark_funded`'s commit to the claim response naming "
        f"the job at the node. Nodes long-poll with `wait={LATENCY_WAIT}` (the node agent's "
        "default is 20) and poll again at once. With every node, a job every "
        f"{FUND_INTERVAL * 1000:.0f} ms on average; with one, 0-2 s after the last was "
        "claimed.\n"
    )
    print("| nodes long-polling | jobs | p50 (ms) | p99 (ms) | max (ms) | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    for lat in r.latencies:
        p50, p99, top = _ms(lat.seconds)
        print(f"| {lat.nodes:,} | {len(lat.seconds)} | {p50:.0f} | {p99:.0f} | {top:.0f} "
              f"| {len(lat.errors)} |")  # fmt: skip
    for lat in r.latencies:
        if lat.errors:
            first = "`, `".join(sorted(set(lat.errors))[:3])
            print(f"\nErrors with {lat.nodes:,} nodes (each node polled again): `{first}`")

    print(
        f"\n### Submissions per second\n\nClosed loop, {ROUNDS} interleaved rounds of "
        f"{ROUND_SECONDS:g} s per app and connection count, after a warm-up; the same JSON "
        "body (a distinct `client_job_id` each) to both. The hub checks the API key, "
        "checks the bundle is stored, and inserts the job and its first event.\n"
    )
    print(
        "| app | connections | requests/s | p50 (ms) | p99 (ms) | worker CPU per request "
        "(ms) | errors | ÷ bare |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for (name, connections), load in r.loads.items():
        p50, p99, _ = _ms(load.latencies)
        ratio = load.per_second / r.loads["bare", connections].per_second
        label = "Rapha `POST /v1/jobs`" if name == "hub" else "bare FastAPI `POST`"
        print(f"| {label} | {connections} | {load.per_second:,.0f} | {p50:.1f} | {p99:.1f} "
              f"| {load.cpu / load.requests * 1000:.2f} | {load.errors} | "
              f"{f'**{ratio:.2f}x**' if name == 'hub' else ''} |")  # fmt: skip
    ours, supervised = (1000 * statistics.median(load.latencies) for load in r.probe)
    print(
        f"\nUnder `uvicorn --workers {WORKERS}` the bare app took {supervised:.1f} ms per "
        f"request on one connection, against {ours:.2f} ms served as above: its listening "
        "socket has protocol 0, so asyncio sets no `TCP_NODELAY` and each response's body "
        "waits for the client's delayed ACK (Kludex/uvicorn#3149). `rapha hub serve` is "
        "one process and not affected; a deployment behind `--workers` would be.\n"
    )

    (m50, m99), (n50, _) = r.matching["ours"], r.matching["naive"]
    print(
        f"### Matching\n\n`bench/matching.py`'s measurement (its own section has the "
        "details), run on a second database of the same PostgreSQL after the servers "
        f"stopped: `ProfileService.match` over 10,000 profiles, p50 {m50:.2f} ms, p99 "
        f"{m99:.2f} ms (target p99 <= 20 ms: {'met' if m99 <= 20 else 'NOT met'}), against "
        f"{n50:.0f} ms at p50 for the naive scan.\n"
    )

    claim_ms, submit_ms = r.alone
    asked, late = NODES / _CLAIM_POLL, [a - HOLD_WAIT for a in answered]
    best_at = max(CONNECTIONS, key=lambda c: r.loads["hub", c].per_second)
    best, bare = r.loads["hub", best_at], r.loads["bare", best_at]
    fewer = (
        r.loads["hub", max(CONNECTIONS)].per_second < r.loads["hub", min(CONNECTIONS)].per_second
    )
    print(
        f"**What limits them.** A waiting claim is not woken by the funding: it runs the lease "
        f"query every {_CLAIM_POLL:g} s (±20 %, for up to `MAX_CLAIM_WAIT` = "
        f"{MAX_CLAIM_WAIT:g} s) in a worker thread. One poll costs {claim_ms:.1f} ms of CPU "
        "alone (in this process: the pool's pre-ping, which PostgreSQL counts as a "
        "transaction of its own, then `SELECT … FOR UPDATE SKIP LOCKED` and the commit), so "
        f"{NODES:,} waiting nodes ask for {asked * claim_ms / 1000:.2f} cores before any HTTP. "
        f"Measured: {hold.commits_per_s:,.0f} commits/s, some {polls:,.0f} polls/s of the "
        f"{asked:,.0f} asked, with {hold.cpu[0]:.2f} cores in the hub workers "
        f"({hold.cpu[0] / polls * 1000:.1f} ms per poll, against {claim_ms:.1f} ms for the "
        "claim alone) and nothing to hand out"
        + (
            f"; the polls fall behind, the answers come {min(late):.0f}-{max(late):.0f} s after "
            f"the wait, and with {many.nodes:,} nodes waiting the assignment latency is that "
            f"queue (p99 {_ms(many.seconds)[1] / 1000:.1f} s)."
            if polls < 0.9 * asked
            else "."
        )
        + f" With one node waiting a job waits for its next poll: {_ms(single.seconds)[0]:.0f} "
        f"ms at p50. A submission's service calls take {submit_ms:.1f} ms of CPU alone; over "
        f"HTTP the hub's best was {best.per_second:,.0f} requests/s ({best_at} connections), "
        f"{best.cpu / best.requests * 1000:.1f} ms of worker CPU each (the bare app: "
        f"{bare.cpu / bare.requests * 1000:.2f} ms)"
        + (f"; with {max(CONNECTIONS)} connections it served fewer." if fewer else ".")
    )
    print()
    held, idle = sum(hold.rss_held), sum(r.bare_rss)
    print(
        summary_line(
            f"{NODES:,} long polls held at once, memory of the {WORKERS} workers",
            rapha=f"{hold.at_once():,} of {NODES:,} held ({len(hold.errors)} errors), "
            f"hub workers {held:.0f} MiB RSS",
            peer=f"bare FastAPI app's workers, idle: {idle:.0f} MiB RSS",
            ratio=f"{held / idle:.2f}x the memory (lower is better)",
        )
    )
    for connections in CONNECTIONS:
        ours_load, bare_load = r.loads["hub", connections], r.loads["bare", connections]
        print(
            summary_line(
                f"job submissions per second, {connections} connections",
                rapha=f"`POST /v1/jobs`: {ours_load.per_second:,.0f} requests/s",
                peer=f"bare FastAPI `POST`: {bare_load.per_second:,.0f} requests/s",
                ratio=f"{ours_load.per_second / bare_load.per_second:.2f}x the bare app's "
                "rate (higher is better)",
            )
        )
    from matching import NODES as PROFILES

    print(
        summary_line(
            f"matcher latency over {PROFILES:,} profiles, PostgreSQL after the load phases",
            rapha=f"`ProfileService.match`: p50 {m50:.2f} ms, p99 {m99:.2f} ms",
            peer=f"naive scan in Python: p50 {n50:.0f} ms",
            ratio=f"{n50 / m50:.0f}x faster at p50",
        )
    )


@contextmanager
def _phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    print(f"hub_load: {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr)


def main() -> None:
    import matching
    from support.postgres import postgres_bindir, start_postgres

    since = time.perf_counter(), _busy_seconds(), _ours()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # each held poll is a socket here and one in a worker
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed: scripts/install-system-deps")
    with (
        tempfile.TemporaryDirectory(prefix="rapha-bench-hub-") as tmp,
        start_postgres(bindir, Path(tmp)) as server,
    ):
        pepper = secrets.token_hex(32)
        world = _world(server.url, pepper)
        env = {"RAPHA_HUB_DATABASE_URL": server.url, "RAPHA_HUB_API_KEY_PEPPER": pepper,
               "RAPHA_HUB_ARTIFACTS": f"{tmp}/artifacts"}  # fmt: skip
        try:
            alone = world.alone_ms()
            with (
                _serve("bare_app", env, Path(tmp)) as bare,
                _serve("hub_app", env, Path(tmp)) as hub,
            ):
                bare_rss = [_rss_mib(pid) for pid in bare.workers]
                with _phase("long polls"):
                    hold = asyncio.run(_hold(world, hub, server.processes))
                with _phase("latency"):
                    latencies = [asyncio.run(_latency(world, hub.port, world.nodes, LATENCY_JOBS)),
                                 asyncio.run(_latency(world, hub.port, world.nodes[:1],
                                                      SINGLE_NODE_JOBS))]  # fmt: skip
                with _phase("throughput"):
                    loads = asyncio.run(_throughput(world, hub, bare))
                    ours = asyncio.run(_closed_loop(bare, _submission(bare.port, "", ""),
                                                    PROBE_SECONDS, 1))  # fmt: skip
                if not (hub.alive() and bare.alive()):
                    raise RuntimeError("a uvicorn process died during the run")
            with _serve("bare_app", env, Path(tmp), supervisor=True) as supervised:
                request = _submission(supervised.port, "", "")
                theirs = asyncio.run(_closed_loop(supervised, request, PROBE_SECONDS, 1))
        finally:
            world.db.close()
        with _phase("matching"):  # a private helper of a sibling script, on purpose: no copy
            matched = matching._measure(server.create_database("matching"))
    _report(
        Results(
            world,
            alone,
            bare_rss,
            hold,
            latencies,
            loads,
            (ours, theirs),
            matched,
            _others(since),
        )
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve_one(sys.argv[2], int(sys.argv[3]))
    else:
        main()
