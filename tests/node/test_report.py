"""``rapha node report``: a job's record of processing, from a real signed audit log.

The log is the node's own (``init_node``), extended with the entries a real job writes
(``pacs.scope``, ``view.build``, ``job.admitted``, ``job.sandbox``, ``guard.decision`` …)
and those of the node agent (``agent.*``), for three jobs: one denied by the output
guard, one delivered, and one that failed before it built a view. An identifier is
planted in fields the report does not name; it must never reach the report.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rapha.audit import AuditLog
from rapha.cli import app
from rapha.cli.node_report import render_markdown
from rapha.errors import ExitCode, UsageError
from rapha.node import init_node, load_node_settings
from rapha.node.report import FORMAT, JobReport, job_report

DENIED, DELIVERED, EARLY = "job-7f3a", "job-9b21", "job-0c44"
PLANTED = "MRN-55512345"
DIGEST = "ab" * 32
FINGERPRINT = "cd" * 16
SHA = "ef" * 32
RECEIPT = "12" * 32
DENY_REASON = "unexpected_file: the output holds a file the job's output policy does not name"


def _clock() -> Callable[[], datetime]:
    start = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    ticks = itertools.count()
    return lambda: start + timedelta(seconds=next(ticks))


def _view(job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "source": "folder",
        "digest": DIGEST,
        "records": 120,
        "counts": {"train": 84, "val": 18, "test": 18},
        "exclusions": {"patient_opted_out": 5, "text_found_by_ocr": 2},
        "studies": 40,
        "patients": 35,
        "ocr_disabled": [],
        "options": ["113100"],
        "seconds": 3.2,
        "note": PLANTED,
    }


def _scope(job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "source": "folder",
        "modalities": ["CR", "DX"],
        "body_parts": ["CHEST"],
        "date_from": "2021-01-01",
        "date_to": "2026-12-01",
        "max_studies": 1000,
        "study_allow_list": False,
        "accession_allow_list": False,
    }


def _claimed(job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "org": "acme-ai",
        "kind": "train",
        "bundle_digest": DIGEST,
        "price_per_record": 250,
        "requirements": {"modality": "CR", "note": PLANTED},
    }


def _admitted(job_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "job_id": job_id,
        "org": "acme-ai",
        "kind": "train",
        "model_source": "zoo",
        "bundle_digest": DIGEST,
        "records": 102,
        **extra,
    }


def _sandbox(job_id: str, mode: str, returncode: int = 0) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "mode": mode,
        "returncode": returncode,
        "timed_out": False,
        "wall_seconds": 12.5,
        "leftover_processes": 0,
    }


def _write_jobs(log: AuditLog) -> None:
    log.append("pacs.query", {"source": "dicomweb", "modality": "CR", "limit": "100"})
    # A job the output guard denied.
    log.append("agent.claimed", _claimed(DENIED))
    log.append("agent.approval", {"job_id": DENIED, "status": "approved", "by": "dpo-jane"})
    log.append("pacs.scope", _scope(DENIED))
    log.append("view.build", _view(DENIED))
    log.append("job.admitted", _admitted(DENIED, dp=False))
    log.append("job.sandbox", _sandbox(DENIED, "train"))
    log.append(
        "guard.decision",
        {
            "job": DENIED,
            "kind": "train",
            "allowed": False,
            "reasons": [DENY_REASON],
            "entries": 3,
            "read": [{"name": PLANTED, "size": 10, "sha256": SHA}],
            "files": [],
        },
    )
    log.append("agent.failed", {"job_id": DENIED, "code": "output_denied"})
    # A job that was delivered, with DP and a pinned signer.
    log.append("agent.claimed", _claimed(DELIVERED))
    log.append("pacs.scope", _scope(DELIVERED))
    log.append("view.build", _view(DELIVERED))
    signer = {"fingerprint": FINGERPRINT, "pinned": True}
    log.append("job.admitted", _admitted(DELIVERED, dp=True, epsilon=2.5, signer=signer))
    log.append("job.sandbox", _sandbox(DELIVERED, "train"))
    log.append("job.sandbox", _sandbox(DELIVERED, "predict"))
    log.append("job.evaluated", {"job_id": DELIVERED, "metrics_sha256": SHA})
    files = [
        {"name": "weights.safetensors", "size": 4096, "sha256": SHA},
        {"name": "metrics.json", "size": 512, "sha256": DIGEST},
    ]
    log.append(
        "guard.decision",
        {"job": DELIVERED, "kind": "train", "allowed": True, "reasons": [], "files": files},
    )
    log.append("job.outbox", {"job_id": DELIVERED, "files": 3})
    log.append(
        "agent.delivered",
        {"job_id": DELIVERED, "receipt_hash": RECEIPT, "hub": "hub.example.org", "files": files},
    )
    log.append("agent.mystery", {"job_id": DELIVERED, "detail": PLANTED})
    log.append(
        "agent.cleanup", {"job_id": DELIVERED, "removed": ["job", "outbox"], "kept": ["view"]}
    )
    # A job that failed before anything was read.
    log.append("agent.claimed", _claimed(EARLY))
    log.append("agent.lost_lease", {"job_id": EARLY})
    log.append("agent.failed", {"job_id": EARLY, "code": "bundle_signature"})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    init_node(tmp_path / "node", name="report-node", source=str(tmp_path))
    config = tmp_path / "node" / "node.toml"
    settings = load_node_settings(config, env={})
    _write_jobs(AuditLog(settings.audit_log, settings.keys.load().signing_key, clock=_clock()))
    return config


def _report(config: Path, job_id: str) -> JobReport:
    return job_report(load_node_settings(config, env={}), job_id)


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["node", "report", *args])
    return result.exit_code, result.stdout, result.stderr


# --- content -------------------------------------------------------------------------------


def test_a_denied_job_reports_its_counts_decision_and_failure(config: Path) -> None:
    report = _report(config, DENIED)
    out = report.to_json()
    md = render_markdown(report)

    assert out["format"] == FORMAT
    assert out["audit_log"]["verified"] is True
    assert out["audit_log"]["entries"] == 2 + 24  # genesis, node.init, this test's entries
    assert out["what_ran"]["org"] == "acme-ai"
    assert out["what_ran"]["dp"] == {"enabled": False, "epsilon": None}
    assert out["records"]["view"]["counts"] == {"train": 84, "val": 18, "test": 18}
    assert out["records"]["view"]["exclusions"] == {"patient_opted_out": 5, "text_found_by_ocr": 2}
    assert out["records"]["view"]["patients"] == 35
    [decision] = out["outputs"]["guard"]
    assert decision["allowed"] is False
    assert decision["reasons"] == [DENY_REASON]
    assert out["outputs"]["failed"] == {"code": "output_denied"}
    assert out["outputs"]["delivered"] is None
    assert out["approvals"] == [
        {"time": "2026-03-02T09:00:02.000000Z", "status": "approved", "by": "dpo-jane"}
    ]
    assert [t["event"] for t in out["timeline"]] == [
        "agent.claimed", "agent.approval", "pacs.scope", "view.build", "job.admitted",
        "job.sandbox", "guard.decision", "agent.failed",
    ]  # fmt: skip
    assert "**Yes.** The audit log verified" in md
    assert out["audit_log"]["head"] in md
    assert "| Studies | 40 |" in md
    assert "| Patients | 35 |" in md
    assert "| … in the train split | 84 |\n| … in the val split | 18 |\n| … in the test" in md
    assert "| patient\\_opted\\_out | 5 |" in md
    assert "denied: nothing left the node" in md
    assert "code `output_denied`" in md
    assert "| 2026-03-02T09:00:02.000000Z | approved | dpo-jane |" in md


def test_a_delivered_job_reports_signer_dp_runs_files_and_receipt(config: Path) -> None:
    report = _report(config, DELIVERED)
    out = report.to_json()
    md = render_markdown(report)

    ran = out["what_ran"]
    assert ran["signer_fingerprint"] == FINGERPRINT
    assert ran["signer_pinned"] is True
    assert ran["dp"] == {"enabled": True, "epsilon": 2.5}
    assert ran["model_source"] == "zoo"
    assert ran["price_per_record"] == 250
    assert [r["mode"] for r in out["sandbox"]] == ["train", "predict"]
    assert out["outputs"]["delivered"]["receipt_hash"] == RECEIPT
    assert out["outputs"]["guard"][0]["files"][0]["name"] == "weights.safetensors"
    assert out["outputs"]["outbox_files"] == 3
    assert out["cleanup"] == {"removed": ["job", "outbox"], "kept": ["view"]}
    mystery = [t for t in out["timeline"] if t["event"] == "agent.mystery"]
    assert mystery == [{"seq": mystery[0]["seq"], "time": mystery[0]["time"],
                        "event": "agent.mystery", "described": False}]  # fmt: skip
    assert "on, epsilon = 2.5" in md
    assert f"`{FINGERPRINT}`" in md
    assert "| Signing key pinned by this hospital | yes |" in md
    assert f"| weights.safetensors | 4096 | `{SHA}` |" in md
    assert f"receipt hash `{RECEIPT}`" in md
    assert "| train | 0 | 12.5 | no | 0 |" in md
    assert "`agent.mystery` (not described above)" in md
    assert "Removed after the job: job, outbox." in md
    assert "Kept on purpose ([hub] keep_views): view." in md


def test_a_job_that_failed_early_says_what_is_not_recorded(config: Path) -> None:
    report = _report(config, EARLY)
    out = report.to_json()
    md = render_markdown(report)

    assert out["what_ran"]["admitted"] is False
    assert out["what_ran"]["signer_pinned"] is None
    assert out["records"]["view"] is None
    assert out["sandbox"] == []
    assert out["outputs"]["failed"] == {"code": "bundle_signature"}
    assert "No view build is recorded for this job." in md
    assert "No sandboxed run is recorded for this job." in md
    assert out["outputs"]["lease_lost"] is True
    assert "The hub handed the job to another node" in md
    assert "| Signing key pinned by this hospital | not recorded |" in md


@pytest.mark.parametrize("job_id", [DENIED, DELIVERED, EARLY])
def test_no_planted_identifier_and_no_other_job_reaches_the_report(
    config: Path, job_id: str
) -> None:
    report = _report(config, job_id)
    texts = [render_markdown(report), json.dumps(report.to_json())]

    for text in texts:
        assert PLANTED not in text
        assert "requirements" not in text
        for other in {DENIED, DELIVERED, EARLY} - {job_id}:
            assert other not in text


# --- integrity and errors ------------------------------------------------------------------


def test_a_tampered_log_is_reported_as_not_verified_and_exits_4(config: Path) -> None:
    log = load_node_settings(config, env={}).audit_log
    lines = log.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if '"records":120' in line)
    lines[index] = lines[index].replace('"records":120', '"records":12')
    log.write_text("".join(lines))

    report = _report(config, DENIED)
    code, stdout, stderr = _invoke(DENIED, "--config", str(config))

    assert report.verified is False
    assert f"line {index + 1}" in (report.verify_error or "")
    assert report.head is None
    assert code == ExitCode.INTEGRITY
    assert "**No. The audit log did NOT verify:**" in stdout
    assert "cannot be relied on" in stdout
    assert "does not verify" in stderr


def test_an_unknown_job_id_is_an_error_naming_it(config: Path) -> None:
    with pytest.raises(UsageError, match="job-nope"):
        _report(config, "job-nope")

    code, stdout, stderr = _invoke("job-nope", "--config", str(config))

    assert code == ExitCode.CONFIG
    assert stdout == ""
    assert "job-nope" in stderr


def test_the_cli_writes_json_and_markdown_files(config: Path, tmp_path: Path) -> None:
    md_file, json_file = tmp_path / "report.md", tmp_path / "report.json"

    md_code, _, md_err = _invoke(DENIED, "--config", str(config), "--out", str(md_file))
    json_code, json_out, _ = _invoke(DELIVERED, "--config", str(config), "--format", "json")

    assert md_code == 0
    assert "report written to" in md_err
    assert md_file.read_text().startswith(f"# Record of processing: job `{DENIED}`")
    assert json_code == 0
    assert json.loads(json_out)["outputs"]["delivered"]["receipt_hash"] == RECEIPT
    assert not json_file.exists()
