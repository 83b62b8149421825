"""Proof receipts on a real chain: a settled result verifies; every change is named (issue 5)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rapha import crypto
from rapha.audit import AuditLog
from rapha.cli import app
from rapha.errors import DataError
from rapha.receipt import (
    RECEIPT_FILE,
    Check,
    SettlementTerms,
    build_receipt,
    countersign,
    failed,
    load_receipt,
    receipt_hash,
    settlement_signature,
    sign_receipt,
    verify_result,
    write_receipt,
)

from .conftest import HOSPITAL_ID, Ledger

BUDGET, PRICE, RECORDS = 5_000_000, 2_500, 1_200  # 5 USDC, 0.0025 USDC per record


@dataclass
class Result:
    """A settled job's result directory and the keys that verify it."""

    directory: Path
    node_key: Ed25519PrivateKey
    hub_key: Ed25519PrivateKey
    ledger: Ledger

    def checks(self, **overrides: Any) -> list[Check]:
        kwargs: dict[str, Any] = {
            "node_key": self.node_key.public_key(),
            "hub_key": self.hub_key.public_key(),
            "chain": self.ledger.chain,
        }
        kwargs.update(overrides)
        return verify_result(self.directory, **kwargs)

    def receipt(self) -> dict[str, Any]:
        return load_receipt(self.directory / RECEIPT_FILE)

    def rewrite(self, edit: Callable[[dict[str, Any]], None]) -> None:
        receipt = self.receipt()
        edit(receipt)
        write_receipt(self.directory, receipt)


def _failures(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.detail for c in failed(checks)}


def make_result(ledger: Ledger, tmp_path: Path, *, settle: bool = True) -> Result:
    node_key, hub_key = crypto.generate_private_key(), crypto.generate_private_key()
    client_job_id = keccak(os.urandom(16))
    chain_job_id = ledger.deposit(client_job_id, BUDGET, max_price=PRICE)
    outbox = tmp_path / "result"
    outbox.mkdir()
    metrics = {"labels": {"effusion": {"auroc": 0.91, "ci95": [0.88, 0.94]}}}
    (outbox / "metrics.json").write_bytes(crypto.canonical_json(metrics))
    (outbox / "weights.safetensors").write_bytes(os.urandom(4096))
    audit = AuditLog.create(tmp_path / "audit.jsonl", node_key)
    audit.append("job.finished", {"job_id": "job-1"})
    terms = SettlementTerms(
        chain_id=ledger.chain.chain_id,
        vault=ledger.vault.address,
        token=str(ledger.chain.token.address),
        chain_job_id=chain_job_id,
        hospital_id=HOSPITAL_ID,
        payout=ledger.payout.address,
        budget=BUDGET,
        price_per_record=PRICE,
    )
    started = datetime.now(UTC)
    body = build_receipt(
        job_id="job-1",
        kind="train",
        bundle_digest=crypto.digest_bytes(b"bundle"),
        policy_digests={
            "hospital": crypto.digest_bytes(b"admission+output+settings"),
            "job": crypto.digest_bytes(b"job profile"),
        },
        view_digest=crypto.digest_bytes(b"view"),
        records=RECORDS,
        terms=terms,
        outbox=outbox,
        attestation={"evidence": {"kind": "dev", "quote": "00" * 16}, "verdict": "dev"},
        audit_head=audit.head(),
        node_id="node-a",
        hub_id="hub-demo",
        started=started,
        finished=started + timedelta(minutes=3),
        dp={"epsilon": 7.5, "delta": 1e-5},
    )
    signed = countersign(
        sign_receipt(body, node_key=node_key, settlement_key=bytes(ledger.signer.key)),
        hub_key=hub_key,
    )
    if settle:
        ledger.vault.settle(
            ledger.chain.operator,
            chain_job_id,
            hospital_id=HOSPITAL_ID,
            records=RECORDS,
            price_per_record=PRICE,
            receipt_hash=receipt_hash(body),
            node_signature=settlement_signature(signed),
        )
    write_receipt(outbox, signed)
    return Result(outbox, node_key, hub_key, ledger)


@pytest.fixture
def result(ledger: Ledger, tmp_path: Path) -> Result:
    return make_result(ledger, tmp_path)


def test_settled_result_passes_every_check(result: Result) -> None:
    checks = result.checks()

    assert not failed(checks), _failures(checks)
    assert all(c.ok for c in checks)
    names = {c.name for c in checks}
    assert {"receipt hash", "node signature", "settlement signature", "hub countersignature"} <= (
        names
    )
    assert {"file metrics.json", "file weights.safetensors", "on-chain settlement"} <= names
    chain = next(c for c in checks if c.name == "on-chain settlement")
    # 1200 records x 2500 = 3,000,000 due: 70% to the hospital, 30% to the treasury.
    assert "3000000 due, 2100000 to the hospital (70%), 900000 to the treasury" in chain.detail


def test_receipt_survives_json_round_trip_and_key_reordering(result: Result) -> None:
    def reorder(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reorder(value[k]) for k in sorted(value, reverse=True)}
        if isinstance(value, list):
            return [reorder(v) for v in value]
        return value

    original = result.receipt()
    text = json.dumps(reorder(original), separators=(",", ":"), ensure_ascii=True)
    (result.directory / RECEIPT_FILE).write_text(text, encoding="utf-8")

    assert receipt_hash(json.loads(text)["body"]) == bytes.fromhex(original["receipt_hash"])
    assert not failed(result.checks())


def test_without_chain_the_chain_is_reported_not_checked(result: Result) -> None:
    checks = result.checks(chain=None)

    assert not failed(checks)
    chain = next(c for c in checks if c.name == "on-chain settlement")
    assert chain.ok is None
    assert "--rpc" in chain.detail


_FIELD_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "records": lambda b: b.update(records=b["records"] + 1),
    "view_digest": lambda b: b.update(view_digest="0" * 64),
    "bundle_digest": lambda b: b.update(bundle_digest="1" * 64),
    "payout": lambda b: b["settlement"].update(payout="0x" + "ab" * 20),
    "price": lambda b: b["settlement"].update(price_per_record="2499"),
    "outbox digest": lambda b: b["outbox"][-1].update(sha256="2" * 64),
    "metrics digest": lambda b: b.update(metrics_sha256="4" * 64),
    "attestation": lambda b: b["attestation"].update(verdict="tpm2"),
    "dp": lambda b: b.update(dp={"epsilon": 1.0, "delta": 1e-5}),
    "policy": lambda b: b["policy_digests"].update(hospital="3" * 64),
    "hub id": lambda b: b.update(hub_id="another-hub"),
}


@pytest.mark.parametrize("field", sorted(_FIELD_EDITS))
def test_changed_field_fails_the_hash(result: Result, field: str) -> None:
    result.rewrite(lambda r: _FIELD_EDITS[field](r["body"]))

    failures = _failures(result.checks())

    assert "receipt hash" in failures, failures
    assert "changed after signing" in failures["receipt hash"]


def test_changed_field_with_recomputed_hash_fails_every_signature(result: Result) -> None:
    # A forger who also recomputes the hash still cannot sign as the node, hospital or hub.
    def forge(receipt: dict[str, Any]) -> None:
        receipt["body"]["records"] = 2_000
        receipt["body"]["settlement"]["amount_due"] = str(min(BUDGET, 2_000 * PRICE))
        receipt["receipt_hash"] = receipt_hash(receipt["body"]).hex()

    result.rewrite(forge)
    failures = _failures(result.checks())

    assert "receipt hash" not in failures
    assert failures["node signature"].startswith("invalid")
    assert failures["hub countersignature"].startswith("invalid")
    assert "not the stated signer" in failures["settlement signature"]
    assert "receipt hash" in failures["on-chain settlement"]
    assert "records" in failures["on-chain settlement"]


def test_changed_file_byte_fails_naming_the_file(result: Result) -> None:
    weights = result.directory / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))

    failures = _failures(result.checks())

    assert set(failures) == {"file weights.safetensors"}
    assert failures["file weights.safetensors"].startswith("changed")


def test_extra_or_missing_file_fails_naming_it(result: Result) -> None:
    (result.directory / "notes.txt").write_text("patient list\n")
    (result.directory / "metrics.json").unlink()

    failures = _failures(result.checks())

    assert failures["file notes.txt"] == "present but not in the receipt"
    assert failures["file metrics.json"] == "listed in the receipt but missing"


@pytest.mark.parametrize("which", ["node", "hub"])
def test_bad_signature_fails_naming_it(result: Result, which: str) -> None:
    def flip(receipt: dict[str, Any]) -> None:
        raw = bytearray(bytes.fromhex(receipt["signatures"][which]["signature"]))
        raw[5] ^= 0x80
        receipt["signatures"][which]["signature"] = raw.hex()

    result.rewrite(flip)
    failures = _failures(result.checks())

    name = "node signature" if which == "node" else "hub countersignature"
    assert failures[name].startswith("invalid")
    if which == "node":  # the hub signed over the node's signature
        assert failures["hub countersignature"].startswith("invalid")


def test_bad_settlement_signature_fails(result: Result) -> None:
    def flip(receipt: dict[str, Any]) -> None:
        raw = bytearray(bytes.fromhex(receipt["signatures"]["settlement"]["signature"][2:]))
        raw[10] ^= 0x01
        receipt["signatures"]["settlement"]["signature"] = "0x" + raw.hex()

    result.rewrite(flip)

    assert "settlement signature" in _failures(result.checks())


def test_unpinned_or_other_keys_fail(result: Result) -> None:
    unpinned = _failures(result.checks(node_key=None, hub_key=None))
    assert "--node-key" in unpinned["node signature"]
    assert "--hub-key" in unpinned["hub countersignature"]

    other = crypto.generate_private_key().public_key()
    wrong = _failures(result.checks(node_key=other))
    assert wrong["node signature"] == "signed by a different key than the pinned one"


def test_receipt_for_an_unsettled_job_fails_on_chain(ledger: Ledger, tmp_path: Path) -> None:
    result = make_result(ledger, tmp_path, settle=False)

    failures = _failures(result.checks())

    assert set(failures) == {"on-chain settlement"}
    assert "open" in failures["on-chain settlement"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        '{"schema": "rapha.receipt/1"}',
        '{"schema": "rapha.receipt/1", "body": {}, "receipt_hash": "", "signatures": {}}',
        '{"a": 1, "a": 2}',
        '{"x": NaN}',
        "[" * 100_000,
    ],
)
def test_malformed_receipt_fails_its_format_check(result: Result, text: str) -> None:
    (result.directory / RECEIPT_FILE).write_text(text)

    checks = result.checks()

    assert [c.name for c in checks] == ["receipt format"]
    assert checks[0].ok is False


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.lists(
        st.sampled_from(["body", "settlement", "outbox", 0, "job", "signatures", "node", "times"]),
        min_size=1,
        max_size=3,
    ),
    value=_json,
)
def test_hostile_receipt_values_never_crash_verification(
    result: Result, path: list[Any], value: Any
) -> None:
    original = (result.directory / RECEIPT_FILE).read_bytes()
    receipt = result.receipt()
    target: Any = receipt
    for key in path[:-1]:
        try:
            target = target[key]
        except (KeyError, IndexError, TypeError):
            break
    with contextlib.suppress(KeyError, IndexError, TypeError):
        target[path[-1]] = value
    (result.directory / RECEIPT_FILE).write_text(json.dumps(receipt))
    try:
        checks = result.checks(chain=None)  # must return, never raise
        assert all(isinstance(c, Check) for c in checks)
    finally:
        (result.directory / RECEIPT_FILE).write_bytes(original)


def test_building_refuses_an_outbox_without_metrics(ledger: Ledger, tmp_path: Path) -> None:
    result = make_result(ledger, tmp_path)
    (result.directory / "metrics.json").unlink()
    receipt = result.receipt()
    with pytest.raises(DataError, match=r"no metrics\.json"):
        build_receipt(
            **{
                "job_id": "job-2",
                "kind": "train",
                "bundle_digest": receipt["body"]["bundle_digest"],
                "policy_digests": receipt["body"]["policy_digests"],
                "view_digest": receipt["body"]["view_digest"],
                "records": 1,
                "terms": SettlementTerms(
                    chain_id=1,
                    vault="0x" + "11" * 20,
                    token="0x" + "22" * 20,
                    chain_job_id=b"\x01" * 32,
                    hospital_id=b"\x02" * 32,
                    payout="0x" + "33" * 20,
                    budget=10,
                    price_per_record=1,
                ),
                "outbox": result.directory,
                "attestation": {},
                "audit_head": "0" * 64,
                "node_id": "n",
                "hub_id": "h",
                "started": datetime.now(UTC),
                "finished": datetime.now(UTC),
            }
        )


def _keys(result: Result, tmp_path: Path) -> list[str]:
    node_pem, hub_pem = tmp_path / "node.pub", tmp_path / "hub.pub"
    crypto.save_public_key(result.node_key.public_key(), node_pem)
    crypto.save_public_key(result.hub_key.public_key(), hub_pem)
    return ["--node-key", str(node_pem), "--hub-key", str(hub_pem)]


def test_cli_verify_prints_a_table_and_exits_by_verdict(result: Result, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["job", "verify", str(result.directory), *_keys(result, tmp_path)]
    rpc = result.ledger.chain.url
    if rpc is not None:  # a JSON-RPC chain (anvil): the command checks it too
        args += ["--rpc", rpc]

    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "verified" in ok.output
    as_json = runner.invoke(app, [*args, "--json"])
    checked = {c["check"]: c["ok"] for c in json.loads(as_json.output)["checks"]}
    assert checked["on-chain settlement"] is (True if rpc is not None else None)

    (result.directory / "weights.safetensors").write_bytes(b"tampered")
    bad = runner.invoke(app, [*args, "--json"])
    assert bad.exit_code == 4, bad.output
    report = json.loads(bad.output)
    assert report["ok"] is False
    assert [c["check"] for c in report["checks"] if c["ok"] is False] == [
        "file weights.safetensors"
    ]


def test_cli_verify_refuses_a_directory_that_is_not_a_result(tmp_path: Path) -> None:
    runner = CliRunner()

    missing = runner.invoke(app, ["job", "verify", str(tmp_path / "nope")])
    empty = runner.invoke(app, ["job", "verify", str(tmp_path)])

    assert missing.exit_code == 2
    assert "not a directory" in " ".join(missing.output.split())
    assert empty.exit_code == 6
    assert "no receipt.json" in " ".join(empty.output.split())
