"""What ``rapha demo`` shows at the end, read from the parts themselves.

:func:`collect` gathers, once the job settled: the route (each node against the job's
requirements, with the hub's own matcher), the records used, the metrics the node
computed, the guard's decisions from the winning node's verified audit log, what left the
hospital (the receipt's file list, checked against the fetched files) and what did not,
an egress scan of everything the company and the hub hold for every identifier planted in
both archives, the receipt's verification (pinned node and hub keys, the chain), the
on-chain settlement and balances, and both audit logs' verdicts. It also writes
``chain/events.json`` and ``report.html``. Everything is plain JSON (``summary.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rapha import crypto
from rapha.errors import IntegrityError, RaphaError

if TYPE_CHECKING:
    from rapha.demo.flow import Demo

__all__ = ["ROUTE_REASONS", "collect", "route_reason"]

#: What each requirement a node can fail means, for a person.
ROUTE_REASONS: Mapping[str, str] = {
    "environment": "not in the job's environment",
    "activated": "not activated (enrolment incomplete)",
    "fresh": "no fresh attestation",
    "cohort": "holds {modality} {body_part}; the job needs {need_modality} {need_body_part}",
    "records": "{records} records; the job needs at least {min_records}",
    "price": "asks {price} USDC per record; the job pays at most {max_price} USDC",
    "label": "fewer than {min_positives} published positives of {label}",
}


def route_reason(fit: Mapping[str, Any], requirements: Mapping[str, Any]) -> str:
    """Why a node (a :class:`rapha.hub.profiles.NodeFit` as JSON) is or is not eligible."""
    failed = fit.get("failed")
    if failed is None:
        return (
            "eligible: the cohort, enough records, the price and every required label's positives"
        )
    stage, _, label = str(failed).partition(":")
    need: Mapping[str, Any] = next(
        (n for n in requirements.get("labels", []) if n["name"] == label), {}
    )
    return ROUTE_REASONS.get(stage, stage).format(
        modality=fit["modality"],
        body_part=fit["body_part"],
        need_modality=requirements["modality"],
        need_body_part=requirements["body_part"],
        records=fit["records"],
        min_records=requirements["min_records"],
        price=_usdc(fit["price_per_record"]),
        max_price=_usdc(requirements.get("max_price_per_record")),
        min_positives=need.get("min_positives", 0),
        label=label,
    )


def _usdc(units: int | None) -> str:
    return "any" if units is None else f"{units / 10**6:g}"


def collect(demo: Demo, job: Mapping[str, Any], result: Path) -> dict[str, Any]:
    """The summary of a settled demo job whose result was fetched into ``result``."""
    from rapha.demo.flow import HOSPITALS, MAX_PRICE, REQUIREMENTS

    hub = demo._hub()
    requirements = {**REQUIREMENTS, "max_price_per_record": MAX_PRICE}
    names = {h.node_id: h.name for h in HOSPITALS}
    fits = [f.model_dump(mode="json") for f in hub.route_table(requirements, "demo")]
    route = {
        "requirements": requirements,
        "chosen": job["node_id"],
        "chosen_hospital": names.get(str(job["node_id"]), job["node_id"]),
        "nodes": [
            {
                **f,
                "hospital": names.get(f["node_id"], f["node_id"]),
                "reason": route_reason(f, requirements),
            }
            for f in fits
        ],
        "attempts": job["attempts"],
    }
    metrics = json.loads((result / "metrics.json").read_text(encoding="utf-8"))
    receipt = json.loads((result / "receipt.json").read_text(encoding="utf-8"))
    winner = next(n for n in demo.nodes.values() if n.hospital.node_id == job["node_id"])
    checks = _verify(demo, result, winner.root)
    chain = _chain(demo, receipt)
    balances_after = demo._balances()
    balances = [
        {"who": who, "before": before, "after": balances_after[who]}
        for who, before in demo.balances_before.items()
    ]
    report = _node_report(winner.config, demo.job_id)
    summary: dict[str, Any] = {
        "format": "rapha-demo-summary",
        "workdir": str(demo.root),
        "studies_per_hospital": demo.options.studies,
        "seed": demo.options.seed,
        "notes": list(demo.notes),
        "hospitals": [_hospital(demo, n) for n in demo.nodes.values()],
        "job": {
            "id": demo.job_id,
            "state": job["state"],
            "attempts": job["attempts"],
            "company": "acme-radiology-ai",
        },
        "route": route,
        "records": metrics.get("records"),
        "metrics": metrics,
        "guard": report["outputs"]["guard"],
        "left": {"files": receipt["body"]["outbox"], "receipt": "receipt.json"},
        "stayed": _stayed(demo, winner),
        "egress_scan": _egress_scan(demo, result),
        "receipt": {
            "hash": receipt["receipt_hash"],
            "verified": all(c["ok"] is not False for c in checks),
            "checks": checks,
        },
        "chain": chain,
        "balances": balances,
        "split": _split(receipt, chain),
        "audit": [_audit(n.config, n.hospital.name) for n in demo.nodes.values()],
        "report": str(demo.path("report.html")),
    }
    _write_events(demo)
    _write_report(demo, result, summary)
    return summary


def _verify(demo: Demo, result: Path, node_root: Path) -> list[dict[str, Any]]:
    """The company's check: node key as enrolled at the hub, the hub's key, the chain."""
    from rapha.receipt import verify_result

    local = demo._local()
    node_key = crypto.load_private_key(node_root / "keys" / "node.key").public_key()
    checks = verify_result(
        result, node_key=node_key, hub_key=local.hub_key.public_key(), chain=demo.chain
    )
    return [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]


def _chain(demo: Demo, receipt: Mapping[str, Any]) -> dict[str, Any]:
    body = receipt["body"]
    job_id = bytes.fromhex(body["job"]["chain_job_id"].removeprefix("0x"))
    tx = demo.vault.settlement_tx(job_id)
    if tx is None:
        raise IntegrityError("the vault holds no settlement for the demo job")
    mined = demo.chain.w3.eth.get_transaction_receipt(tx)  # type: ignore[arg-type]
    held = demo.vault.job(job_id)
    split = demo.vault.split(job_id)
    return {
        "chain_id": demo.chain.chain_id,
        "vault": demo.vault.address,
        "token": demo.chain.token.address,
        "chain_job_id": "0x" + job_id.hex(),
        "tx_hash": "0x" + tx.hex(),
        "block": int(mined["blockNumber"]),
        "receipt_hash_on_chain": "0x" + held.receipt_hash.hex(),
        "receipt_hash_matches": held.receipt_hash.hex() == receipt["receipt_hash"],
        "status": held.status.name.lower(),
        "records": held.records,
        "price_per_record": held.price_per_record,
        "amount_due": held.amount_due,
        "hospital_amount": split.hospital_amount,
        "treasury_amount": split.treasury_amount,
        "payer_refund": split.payer_refund,
        "hospital_share_bps": demo.vault.hospital_share_bps(),
    }


def _split(receipt: Mapping[str, Any], chain: Mapping[str, Any]) -> dict[str, Any]:
    due = int(chain["amount_due"])
    return {
        "amount_due": due,
        "hospital": chain["hospital_amount"],
        "treasury": chain["treasury_amount"],
        "hospital_percent": round(100 * chain["hospital_amount"] / due, 2) if due else None,
        "refund": chain["payer_refund"],
        "budget": int(receipt["body"]["settlement"]["budget"]),
    }


def _hospital(demo: Demo, node: Any) -> dict[str, Any]:
    archive = demo.path("archives", node.hospital.slug)
    files = [p for p in (archive / "dicom").rglob("*") if p.is_file()]
    return {
        "name": node.hospital.name,
        "node_id": node.hospital.node_id,
        "scope": f"{node.hospital.modality} CHEST",
        "labels": list(node.hospital.labels),
        "price_per_record": node.hospital.price_per_record,
        "source": "orthanc (DICOMweb)" if node.source.startswith("http") else "folder",
        "dicom_files": len(files),
        "dicom_bytes": sum(p.stat().st_size for p in files),
    }


def _stayed(demo: Demo, winner: Any) -> dict[str, Any]:
    """What the winning hospital kept: its archive, the view, labels, predictions, keys."""
    state = winner.root / "state"
    view = state / "views" / demo.job_id
    evaluation = state / "evaluations" / demo.job_id
    counts = {}
    if (view / "view.json").exists():
        counts = json.loads((view / "view.json").read_text(encoding="utf-8")).get("counts", {})
    hospital = _hospital(demo, winner)
    return {
        "dicom_files": hospital["dicom_files"],
        "dicom_bytes": hospital["dicom_bytes"],
        "view": str(view),
        "view_records": counts,
        "test_labels": str(evaluation / "test-labels.json"),
        "predictions": str(evaluation / "predictions.npy"),
        "never_left": [
            "DICOM files and headers",
            "pixels and the view",
            "per-record labels",
            "predictions",
            "pseudonyms and record ids",
            "the HMAC and split keys",
            "the audit log (only its head, in the receipt)",
        ],
    }


def _needles(demo: Demo) -> list[str]:
    from rapha.demo.flow import HOSPITALS

    found: set[str] = set()
    for h in HOSPITALS:
        truth = json.loads(demo.path("archives", h.slug, "truth.json").read_text("utf-8"))
        found.update(v for v in truth["must_not_leak"] if len(v.strip()) >= 4)
    return sorted(found)


def _egress_scan(demo: Demo, result: Path) -> dict[str, Any]:
    """Every planted identifier of both archives, looked for in what the company and the
    hub hold (the same scan the output guard runs: raw, UTF-16/32, inside containers)."""
    from rapha.privacy.egress import find_leaks

    needles = _needles(demo)
    places = {"the company's result": result, "the hub's artifact store": demo.path("hub")}
    found = {name: len(find_leaks(path, needles)) for name, path in places.items()}
    return {"identifiers": len(needles), "scanned": list(places), "found": found}


def _node_report(config: Path, job_id: str) -> dict[str, Any]:
    from rapha.node.report import job_report
    from rapha.node.settings import load_node_settings

    return dict(job_report(load_node_settings(config, env={}), job_id).to_json())


def _audit(config: Path, name: str) -> dict[str, Any]:
    from rapha.audit import verify_log
    from rapha.node.settings import load_node_settings

    settings = load_node_settings(config, env={})
    public = crypto.load_private_key(settings.keys.signing_key).public_key()
    try:
        verdict = verify_log(settings.audit_log, public)
    except RaphaError as exc:
        return {"hospital": name, "verified": False, "error": str(exc)}
    return {"hospital": name, "verified": True, "entries": verdict.entries, "head": verdict.head}


def _write_events(demo: Demo) -> None:
    """Every log the vault and the token emitted, raw, for anyone to scan."""
    addresses: Any = [demo.vault.address, demo.chain.token.address]
    logs = demo.chain.w3.eth.get_logs({"fromBlock": 0, "toBlock": "latest", "address": addresses})
    events = [
        {
            "address": str(log["address"]),
            "block": int(log["blockNumber"]),
            "tx": "0x" + bytes(log["transactionHash"]).hex(),
            "topics": ["0x" + bytes(t).hex() for t in log["topics"]],
            "data": "0x" + bytes(log["data"]).hex(),
        }
        for log in logs
    ]
    demo.path("chain", "events.json").write_text(json.dumps(events, indent=2) + "\n", "utf-8")


def _write_report(demo: Demo, result: Path, summary: Mapping[str, Any]) -> None:
    from rapha.client.report import write_report
    from rapha.receipt import Check

    chain = summary["chain"]
    settlement = {
        "tx_hash": chain["tx_hash"],
        "block": chain["block"],
        "chain_id": chain["chain_id"],
        "hospital_share_bps": chain["hospital_share_bps"],
        "balances": [
            {
                "who": b["who"],
                "before": b["before"]["wallet"] + b["before"]["vault_credit"],
                "after": b["after"]["wallet"] + b["after"]["vault_credit"],
            }
            for b in summary["balances"]
        ],
    }
    checks = [Check(c["name"], c["ok"], c["detail"]) for c in summary["receipt"]["checks"]]
    write_report(result, demo.path("report.html"), settlement=settlement, checks=checks)
