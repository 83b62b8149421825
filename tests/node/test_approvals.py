"""rapha.node.approvals and ``rapha node approvals``: requests, decisions, files, audit."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rapha import crypto
from rapha.audit import AuditLog, verify_log
from rapha.cli import app
from rapha.crypto import Ed25519PrivateKey
from rapha.errors import DataError, ExitCode, IntegrityError, UsageError
from rapha.node import init_node
from rapha.node.approvals import (
    APPROVALS_DIR,
    AUDIT_EVENT,
    Approval,
    ApprovalStatus,
    ApprovalStore,
)

runner = CliRunner()

_START = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


def _request(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "org": "acme-ai",
        "kind": "train",
        "bundle_digest": "ab" * 32,
        "signer_fingerprint": "0123456789abcdef0123456789abcdef",
        "signer_pinned": True,
        "model": {"source": "zoo", "name": "monai.DenseNet121", "kwargs": {"dropout_prob": 0.1}},
        "hparams": {"optimizer": "adam", "learning_rate": 0.001, "epochs": 5, "batch_size": 32},
        "outputs": ["weights.safetensors"],
        "dp": {"epsilon": 8.0, "delta": 1e-5},
        "price_per_record": 2500,
        "records": 1200,
        "requirements": {"gpu": False, "memory_gb": 12},
    }
    return request | changes


class _Clock:
    """A clock one minute further on at every reading."""

    def __init__(self) -> None:
        self.now = _START

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> ApprovalStore:
    return ApprovalStore(tmp_path / "state", clock=_Clock())


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return crypto.generate_private_key()


@pytest.fixture
def audit(tmp_path: Path, key: Ed25519PrivateKey) -> AuditLog:
    return AuditLog.create(tmp_path / "audit.jsonl", key)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- requests --------------------------------------------------------------------------------


def test_request_records_a_pending_job(store: ApprovalStore) -> None:
    record = store.request("job-1", _request())

    assert record.job_id == "job-1"
    assert record.status is ApprovalStatus.PENDING
    assert record.to_json()["status"] == "pending"
    assert record.request == _request()
    assert record.requested_at == _START + timedelta(minutes=1)
    assert (record.decided_at, record.decided_by, record.note) == (None, None, "")
    assert store.get("job-1") == record


def test_request_is_idempotent_whatever_the_status(store: ApprovalStore) -> None:
    first = store.request("job-1", _request())

    again = store.request("job-1", _request())
    store.reject("job-1", by="dpo", reason="not this quarter")
    after_decision = store.request("job-1", _request(records=1300))

    assert again == first
    assert after_decision.status is ApprovalStatus.REJECTED
    assert after_decision.requested_at == first.requested_at
    assert [r.job_id for r in store.all()] == ["job-1"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bundle_digest", "cd" * 32),
        ("price_per_record", 1),
        ("outputs", ["weights.safetensors", "x"]),
    ],
)
def test_a_changed_request_for_the_same_job_is_refused(
    store: ApprovalStore, field: str, value: Any
) -> None:
    store.request("job-1", _request())

    with pytest.raises(IntegrityError, match=f"different {field}"):
        store.request("job-1", _request(**{field: value}))

    stored = store.get("job-1")
    assert stored is not None
    assert stored.request == _request()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("org", ""),
        ("kind", "predict"),
        ("bundle_digest", "AB" * 32),
        ("signer_fingerprint", "not-hex"),
        ("signer_pinned", "yes"),
        ("model", {"source": "hub"}),
        ("hparams", None),
        ("outputs", "weights.safetensors"),
        ("dp", 8.0),
        ("price_per_record", -1),
        ("price_per_record", True),
        ("records", 1.5),
        ("requirements", []),
    ],
)
def test_a_malformed_request_is_refused_naming_the_field(
    store: ApprovalStore, field: str, value: Any
) -> None:
    with pytest.raises(UsageError, match=field.split("_")[0]):
        store.request("job-1", _request(**{field: value}))

    assert store.get("job-1") is None


def test_a_request_without_a_field_is_refused(store: ApprovalStore) -> None:
    request = _request()
    del request["outputs"]

    with pytest.raises(UsageError, match="'outputs'"):
        store.request("job-1", request)


@pytest.mark.parametrize(
    "job_id", ["", "../escape", "a/b", "job.1", "x" * 65, "job 1", "..", "job\n1"]
)
def test_a_job_id_that_is_not_a_hub_id_is_refused(
    store: ApprovalStore, tmp_path: Path, job_id: str
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.request(job_id, _request()),
        lambda: store.get(job_id),
        lambda: store.approve(job_id, by="dpo"),
        lambda: store.reject(job_id, by="dpo", reason="no"),
    ]
    for call in calls:
        with pytest.raises(UsageError, match="job id"):
            call()

    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "state").exists()


def test_all_and_pending_are_in_request_order(store: ApprovalStore) -> None:
    for job_id in ("job-c", "job-a", "job-b"):
        store.request(job_id, _request())
    store.approve("job-a", by="dpo")

    assert [r.job_id for r in store.all()] == ["job-c", "job-a", "job-b"]
    assert [r.job_id for r in store.pending()] == ["job-c", "job-b"]


def test_an_empty_store_creates_nothing(store: ApprovalStore) -> None:
    assert store.get("job-1") is None
    assert store.all() == []
    assert store.pending() == []
    assert not store.directory.exists()


# --- decisions -------------------------------------------------------------------------------


def test_approve_records_who_and_when(store: ApprovalStore) -> None:
    store.request("job-1", _request())

    record = store.approve("job-1", by="  Dr. Jane Doe ", note="checked with radiology")

    assert record.status is ApprovalStatus.APPROVED
    assert record.decided_by == "Dr. Jane Doe"
    assert record.decided_at == _START + timedelta(minutes=2)
    assert record.note == "checked with radiology"
    assert store.get("job-1") == record
    assert store.pending() == []


def test_reject_records_the_reason(store: ApprovalStore) -> None:
    store.request("job-1", _request())

    record = store.reject("job-1", by="dpo", reason="signer not pinned")

    assert record.status is ApprovalStatus.REJECTED
    assert record.note == "signer not pinned"
    assert store.get("job-1") == record


@pytest.mark.parametrize("first", ["approve", "reject"])
@pytest.mark.parametrize("second", ["approve", "reject"])
def test_a_second_decision_is_refused_naming_the_status(
    store: ApprovalStore, first: str, second: str
) -> None:
    store.request("job-1", _request())
    decide = {
        "approve": lambda: store.approve("job-1", by="alice"),
        "reject": lambda: store.reject("job-1", by="alice", reason="no"),
    }
    decided = decide[first]()

    with pytest.raises(UsageError, match=f"already {decided.status.value}"):
        decide[second]()

    assert store.get("job-1") == decided


def test_deciding_an_unknown_job_is_refused(store: ApprovalStore) -> None:
    store.request("job-1", _request())

    with pytest.raises(UsageError, match="no approval request for job job-2"):
        store.approve("job-2", by="dpo")


@pytest.mark.parametrize("by", ["", "   ", "Doe^Jane", "x" * 129, "bad\x1bname"])
def test_a_decision_must_name_who_decided(store: ApprovalStore, by: str) -> None:
    store.request("job-1", _request())

    with pytest.raises(UsageError, match="--by"):
        store.approve("job-1", by=by)

    assert store.pending() != []


@pytest.mark.parametrize("reason", ["", "  \n"])
def test_a_rejection_needs_a_reason(store: ApprovalStore, reason: str) -> None:
    store.request("job-1", _request())

    with pytest.raises(UsageError, match="reason"):
        store.reject("job-1", by="dpo", reason=reason)

    assert store.pending() != []


def test_decisions_go_to_the_audit_log_without_the_note(
    store: ApprovalStore, audit: AuditLog, key: Ed25519PrivateKey
) -> None:
    store.request("job-1", _request())
    store.request("job-2", _request())

    store.approve("job-1", by="alice", note="secret words", audit=audit)
    store.reject("job-2", by="bob", reason="too expensive", audit=audit)

    entries = _events(audit.path)[1:]
    assert [(e["event"], e["data"]) for e in entries] == [
        (AUDIT_EVENT, {"job_id": "job-1", "status": "approved", "by": "alice", "note_chars": 12}),
        (AUDIT_EVENT, {"job_id": "job-2", "status": "rejected", "by": "bob", "note_chars": 13}),
    ]
    assert "secret" not in audit.path.read_text()
    assert verify_log(audit.path, key.public_key()).entries == 3


def test_a_refused_decision_is_not_logged(store: ApprovalStore, audit: AuditLog) -> None:
    store.request("job-1", _request())
    store.approve("job-1", by="alice", audit=audit)

    with pytest.raises(UsageError):
        store.reject("job-1", by="bob", reason="late", audit=audit)

    assert len(_events(audit.path)) == 2


# --- files -----------------------------------------------------------------------------------


def test_files_are_private_and_written_atomically(store: ApprovalStore) -> None:
    store.request("job-1", _request())
    store.approve("job-1", by="dpo")

    path = store.path("job-1")

    assert path == store.directory / "job-1.json"
    assert store.directory.name == APPROVALS_DIR
    assert _mode(store.directory) == 0o700
    assert _mode(path) == 0o600
    assert json.loads(path.read_text())["status"] == "approved"
    assert not list(store.directory.glob(".*.tmp-*"))


def test_records_persist_across_instances(tmp_path: Path) -> None:
    ApprovalStore(tmp_path).request("job-1", _request())
    ApprovalStore(tmp_path).approve("job-1", by="dpo", note="ok")

    record = ApprovalStore(tmp_path).get("job-1")

    assert record is not None
    assert (record.status, record.decided_by, record.note) == ("approved", "dpo", "ok")
    assert record.requested_at.tzinfo is not None


def test_to_json_is_what_the_file_holds(store: ApprovalStore) -> None:
    record = store.approve(store.request("job-1", _request()).job_id, by="dpo")

    doc = json.loads(store.path("job-1").read_text())

    assert doc == {"schema": 1, **record.to_json()}
    assert doc["requested_at"] == "2025-03-01T09:31:00.000000Z"
    assert doc["decided_at"] == "2025-03-01T09:32:00.000000Z"


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: "{not json",
        lambda doc: json.dumps([doc]),
        lambda doc: json.dumps({**doc, "schema": 2}),
        lambda doc: json.dumps({**doc, "status": "maybe"}),
        lambda doc: json.dumps({**doc, "job_id": "job-2"}),
        lambda doc: json.dumps({**doc, "decided_by": "mallory"}),
        lambda doc: json.dumps({**doc, "status": "approved"}),
        lambda doc: json.dumps({**doc, "requested_at": "yesterday"}),
        lambda doc: json.dumps({**doc, "request": {**doc["request"], "kind": "x"}}),
        lambda doc: json.dumps({k: v for k, v in doc.items() if k != "note"}),
    ],
)
def test_a_corrupt_file_is_refused_naming_it(
    store: ApprovalStore, damage: Callable[[dict[str, Any]], str]
) -> None:
    store.request("job-1", _request())
    path = store.path("job-1")
    path.write_text(damage(json.loads(path.read_text())))
    before = path.read_bytes()
    calls: list[Callable[[], object]] = [
        lambda: store.get("job-1"),
        store.all,
        store.pending,
        lambda: store.approve("job-1", by="dpo"),
        lambda: store.request("job-1", _request()),
    ]

    for call in calls:
        with pytest.raises(DataError, match=re.escape(str(path))):
            call()

    assert path.read_bytes() == before


def test_a_naive_clock_is_refused(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path, clock=lambda: datetime(2025, 1, 1))

    with pytest.raises(UsageError, match="timezone-aware"):
        store.request("job-1", _request())


def test_approval_is_frozen(store: ApprovalStore) -> None:
    record = store.request("job-1", _request())

    with pytest.raises(AttributeError):
        record.status = ApprovalStatus.APPROVED  # type: ignore[misc]
    assert isinstance(record, Approval)


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node from ``rapha node init`` with two jobs put up for approval."""
    report = init_node(tmp_path / "node", name="n1")
    store = ApprovalStore(report.settings.state_dir, clock=_Clock())
    store.request("job-1", _request())
    store.request(
        "job-2",
        _request(
            kind="evaluate",
            model={"source": "custom"},
            signer_pinned=False,
            dp=None,
            outputs=[],
            price_per_record=1_500_000,
            records=40,
        ),
    )
    return report.config


def _cli(config: Path, *args: str) -> Any:
    return runner.invoke(app, ["node", "approvals", args[0], "--config", str(config), *args[1:]])


def _store_of(config: Path) -> ApprovalStore:
    return ApprovalStore(config.parent / "state")


def test_cli_list_shows_pending_jobs(node: Path) -> None:
    result = _cli(node, "list")

    assert result.exit_code == 0, result.output
    assert "job-1" in result.stdout
    assert "job-2" in result.stdout
    assert "acme-ai" in result.stdout
    assert "0.002500" in result.stdout
    assert "1,500,000" in result.stdout
    assert "pending" in result.stdout
    assert "approvals are off" in result.stderr


def test_cli_list_all_and_json(node: Path) -> None:
    _store_of(node).approve("job-1", by="dpo")

    pending = json.loads(_cli(node, "list", "--json").stdout)
    everything = json.loads(_cli(node, "list", "--all", "--json").stdout)

    assert [r["job_id"] for r in pending] == ["job-2"]
    assert [(r["job_id"], r["status"]) for r in everything] == [
        ("job-1", "approved"),
        ("job-2", "pending"),
    ]


def test_cli_list_says_when_nothing_waits(tmp_path: Path) -> None:
    config = init_node(tmp_path / "node", name="n1").config

    result = _cli(config, "list")

    assert result.exit_code == 0, result.output
    assert "No job is waiting for approval." in result.stdout


def test_cli_show_prints_everything_a_person_must_see(node: Path) -> None:
    result = _cli(node, "show", "job-1")

    assert result.exit_code == 0, result.output
    out = result.stdout
    for expected in (
        "acme-ai",
        "train",
        "ab" * 32,
        "0123456789abcdef0123456789abcdef (pinned by this hospital)",
        "zoo: monai.DenseNet121",
        "dropout_prob = 0.1",
        "learning_rate = 0.001",
        "weights.safetensors",
        "epsilon = 8.0",
        "0.002500 USDC per record (2,500 base units)",
        "1,200",
        "3.000000 USDC (3,000,000 base units)",
        "memory_gb = 12",
        "rapha node approvals approve job-1",
    ):
        assert expected in out, expected


def test_cli_show_warns_about_an_unpinned_signer_and_custom_code(node: Path) -> None:
    result = _cli(node, "show", "job-2")

    assert result.exit_code == 0, result.output
    assert "NOT pinned" in result.stdout
    assert "custom (the company's own code)" in result.stdout
    assert "off (no DP-SGD)" in result.stdout
    assert "60.000000 USDC" in result.stdout


def test_cli_show_json_is_the_record(node: Path) -> None:
    result = _cli(node, "show", "job-1", "--json")

    assert result.exit_code == 0, result.output
    record = _store_of(node).get("job-1")
    assert record is not None
    assert json.loads(result.stdout) == record.to_json()


def test_cli_approve_and_reject_write_the_audit_log(node: Path) -> None:
    approved = _cli(node, "approve", "job-1", "--by", "Jane Doe", "--note", "fine")
    rejected = _cli(node, "reject", "job-2", "--by", "Jane Doe", "--reason", "unpinned key")

    assert approved.exit_code == 0, approved.output
    assert "job job-1: approved by Jane Doe" in approved.stdout
    assert rejected.exit_code == 0, rejected.output
    assert "rejected" in rejected.stdout
    assert "will not run it" in rejected.stdout
    store = _store_of(node)
    assert [r.status for r in store.all()] == ["approved", "rejected"]
    log = node.parent / "state/audit.jsonl"
    public_key = crypto.load_public_key(node.parent / "keys/node.key.pub")
    assert verify_log(log, public_key).entries == 4
    assert [e["data"]["status"] for e in _events(log) if e["event"] == AUDIT_EVENT] == [
        "approved",
        "rejected",
    ]


def test_cli_a_second_decision_fails_with_a_usage_exit_code(node: Path) -> None:
    _cli(node, "approve", "job-1", "--by", "alice")

    result = _cli(node, "reject", "job-1", "--by", "bob", "--reason", "late")

    assert result.exit_code == ExitCode.CONFIG
    assert "already approved" in result.stderr


@pytest.mark.parametrize("command", ["show", "approve"])
def test_cli_an_unknown_job_fails_clearly(node: Path, command: str) -> None:
    args = ["--by", "alice"] if command == "approve" else []

    result = _cli(node, command, "job-9", *args)

    assert result.exit_code == ExitCode.CONFIG
    assert "no approval request for job job-9" in result.stderr


def test_cli_reject_needs_a_reason(node: Path) -> None:
    result = _cli(node, "reject", "job-1", "--by", "alice")

    assert result.exit_code != 0
    assert _store_of(node).pending() != []


def test_cli_a_corrupt_file_exits_with_the_data_code(node: Path) -> None:
    path = _store_of(node).path("job-1")
    path.write_text("{")

    result = _cli(node, "list")

    assert result.exit_code == ExitCode.DATA
    assert "job-1.json" in result.stderr
