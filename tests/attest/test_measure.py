"""The node measurement: stable for one installation, changed by any byte of code or profile.

Prepare a small fake installation (a site directory holding one distribution with a real
RECORD, and a copy of Rapha's package), measure, change one thing, measure again. One
measurement of the real environment runs per session, through the ``rapha`` command.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import rapha
from rapha import crypto
from rapha.attest.measure import COMPONENTS, Measurement, digest_of, event_value, measure
from rapha.cli import app
from rapha.errors import DataError, DependencyError, ExitCode
from rapha.node.job import sandbox_from_settings
from rapha.node.settings import load_node_settings
from rapha.runtime.sandbox import Sandbox, SandboxLimits

runner = CliRunner()

DIST_FILES: Mapping[str, bytes] = {
    "demo_pkg/__init__.py": b"VALUE = 1\n",
    "demo_pkg/core.py": b"def f() -> int:\n    return 2\n",
    "demo_pkg/data/table.csv": b"a,b\n1,2\n",
}


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _install(site: Path, files: Mapping[str, bytes], *, version: str = "1.0") -> Path:
    """Write a distribution ``demo-pkg`` into ``site`` as an installer would, RECORD included."""
    info = f"demo_pkg-{version}.dist-info"
    written = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: demo-pkg\nVersion: {version}\n".encode(),
        f"{info}/INSTALLER": b"pip\n",
    }
    lines = []
    for rel, data in written.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        lines.append(f"{rel},sha256={_record_hash(data)},{len(data)}")
    lines.append(f"{info}/RECORD,,")
    (site / info / "RECORD").write_text("\n".join(lines) + "\n")
    return site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return _install(tmp_path / "site-packages", DIST_FILES)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of Rapha's own package directory, without byte code."""
    target = tmp_path / "src" / "rapha"
    source = Path(rapha.__file__).parent
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    return Sandbox()


def _measure(sandbox: Sandbox, site: Path, package: Path) -> Measurement:
    return measure(sandbox, site_dirs=[site], package_dir=package)


def _changed(before: Measurement, after: Measurement) -> set[str]:
    return {n for n in COMPONENTS if before.components[n] != after.components[n]}


# --- one real measurement, as a process ----------------------------------------------------


@dataclass(frozen=True)
class RealRun:
    """``rapha node measure --json`` over this environment, and this process's measurements
    of Rapha's package just before and after it (the tree may be edited meanwhile)."""

    out: dict[str, Any]
    package_before: Measurement
    package_after: Measurement


@pytest.fixture(scope="session")
def real(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    """The session's only measurement of the whole environment, run as a process."""
    empty = tmp_path_factory.mktemp("empty-site")
    before = measure(sandbox, site_dirs=[empty])
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "rapha"), "node", "measure", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    after = measure(sandbox, site_dirs=[empty])
    assert proc.returncode == 0, proc.stderr
    return RealRun(json.loads(proc.stdout), before, after)


def test_real_measurement_covers_rapha_and_its_runtime(real: RealRun) -> None:
    components = real.out["components"]

    names = [c["component"] for c in components]
    files = {c["component"]: c["files"] for c in components}

    assert real.out["schema"] == "rapha.measurement/1"
    assert names == list(COMPONENTS)
    assert files["rapha"] > 50
    assert files["distributions"] > 1000
    assert real.out["missing"] == []
    events = [{"component": c["component"], "digest": c["digest"]} for c in components]
    assert digest_of(events) == real.out["digest"]


def test_real_measurement_agrees_with_this_process(real: RealRun) -> None:
    theirs = {c["component"]: c["digest"] for c in real.out["components"]}
    ours = {real.package_before.components["rapha"], real.package_after.components["rapha"]}

    assert theirs["rapha"] in ours
    assert theirs["sandbox_profile"] == real.package_before.components["sandbox_profile"]
    assert theirs["interpreter"] == real.package_before.components["interpreter"]
    assert theirs["bwrap"] == real.package_before.components["bwrap"]


# --- stable --------------------------------------------------------------------------------


def test_same_installation_same_digest_in_one_process(
    sandbox: Sandbox, site: Path, package: Path
) -> None:
    first = _measure(sandbox, site, package)
    second = _measure(sandbox, site, package)

    assert first == second
    assert first.to_json() == second.to_json()
    assert first.file_counts["distributions"] == len(DIST_FILES) + 2  # + METADATA, INSTALLER


def test_same_installation_same_digest_across_processes(
    sandbox: Sandbox, site: Path, package: Path
) -> None:
    script = (
        "import sys; from pathlib import Path; from rapha.attest.measure import measure; "
        "from rapha.runtime.sandbox import Sandbox; "
        "print(measure(Sandbox(), site_dirs=[Path(sys.argv[1])], "
        "package_dir=Path(sys.argv[2])).digest)"
    )
    digests = set()
    for seed in ("1", "2"):  # other hash seeds: no set or dict order may leak in
        proc = subprocess.run(
            [sys.executable, "-c", script, str(site), str(package)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        digests.add(proc.stdout.strip())

    assert digests == {_measure(sandbox, site, package).digest}


def test_digest_is_the_event_log_replayed_as_a_pcr(
    sandbox: Sandbox, site: Path, package: Path
) -> None:
    result = _measure(sandbox, site, package)

    pcr = bytes(32)
    for event in result.events():
        pcr = hashlib.sha256(pcr + hashlib.sha256(crypto.canonical_json(event)).digest()).digest()

    assert [e["component"] for e in result.events()] == list(COMPONENTS)
    assert digest_of(result.events()) == result.digest == pcr.hex()
    assert (
        event_value(result.events()[0])
        == hashlib.sha256(crypto.canonical_json(result.events()[0])).digest()
    )


def test_digest_of_depends_on_order_and_names(sandbox: Sandbox, site: Path, package: Path) -> None:
    events = _measure(sandbox, site, package).events()
    renamed = [{**events[0], "component": "other"}, *events[1:]]

    assert digest_of(list(reversed(events))) != digest_of(events)
    assert digest_of(renamed) != digest_of(events)


@pytest.mark.parametrize(
    "event",
    [
        {"component": "rapha", "digest": "AB" * 32},
        {"component": "", "digest": "ab" * 32},
        {"component": "rapha", "digest": "ab" * 31},
        {"component": "rapha", "digest": "ab" * 32, "extra": "x"},
    ],
)
def test_digest_of_refuses_a_malformed_event(event: dict[str, str]) -> None:
    with pytest.raises(DataError, match="measurement event"):
        digest_of([event])


# --- changes with code --------------------------------------------------------------------


def test_one_byte_of_a_distribution_file_changes_it(
    sandbox: Sandbox, site: Path, package: Path
) -> None:
    before = _measure(sandbox, site, package)
    core = site / "demo_pkg/core.py"
    core.write_bytes(core.read_bytes().replace(b"2", b"3"))

    after = _measure(sandbox, site, package)

    assert after.digest != before.digest
    assert _changed(before, after) == {"distributions"}
    assert after.record_mismatches == ("demo-pkg/demo_pkg/core.py",)
    assert before.record_mismatches == ()


def test_a_listed_file_removed_changes_it(sandbox: Sandbox, site: Path, package: Path) -> None:
    before = _measure(sandbox, site, package)
    (site / "demo_pkg/data/table.csv").unlink()

    after = _measure(sandbox, site, package)

    assert _changed(before, after) == {"distributions"}
    assert after.missing == ("demo-pkg/demo_pkg/data/table.csv",)


@pytest.mark.parametrize(
    ("into", "rel", "component"),
    [
        ("site", "sitecustomize.py", "unlisted"),  # listed by no distribution
        ("package", "runtime/extra.py", "rapha"),
    ],
)
def test_a_file_added_changes_it(
    sandbox: Sandbox, site: Path, package: Path, into: str, rel: str, component: str
) -> None:
    before = _measure(sandbox, site, package)
    ((site if into == "site" else package) / rel).write_text("import os\n")

    after = _measure(sandbox, site, package)

    assert _changed(before, after) == {component}
    assert after.file_counts[component] == before.file_counts[component] + 1


def test_a_new_distribution_version_changes_it(
    sandbox: Sandbox, tmp_path: Path, site: Path, package: Path
) -> None:
    other = _install(tmp_path / "other", DIST_FILES, version="1.1")

    assert (
        _measure(sandbox, other, package).components["distributions"]
        != _measure(sandbox, site, package).components["distributions"]
    )


@pytest.mark.parametrize(
    "rel", ["attest/measure.py", "runtime/policies/output.rego", "runtime/templates/train.toml"]
)
def test_one_byte_of_rapha_changes_it(
    sandbox: Sandbox, site: Path, package: Path, rel: str
) -> None:
    before = _measure(sandbox, site, package)
    path = package / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    after = _measure(sandbox, site, package)

    assert _changed(before, after) == {"rapha"}


def test_byte_code_does_not_change_it(sandbox: Sandbox, site: Path, package: Path) -> None:
    before = _measure(sandbox, site, package)
    for directory in (package, package / "runtime", site / "demo_pkg"):
        cache = directory / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / "mod.cpython-311.pyc").write_bytes(os.urandom(64))
    (site / "demo_pkg/core.pyc").write_bytes(os.urandom(64))
    (package / "stale.pyo").write_bytes(os.urandom(64))

    after = _measure(sandbox, site, package)

    assert after == before


def test_a_record_rewritten_alone_does_not_change_it(
    sandbox: Sandbox, site: Path, package: Path
) -> None:
    """RECORD is not measured: every file it lists is, from its own bytes."""
    before = _measure(sandbox, site, package)
    record = site / "demo_pkg-1.0.dist-info/RECORD"
    record.write_text(record.read_text() + "demo_pkg/__pycache__/core.cpython-311.pyc,,\n")

    assert _measure(sandbox, site, package) == before


# --- changes with the sandbox profile -----------------------------------------------------


def test_other_limits_change_the_profile(sandbox: Sandbox, site: Path, package: Path) -> None:
    before = _measure(sandbox, site, package)
    tighter = Sandbox(limits=SandboxLimits(memory=8 << 30))

    after = _measure(tighter, site, package)

    assert _changed(before, after) == {"sandbox_profile"}


def test_another_bwrap_changes_it(
    sandbox: Sandbox, tmp_path: Path, site: Path, package: Path
) -> None:
    before = _measure(sandbox, site, package)
    copy = tmp_path / "bwrap"
    shutil.copyfile(sandbox.bwrap, copy)
    same_bytes = _measure(Sandbox(bwrap=copy), site, package)
    copy.write_bytes(copy.read_bytes() + b"\0")

    other_bytes = _measure(Sandbox(bwrap=copy), site, package)

    assert _changed(before, same_bytes) == {"bwrap"}  # the path is measured too
    assert _changed(same_bytes, other_bytes) == {"bwrap"}
    assert other_bytes.binaries["bwrap"]["sha256"] == crypto.digest_file(copy)


def test_a_missing_bwrap_is_refused(tmp_path: Path, site: Path, package: Path) -> None:
    with pytest.raises(DependencyError, match="apt-get install bubblewrap"):
        _measure(Sandbox(bwrap=tmp_path / "nowhere"), site, package)


# --- the node's configuration ------------------------------------------------------------


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    directory = tmp_path / "node"
    result = runner.invoke(app, ["node", "init", "--dir", str(directory), "--name", "m-node"])
    assert result.exit_code == 0, result.output
    return directory / "node.toml"


def _measure_node(config: Path, site: Path, package: Path) -> Measurement:
    settings = load_node_settings(config, env={})
    return _measure(sandbox_from_settings(settings.sandbox), site, package)


def test_policies_and_scope_are_not_measured(node_config: Path, site: Path, package: Path) -> None:
    before = _measure_node(node_config, site, package)
    policy = node_config.parent / "policies/output.rego"
    policy.write_text(policy.read_text() + "\n# tightened by the DPO\n")
    text = node_config.read_text()
    text = text.replace("max_studies = 1000", "max_studies = 999")
    text = text.replace('body_parts = ["CHEST"]', 'body_parts = ["CHEST", "ABDOMEN"]')
    text = text.replace("k_anonymity = 10", "k_anonymity = 20")
    node_config.write_text(text)

    after = _measure_node(node_config, site, package)

    assert load_node_settings(node_config, env={}).scope.max_studies == 999
    assert after == before


def test_the_sandbox_table_is_measured(node_config: Path, site: Path, package: Path) -> None:
    before = _measure_node(node_config, site, package)
    text = node_config.read_text().replace("processes = 512", "processes = 256")
    node_config.write_text(text)

    after = _measure_node(node_config, site, package)

    assert _changed(before, after) == {"sandbox_profile"}


def test_cli_names_the_missing_bwrap_and_exits_10(node_config: Path) -> None:
    text = node_config.read_text().replace('bwrap = "/usr/bin/bwrap"', 'bwrap = "/nowhere/bwrap"')
    node_config.write_text(text)

    result = runner.invoke(app, ["node", "measure", "--config", str(node_config)])

    assert result.exit_code == ExitCode.DEPENDENCY
    assert "bubblewrap" in result.output
