"""``rapha node check``: every check on a real node, each failure with its own fix.

The node is made by ``init_node`` over a folder of real pydicom sample files (two CR
studies); the hub is the real hub app under uvicorn on loopback (and a free port where
nothing listens), the sandbox is the real bubblewrap probe, the TPM a real ``swtpm``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from rapha import crypto
from rapha.cli import app
from rapha.hub.db import open_database
from rapha.hub.services import Hub
from rapha.node import init_node
from rapha.node.check import CHECKS, CheckResult, CheckStatus, run_checks
from rapha.runtime.sandbox import Sandbox
from support.hub import PEPPER, served
from support.orthanc import free_port
from support.swtpm import SwtpmServer, swtpm_or_skip

OK, FAIL, SKIPPED = CheckStatus.OK, CheckStatus.FAIL, CheckStatus.SKIPPED
# Two studies: CR1 and CR2 of patient 77654033 are one study, RG1_UNCI is another.
SAMPLES = ("77654033/CR1/6154", "77654033/CR2/6247", "RG1_UNCI.dcm")
SCOPE = """\
[scope]
modalities = ["CR"]
body_parts = ["CHEST", "CSPINE"]
date_from = 1990-01-01
date_to = 2030-12-31
max_studies = 50
"""
HOSPITAL_ID = "0x" + "ab" * 32
PAYOUT = "0x" + "cd" * 20


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pacs")
    for name in SAMPLES:
        path = get_testdata_file(name)
        assert path is not None, f"pydicom sample {name} is missing"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / name)
    return root


@pytest.fixture
def node(tmp_path: Path, pacs: Path) -> Path:
    """A fresh node over ``pacs``; returns its node.toml."""
    init_node(tmp_path / "node", name="check-node", source=str(pacs))
    config = tmp_path / "node" / "node.toml"
    text = re.sub(r"(?ms)^\[scope\].*?(?=^# --- keys)", SCOPE + "\n", config.read_text())
    config.write_text(text)
    return config


@pytest.fixture(scope="module")
def sandbox_here() -> None:
    try:
        Sandbox().ensure_available()
    except Exception as exc:  # any reason is shown in the skip
        pytest.skip(f"no usable sandbox here: {exc}")


def _edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text, old
    config.write_text(text.replace(old, new, 1))


def _add_hub(config: Path, url: str, extra: str = "") -> Path:
    """Append a [hub] table (and a 0600 settlement key); return the key file."""
    key = config.parent / "keys" / "settlement.key"
    crypto.write_private_file(key, ("0x" + "11" * 32 + "\n").encode())
    config.write_text(
        config.read_text()
        + f'\n[hub]\nurl = "{url}"\nnode_id = "node-1"\nhospital_id = "{HOSPITAL_ID}"\n'
        + f'settlement_key = "keys/settlement.key"\npayout = "{PAYOUT}"\nprice_per_record = 100\n'
        + extra
    )
    return key


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    assert [r.name for r in results] == list(CHECKS)
    return {r.name: r for r in results}


def _secrets(config: Path) -> list[str]:
    keys = config.parent / "keys"
    raw = [(keys / "hmac.key").read_bytes(), (keys / "split.key").read_bytes()]
    pem = (keys / "node.key").read_text()
    body = "".join(line for line in pem.splitlines() if "-----" not in line)
    return [r.hex() for r in raw] + [body[:24], body[-24:]]


# --- a good node -----------------------------------------------------------------------


@pytest.mark.usefixtures("sandbox_here")
def test_a_good_folder_node_passes_every_check_it_runs(node: Path) -> None:
    results = _by_name(run_checks(node, env={}))

    assert {n: r.status for n, r in results.items()} == {
        "config": OK,
        "keys": OK,
        "pacs": OK,
        "hub": SKIPPED,
        "sandbox": OK,
        "tpm": SKIPPED,
        "audit": OK,
    }
    assert "2 studies in scope" in results["pacs"].detail
    assert all(r.ok and not r.fix for r in results.values())
    shown = json.dumps([r.to_json() for r in results.values()])
    assert not [s for s in _secrets(node) if s in shown]


@pytest.mark.usefixtures("sandbox_here")
def test_the_cli_prints_a_table_and_exits_0_when_ready(node: Path) -> None:
    result = CliRunner().invoke(app, ["node", "check", "--config", str(node)])
    flat = " ".join(result.output.replace("│", " ").split())  # the table wraps by width

    assert result.exit_code == 0, result.output
    assert "ready" in flat
    assert "2 studies in scope" in flat


# --- each failure, with its own fix ------------------------------------------------------


def test_a_key_file_readable_by_others_fails_keys_with_chmod(node: Path) -> None:
    hmac_key = node.parent / "keys" / "hmac.key"
    hmac_key.chmod(0o644)

    results = _by_name(run_checks(node, env={}))

    assert results["keys"].status is FAIL
    assert "0644" in results["keys"].detail
    assert results["keys"].fix == f"chmod 600 {hmac_key}"
    assert results["pacs"].status is OK  # the other checks still ran
    assert results["audit"].status is OK
    assert not [s for s in _secrets(node) if s in json.dumps(results["keys"].to_json())]


def test_every_bad_key_file_is_listed_and_the_audit_check_waits_for_them(node: Path) -> None:
    keys = node.parent / "keys"
    (keys / "split.key").chmod(0o640)
    (keys / "node.key").unlink()

    results = _by_name(run_checks(node, env={}))

    assert results["keys"].status is FAIL
    assert "split.key" in results["keys"].detail
    assert "node.key does not exist" in results["keys"].detail
    assert f"chmod 600 {keys / 'split.key'}" in results["keys"].fix
    assert "restore the node's keys from your backup" in results["keys"].fix
    assert results["audit"].status is SKIPPED


def test_a_pinned_company_key_that_does_not_load_fails_keys(node: Path) -> None:
    _edit(node, "[policy]\n", '[policy]\ntrusted_keys = { acme = ["keys/acme.pub"] }\n')

    results = _by_name(run_checks(node, env={}))

    assert results["keys"].status is FAIL
    assert "pinned key of acme" in results["keys"].detail
    assert "trusted_keys.acme" in results["keys"].fix


def test_a_missing_pacs_folder_fails_pacs_with_a_mount_hint(node: Path, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    text = node.read_text()
    node.write_text(re.sub(r'(?m)^path = ".*?"', f'path = "{missing}"', text, count=1))

    results = _by_name(run_checks(node, env={}))

    assert results["pacs"].status is FAIL
    assert "does not exist" in results["pacs"].detail
    assert f"mount the PACS at {missing}" in results["pacs"].fix
    assert results["keys"].status is OK


def test_a_dicomweb_pacs_where_nothing_listens_fails_pacs(node: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    text = node.read_text()
    node.write_text(
        re.sub(r'(?m)^kind = "folder"\npath = ".*?"', f'kind = "dicomweb"\nurl = "{url}"', text)
    )

    results = _by_name(run_checks(node, env={}))

    assert results["pacs"].status is FAIL
    assert "cannot reach the PACS" in results["pacs"].detail
    assert "[source] url" in results["pacs"].fix


def test_a_scope_that_matches_nothing_fails_pacs_with_a_scope_hint(node: Path) -> None:
    _edit(node, "date_from = 1990-01-01", "date_from = 2029-01-01")

    results = _by_name(run_checks(node, env={}))

    assert results["pacs"].status is FAIL
    assert "0 studies" in results["pacs"].detail
    assert "[scope]" in results["pacs"].fix


def test_a_scope_broader_than_its_cap_fails_pacs(node: Path) -> None:
    _edit(node, "max_studies = 50", "max_studies = 1")

    results = _by_name(run_checks(node, env={}))

    assert results["pacs"].status is FAIL
    assert "max_studies" in results["pacs"].fix


def test_a_hub_where_nothing_listens_fails_hub_with_a_network_hint(node: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    _add_hub(node, url)

    results = _by_name(run_checks(node, env={}))

    assert results["hub"].status is FAIL
    assert "does not answer" in results["hub"].detail
    assert "[hub] url" in results["hub"].fix
    assert results["keys"].status is OK
    assert "settlement key" in results["keys"].detail


def test_a_loose_settlement_key_fails_keys(node: Path) -> None:
    key = _add_hub(node, f"http://127.0.0.1:{free_port()}")
    key.chmod(0o640)

    results = _by_name(run_checks(node, env={}))

    assert results["keys"].status is FAIL
    assert results["keys"].fix == f"chmod 600 {key}"
    assert ("11" * 32) not in json.dumps(results["keys"].to_json())


def test_a_missing_ca_bundle_fails_hub(node: Path) -> None:
    _add_hub(node, "https://hub.example.org", 'ca_bundle = "keys/no-such-ca.pem"\n')

    results = _by_name(run_checks(node, env={}))

    assert results["hub"].status is FAIL
    assert "ca_bundle" in results["hub"].fix


def test_a_real_hub_answers_healthz(node: Path, tmp_path: Path) -> None:
    hub = Hub(open_database(f"sqlite:///{tmp_path / 'hub.db'}"), pepper=PEPPER)
    try:
        with served(hub) as client:
            _add_hub(node, str(client.base_url))

            results = _by_name(run_checks(node, env={}))
    finally:
        hub.db.close()

    assert results["hub"].status is OK, results["hub"]
    assert "is healthy" in results["hub"].detail


def test_a_missing_bwrap_fails_sandbox_with_an_install_hint(node: Path, tmp_path: Path) -> None:
    _edit(node, 'bwrap = "/usr/bin/bwrap"', f'bwrap = "{tmp_path / "no-bwrap"}"')

    results = _by_name(run_checks(node, env={}))

    assert results["sandbox"].status is FAIL
    assert "missing" in results["sandbox"].detail
    assert "apt-get install bubblewrap" in results["sandbox"].fix
    assert "[sandbox] bwrap" in results["sandbox"].fix


def test_an_unreachable_tpm_fails_tpm(node: Path) -> None:
    tcti = f"swtpm:host=127.0.0.1,port={free_port()}"
    _add_hub(
        node, f"http://127.0.0.1:{free_port()}", f'attestation = "tpm2"\ntpm_tcti = "{tcti}"\n'
    )

    results = _by_name(run_checks(node, env={}))

    assert results["tpm"].status is FAIL
    assert "tpm_tcti" in results["tpm"].fix


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmServer]:
    with swtpm_or_skip(Path(tmp_path_factory.mktemp("swtpm"))) as server:
        yield server


def test_a_running_tpm_passes_tpm(node: Path, swtpm: SwtpmServer) -> None:
    extra = f'attestation = "tpm2"\ntpm_tcti = "{swtpm.tcti}"\ntpm_pcr = 15\n'
    _add_hub(node, f"http://127.0.0.1:{free_port()}", extra)

    results = _by_name(run_checks(node, env={}))

    assert results["tpm"].status is OK, results["tpm"]
    assert "PCR 15" in results["tpm"].detail


def test_a_tampered_audit_log_fails_audit(node: Path) -> None:
    log = node.parent / "state" / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[-1] = lines[-1].replace('"seq":1', '"seq":7')
    log.write_text("".join(lines))

    results = _by_name(run_checks(node, env={}))

    assert results["audit"].status is FAIL
    assert "line 2" in results["audit"].detail
    assert "rapha node audit verify" in results["audit"].fix


def test_a_config_that_does_not_load_fails_config_and_skips_the_rest(node: Path) -> None:
    _edit(node, "max_studies = 50", "max_studies = 0")

    results = _by_name(run_checks(node, env={}))

    assert results["config"].status is FAIL
    assert "max_studies" in results["config"].detail
    assert {r.status for n, r in results.items() if n != "config"} == {SKIPPED}


def test_the_cli_lists_every_failure_and_exits_1(node: Path, tmp_path: Path) -> None:
    (node.parent / "keys" / "split.key").chmod(0o644)
    _edit(node, 'bwrap = "/usr/bin/bwrap"', f'bwrap = "{tmp_path / "no-bwrap"}"')

    result = CliRunner().invoke(app, ["node", "check", "--config", str(node), "--json"])

    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    assert out["ok"] is False
    failed = {c["name"]: c["fix"] for c in out["checks"] if c["status"] == "FAIL"}
    assert set(failed) == {"keys", "sandbox"}
    assert all(failed.values())
