"""A fetched job result as ``rapha job fetch`` leaves it, for the results-report tests.

:func:`write_result` writes ``metrics.json`` from the node's real :func:`evaluate` on
synthetic scores (with subgroup metadata, so some cells are suppressed and a rare label is
withheld), the node's additions (job, records, a training curve of real
:class:`ProgressEvent` dicts, dp), random weights, and a real receipt built, signed and
countersigned as the node and hub do. The settlement terms are invented unless a test
passes the ones of a real vault deposit.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rapha import crypto
from rapha.receipt import (
    SettlementTerms,
    build_receipt,
    countersign,
    sign_receipt,
    write_receipt,
)
from rapha.runtime.evaluate import evaluate, write_metrics
from rapha.runtime.progress import ProgressEvent

__all__ = [
    "FINDINGS",
    "PRICE",
    "RECORDS",
    "SETTLEMENT_KEY",
    "Result",
    "write_result",
]

#: effusion and cardiomegaly are published; hernia (1% prevalence) is withheld.
FINDINGS = ("effusion", "cardiomegaly", "hernia")
_PREVALENCE = {"effusion": 0.3, "cardiomegaly": 0.2, "hernia": 0.01}
# cardiomegaly's narrow spread leaves its outer calibration bins with fewer than k records.
_SPREAD = {"effusion": 0.2, "cardiomegaly": 0.1, "hernia": 0.2}
_EFFECT = {"effusion": 0.3, "cardiomegaly": 0.15, "hernia": 0.3}
RECORDS, PRICE = 1_200, 2_500
#: The hospital's secp256k1 settlement key (any 32 bytes below the curve order).
SETTLEMENT_KEY = hashlib.sha256(b"rapha report tests: hospital settlement key").digest()


@dataclass(frozen=True)
class Result:
    """A result directory, what went into it, and the keys that verify it."""

    directory: Path
    metrics: dict[str, Any]
    receipt: dict[str, Any]
    node_key: Ed25519PrivateKey
    hub_key: Ed25519PrivateKey


def _invented_terms() -> SettlementTerms:
    return SettlementTerms(
        chain_id=31337,
        vault="0x" + "11" * 20,
        token="0x" + "22" * 20,
        chain_job_id=hashlib.sha256(b"vault job").digest(),
        hospital_id=hashlib.sha256(b"hospital").digest(),
        payout="0x" + "33" * 20,
        budget=5_000_000,
        price_per_record=PRICE,
    )


def _progress_events(epochs: int = 5, steps_per_epoch: int = 40) -> list[dict[str, float | int]]:
    """What the trusted loop sends: batch losses every few steps, val loss at epoch ends."""
    rng = np.random.default_rng(7)
    total = epochs * steps_per_epoch
    events = []
    for epoch in range(1, epochs + 1):
        for step in range((epoch - 1) * steps_per_epoch + 4, epoch * steps_per_epoch + 1, 4):
            loss = 0.7 * math.exp(-step / 120) + 0.25 + float(rng.normal(0, 0.02))
            events.append(ProgressEvent(epoch, epochs, step, total, round(loss, 3)).to_json())
        val = 0.65 * math.exp(-epoch * steps_per_epoch / 150) + 0.3
        end = epoch * steps_per_epoch
        events.append(ProgressEvent(epoch, epochs, end, total, round(val, 3)).to_json())
    return events


def _scores(
    rng: np.random.Generator, n: int, findings: Sequence[str]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    prevalence = [_PREVALENCE.get(f, 0.25) for f in findings]
    labels = (rng.random((n, len(findings))) < prevalence).astype(np.float64)
    spread = [_SPREAD.get(f, 0.2) for f in findings]
    effect = np.array([_EFFECT.get(f, 0.3) for f in findings])
    scores = np.clip(labels * effect + rng.normal(0.3, spread, labels.shape), 0.0, 1.0)
    return scores, labels


def write_result(
    directory: Path,
    *,
    findings: Sequence[str] = FINDINGS,
    cells: Sequence[str] = ("GE", "Siemens", "Philips", "Agfa"),
    kind: str = "train",
    terms: SettlementTerms | None = None,
    node_key: Ed25519PrivateKey | None = None,
    hub_key: Ed25519PrivateKey | None = None,
) -> Result:
    """Write a complete result directory (created, must not exist).

    ``cells`` are manufacturer names drawn with probabilities 50/45/3/2%, so the last two
    hold fewer than k = 10 of the 400 test records and are suppressed.
    """
    rng = np.random.default_rng(1)
    val_scores, val_labels = _scores(rng, 300, findings)
    test_scores, test_labels = _scores(rng, 400, findings)
    weights = np.array([0.5, 0.45, 0.03, 0.02][: len(cells)])
    makers = rng.choice(list(cells), 400, p=weights / weights.sum())
    sexes = rng.choice(["F", "M"], 400)
    meta = [{"sex": str(s), "manufacturer": str(m)} for s, m in zip(sexes, makers, strict=True)]
    metrics = evaluate(
        findings=findings,
        val_scores=val_scores,
        val_labels=val_labels,
        test_scores=test_scores,
        test_labels=test_labels,
        test_meta=meta,
        bootstrap=200,
        subgroup_fields=("sex", "manufacturer"),
    )
    bundle_digest = crypto.digest_bytes(b"bundle")
    metrics["job"] = {"job_id": "job-7f3a", "kind": kind, "bundle_digest": bundle_digest}
    metrics["records"] = {"train": 800, "val": 300, "test": 400, "billed": RECORDS}
    metrics["training"] = {"progress": _progress_events()} if kind == "train" else None
    metrics["dp"] = None
    directory.mkdir()
    write_metrics(directory / "metrics.json", metrics)
    (directory / "weights.safetensors").write_bytes(os.urandom(2048))
    node_key = node_key or crypto.generate_private_key()
    hub_key = hub_key or crypto.generate_private_key()
    started = datetime(2026, 12, 1, 20, 0, tzinfo=UTC)
    body = build_receipt(
        job_id="job-7f3a",
        kind=kind,
        bundle_digest=bundle_digest,
        policy_digests={
            "hospital": crypto.digest_bytes(b"hospital policy"),
            "job": crypto.digest_bytes(b"job"),
        },
        view_digest=crypto.digest_bytes(b"view"),
        records=RECORDS,
        terms=terms or _invented_terms(),
        outbox=directory,
        attestation={"evidence": {"kind": "dev"}, "verdict": "dev"},
        audit_head=crypto.digest_bytes(b"audit head"),
        node_id="node-st-mary-1",
        hub_id="https://hub.invalid",
        started=started,
        finished=started + timedelta(minutes=42),
    )
    receipt = countersign(
        sign_receipt(body, node_key=node_key, settlement_key=SETTLEMENT_KEY), hub_key=hub_key
    )
    write_receipt(directory, receipt)
    return Result(directory, metrics, receipt, node_key, hub_key)
