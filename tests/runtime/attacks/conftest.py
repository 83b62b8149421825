"""The attack suite's machinery: a small real view, a node, and bundles that attack it.

Each attack is a real signed bundle with a custom ``model.py``: a harmless network (so the
initial weights can be made on the host without running the attack) and a ``train()``
that carries the attack, run through :func:`rapha.node.job.run_job` in a real bubblewrap
sandbox. Secrets the attacks go after live outside ``/tmp`` (under ``/var/tmp``) and are
world-readable, so a blocked read proves the filesystem isolation, not a hidden ``/tmp``
or file modes.

An attack that probes the sandbox prints ``ATTACK blocked: …`` or ``ATTACK escaped: …`` to
stderr and exits non-zero, so the job stops after training; tests assert the verdict, the
absence of the side effect on the host, and that the node is still healthy afterwards.
"""

from __future__ import annotations

import os
import shutil
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from rapha import crypto
from rapha.audit import AuditLog, verify_log
from rapha.node.job import JobOutcome, JobRules, run_job
from rapha.node.quota import EvaluationQuota
from rapha.node.synthetic import PreparedView, prepare_synthetic_view
from rapha.runtime.bundle import sign_bundle, verify_bundle
from rapha.runtime.sandbox import SANDBOX_UID, UID_POOL, Sandbox, SandboxLimits

SIZE = 16
NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, channels, labels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, labels)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


def build_model(spec):
    return Net(spec["input"]["channels"], len(spec["labels"]["names"]))
"""
MANIFEST = f"""
[bundle]
name = "attack"
version = "0.1.0"
kind = "train"
[model]
source = "custom"
[input]
channels = 1
size = [{SIZE}, {SIZE}]
[labels]
names = ["effusion"]
[train]
loop = "custom"
optimizer = "adam"
learning_rate = 0.01
epochs = 1
batch_size = 16
seed = 1
"""
PROBE_PREAMBLE = """
import os, sys


def verdict(blocked, what):
    print(("ATTACK blocked: " if blocked else "ATTACK escaped: ") + what, file=sys.stderr)
    sys.stderr.flush()
"""


def requires_sandbox() -> None:
    try:
        Sandbox().ensure_available()
    except Exception as exc:  # any reason to skip is reported
        pytest.skip(f"no usable sandbox here: {exc}")


@dataclass(frozen=True)
class Secrets:
    """World-readable secrets outside /tmp that no sandbox may see."""

    root: Path
    token: str
    secret_file: Path
    node_dir: Path


@pytest.fixture(scope="session")
def host_secrets() -> Iterator[Secrets]:
    root = Path("/var/tmp") / f"rapha-attack-{os.getpid()}"
    root.mkdir(mode=0o755)
    token = "RAPHA-SECRET-" + os.urandom(8).hex()
    secret = root / "secret.txt"
    secret.write_text(token)
    secret.chmod(0o644)
    node_dir = root / "node"
    from rapha.node import init_node

    init_node(node_dir, name="attack-node")
    yield Secrets(root, token, secret, node_dir)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def attack_view(tmp_path_factory: pytest.TempPathFactory) -> PreparedView:
    requires_sandbox()
    work = tmp_path_factory.mktemp("attack-view")
    return prepare_synthetic_view(work, studies=150, seed=5, size=(SIZE, SIZE), job_id="attack")


@dataclass
class Node:
    view: PreparedView
    work: Path
    audit: AuditLog
    audit_path: Path
    public: crypto.Ed25519PublicKey
    runs: int = 0

    def bundle(self, train_body: str, *, extra: str = "") -> Path:
        """A signed bundle whose ``train()`` runs ``train_body`` (indented for you)."""
        self.runs += 1
        root = self.work / f"bundle-{self.runs}"
        root.mkdir()
        (root / "bundle.toml").write_text(MANIFEST)
        body = textwrap.indent(textwrap.dedent(train_body), "    ")
        code = NET + PROBE_PREAMBLE + extra + "\n\ndef train(model, data, hparams, ctx):\n" + body
        (root / "model.py").write_text(code)
        scope: dict[str, object] = {}
        exec(compile(NET, "net", "exec"), scope)  # the harmless part only
        torch.manual_seed(0)
        build: Any = scope["build_model"]
        model = build({"input": {"channels": 1}, "labels": {"names": ["e"]}})
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, root / "weights.safetensors"
        )
        key = crypto.generate_private_key()
        sign_bundle(root, key)
        return root

    def run(
        self,
        train_body: str,
        *,
        extra: str = "",
        limits: SandboxLimits | None = None,
        quota: EvaluationQuota | None = None,
    ) -> JobOutcome:
        root = self.bundle(train_body, extra=extra)
        verified = verify_bundle(root, trusted_keys=None, workdir=self.work / f"v-{self.runs}")
        sandbox = Sandbox(uid=ATTACK_UID, limits=limits or attack_limits(), staging_root=STAGING)
        return run_job(
            verified,
            job_id=f"attack-{self.runs}",
            org="attacker",
            view=self.view.view,
            private_dir=self.view.private_dir,
            needles=self.view.needles,
            sandbox=sandbox,
            workdir=self.work / f"job-{self.runs}",
            outbox=self.outbox,
            audit=self.audit,
            signer_pinned=True,
            rules=JobRules(bootstrap=50),
            quota=quota,
        )

    @property
    def outbox(self) -> Path:
        return self.work / f"outbox-{self.runs}"


def attack_limits(**overrides: float) -> SandboxLimits:
    values: dict[str, float] = {
        "wall_seconds": 120.0,
        "address_space": 6 << 30,
        "memory": 2 << 30,
        "processes": 64,
        "tmp_bytes": 8 << 20,
        "output_bytes": 8 << 20,
    }
    values.update(overrides)
    return SandboxLimits(**values)  # type: ignore[arg-type]


@pytest.fixture
def node(attack_view: PreparedView, tmp_path: Path) -> Iterator[Node]:
    audit_path = tmp_path / "audit.jsonl"
    key = crypto.generate_private_key()
    audit = AuditLog.create(audit_path, key)
    before = workspaces()
    yield Node(attack_view, tmp_path, audit, audit_path, key.public_key())
    assert_healthy(audit_path, key.public_key(), before)


def sandbox_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            if ATTACK_UID <= int(uid) < ATTACK_UID + UID_POOL:
                found.append(int(entry.name))
    return found


def no_sandbox_processes(grace: float = 5.0) -> bool:
    """True once no process of the sandbox uid is alive (dying ones get ``grace`` s)."""
    deadline = time.monotonic() + grace
    while sandbox_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# Attack sandboxes run in a uid range of their own, one per pytest-xdist worker, so the
# leftover-process check never counts another worker's sandboxes or a dry-run test's.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
ATTACK_UID = SANDBOX_UID + 1000 + _WORKER * UID_POOL

# The suite's own staging root, so that other sandboxes on the machine do not count.
STAGING = Path("/tmp") / f"rapha-attack-staging-{os.getpid()}"


def workspaces() -> set[Path]:
    return set(STAGING.glob("job-*"))


def assert_healthy(audit_path: Path, public: crypto.Ed25519PublicKey, before: set[Path]) -> None:
    """After an attack: no sandbox process or workspace left, the log verifies, a sandbox runs."""
    assert no_sandbox_processes()
    assert workspaces() <= before, "a job workspace was left behind"
    verify_log(audit_path, public)
    result = Sandbox(
        uid=ATTACK_UID, limits=attack_limits(wall_seconds=30), staging_root=STAGING
    ).run(["/usr/bin/true"], binds=[])
    assert result.ok, result.stderr


@pytest.fixture(scope="session", autouse=True)
def _remove_staging() -> Iterator[None]:
    yield
    shutil.rmtree(STAGING, ignore_errors=True)
