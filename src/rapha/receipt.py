"""Proof receipts: what a job did, on what, and what it was paid; build, sign, verify.

A receipt (``receipt.json`` in a job's outbox) is one JSON document::

    {"schema": "rapha.receipt/1",
     "body": {...},                      # the facts, below
     "receipt_hash": "<hex>",            # SHA-256 of the RFC 8785 canonical body
     "signatures": {
        "node": {"alg": "ed25519", "public_key": "<hex>", "signature": "<hex>"},
        "settlement": {"alg": "secp256k1-eip191", "address": "0x…", "signature": "0x…"},
        "hub": {"alg": "ed25519", "public_key": "<hex>", "signature": "<hex>"}}}

The body binds the job (hub id, vault job id, kind), the bundle digest, the policy digests
(the hospital's and the job's), the view digest, the records counted, the settlement terms
(price per record, budget, amount due, hospital id and payout address; chain id, vault and
token), every other outbox file's name, size and SHA-256, the metrics digest, the
attestation evidence in full with its verdict, the node's audit-log head, node and hub
ids, UTC times, and the DP ε and δ where DP was used. Token amounts are decimal strings
(canonical JSON carries integers exactly only up to 2**53).

Signatures, each over :func:`receipt_hash` of the body:

* **node** (Ed25519): the node key the hub enrolled, bound to its attestation; over
  ``NODE_TAG ‖ receipt_hash``;
* **settlement** (secp256k1, EIP-191): the hospital's settlement key registered in the
  vault, over the vault's settlement digest (:func:`rapha.ledger.settlement_digest`) of
  this job, this receipt hash, the records and the price; the hub passes it to
  ``ClearingVault.settle``, which refuses it unless it recovers to the registered key;
* **hub** (Ed25519): the countersignature, over ``HUB_TAG ‖ receipt_hash ‖ node signature``.

:func:`verify_result` checks a result directory: the document's shape, the hash, each
signature against pinned keys, every outbox file, the metrics digest, and, given a chain,
that the vault holds this receipt hash for the job with the figures and split the receipt
implies. It returns one :class:`Check` per line of the table ``rapha job verify`` prints;
it never raises on a malformed or hostile receipt.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rapha import crypto
from rapha.errors import DataError, RaphaError, UsageError

if TYPE_CHECKING:
    from rapha.ledger.chain import Chain

__all__ = [
    "HUB_TAG",
    "NODE_TAG",
    "RECEIPT_FILE",
    "SCHEMA",
    "Check",
    "SettlementTerms",
    "build_receipt",
    "countersign",
    "load_receipt",
    "receipt_hash",
    "sign_receipt",
    "verify_result",
    "write_receipt",
]

SCHEMA: Final = "rapha.receipt/1"
RECEIPT_FILE: Final = "receipt.json"
METRICS_FILE: Final = "metrics.json"
NODE_TAG: Final = b"rapha.receipt.node.v1\x00"
HUB_TAG: Final = b"rapha.receipt.hub.v1\x00"
#: Largest receipt.json read; a real one is a few kilobytes plus the attestation evidence.
MAX_RECEIPT_BYTES: Final = 4 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32B = re.compile(r"0x[0-9a-f]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,77}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class SettlementTerms:
    """What the job is paid on: the vault's deposit and the hospital's registry entry.

    Amounts are token base units (USDC: 6 decimals).
    """

    chain_id: int
    vault: str
    token: str
    chain_job_id: bytes
    hospital_id: bytes
    payout: str
    budget: int
    price_per_record: int

    def __post_init__(self) -> None:
        if len(self.chain_job_id) != 32 or len(self.hospital_id) != 32:
            raise UsageError("the vault job id and the hospital id are 32 bytes each")
        for name in ("vault", "token", "payout"):
            if not _ADDRESS.fullmatch(getattr(self, name)):
                raise UsageError(f"{name} must be a 0x-prefixed 20-byte address")
        if self.chain_id <= 0 or self.budget <= 0 or self.price_per_record < 0:
            raise UsageError("chain id and budget must be positive and the price not negative")

    def amount_due(self, records: int) -> int:
        """What the vault will charge: ``min(budget, records * price)``."""
        return min(self.budget, records * self.price_per_record)


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the verification table; ``ok`` is ``None`` for a check not run."""

    name: str
    ok: bool | None
    detail: str


# --- building and signing ----------------------------------------------------------------


def _utc(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise UsageError("receipt times must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def outbox_listing(outbox: Path) -> list[dict[str, Any]]:
    """Every outbox file but the receipt: ``[{"name", "size", "sha256"}]`` sorted by name.

    Raises:
        DataError: the outbox holds a directory, a link or an unusual file name.
    """
    listing = []
    for path in sorted(outbox.iterdir()):
        if path.name == RECEIPT_FILE:
            continue
        if path.is_symlink() or not path.is_file() or not _FILE_NAME.fullmatch(path.name):
            raise DataError(f"{path} is not a plain outbox file; the outbox holds only files")
        listing.append(
            {"name": path.name, "size": path.stat().st_size, "sha256": crypto.digest_file(path)}
        )
    return listing


def build_receipt(
    *,
    job_id: str,
    kind: str,
    bundle_digest: str,
    policy_digests: Mapping[str, str],
    view_digest: str,
    records: int,
    terms: SettlementTerms,
    outbox: Path,
    attestation: Mapping[str, Any],
    audit_head: str,
    node_id: str,
    hub_id: str,
    started: datetime,
    finished: datetime,
    dp: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The unsigned receipt body for a finished job whose ``outbox`` is complete.

    ``policy_digests`` must name at least ``hospital`` and ``job``. ``attestation`` is the
    evidence (assignment and delivery quotes) with the verifier's verdict, in full, as
    plain JSON.

    Raises:
        UsageError: a required digest or field is missing or malformed.
        DataError: the outbox has no ``metrics.json`` or holds something not a plain file.
    """
    for name in ("hospital", "job"):
        if name not in policy_digests:
            raise UsageError(f"the receipt needs the {name} policy digest")
    if records < 0:
        raise UsageError("records counted cannot be negative")
    files = outbox_listing(outbox)
    metrics = next((f for f in files if f["name"] == METRICS_FILE), None)
    if metrics is None:
        raise DataError(f"{outbox} has no {METRICS_FILE}; the node writes it before the receipt")
    body: dict[str, Any] = {
        "job": {"id": job_id, "kind": kind, "chain_job_id": "0x" + terms.chain_job_id.hex()},
        "bundle_digest": bundle_digest,
        "policy_digests": dict(sorted(policy_digests.items())),
        "view_digest": view_digest,
        "records": records,
        "settlement": {
            "chain_id": terms.chain_id,
            "vault": terms.vault,
            "token": terms.token,
            "hospital_id": "0x" + terms.hospital_id.hex(),
            "payout": terms.payout,
            "budget": str(terms.budget),
            "price_per_record": str(terms.price_per_record),
            "amount_due": str(terms.amount_due(records)),
        },
        "outbox": files,
        "metrics_sha256": metrics["sha256"],
        "attestation": dict(attestation),
        "audit_head": audit_head,
        "node_id": node_id,
        "hub_id": hub_id,
        "times": {"started": _utc(started), "finished": _utc(finished)},
        "dp": None if dp is None else {"epsilon": dp["epsilon"], "delta": dp["delta"]},
    }
    _check_body(body)  # what is built is what verification accepts
    problems = _inconsistencies(body)
    if problems:  # pragma: no cover - built from one set of figures
        raise DataError("; ".join(problems))
    return body


def receipt_hash(body: Mapping[str, Any]) -> bytes:
    """SHA-256 of the body's RFC 8785 canonical JSON: what is signed and put on chain."""
    return hashlib.sha256(crypto.canonical_json(body)).digest()


def sign_receipt(
    body: Mapping[str, Any], *, node_key: Ed25519PrivateKey, settlement_key: bytes
) -> dict[str, Any]:
    """The receipt document with the node's Ed25519 and settlement signatures."""
    from rapha.ledger import settlement_digest, settlement_signer, sign_settlement

    _check_body(body)
    digest = receipt_hash(body)
    figures = _figures(body)
    settlement_sig = sign_settlement(settlement_key, receipt_hash=digest, **figures)
    signer = settlement_signer(settlement_sig, settlement_digest(receipt_hash=digest, **figures))
    node_sig = crypto.sign(node_key, NODE_TAG + digest)
    return {
        "schema": SCHEMA,
        "body": dict(body),
        "receipt_hash": digest.hex(),
        "signatures": {
            "node": {
                "alg": "ed25519",
                "public_key": crypto.public_key_bytes(node_key.public_key()).hex(),
                "signature": node_sig.hex(),
            },
            "settlement": {
                "alg": "secp256k1-eip191",
                "address": signer,
                "signature": "0x" + settlement_sig.hex(),
            },
        },
    }


def countersign(receipt: Mapping[str, Any], *, hub_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The hub's countersignature added to a node-signed receipt it has verified."""
    digest = bytes.fromhex(str(receipt["receipt_hash"]))
    node_sig = bytes.fromhex(str(receipt["signatures"]["node"]["signature"]))
    signed = {**receipt, "signatures": dict(receipt["signatures"])}
    signed["signatures"]["hub"] = {
        "alg": "ed25519",
        "public_key": crypto.public_key_bytes(hub_key.public_key()).hex(),
        "signature": crypto.sign(hub_key, HUB_TAG + digest + node_sig).hex(),
    }
    return signed


def settlement_signature(receipt: Mapping[str, Any]) -> bytes:
    """The 65-byte signature the hub passes to ``ClearingVault.settle``."""
    return bytes.fromhex(str(receipt["signatures"]["settlement"]["signature"])[2:])


def write_receipt(outbox: Path, receipt: Mapping[str, Any]) -> Path:
    """Write ``receipt.json`` into the outbox (pretty JSON; the hash is over the canonical body)."""
    path = outbox / RECEIPT_FILE
    path.write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_receipt(path: Path) -> dict[str, Any]:
    """Read ``receipt.json`` as plain JSON (no NaN, no duplicate keys, size-capped).

    Raises:
        DataError: the file is missing, too large or not a JSON object.
    """
    raw = crypto.read_bounded(path, limit=MAX_RECEIPT_BYTES, what=str(path))
    value = crypto.parse_json(raw, what=str(path))
    if not isinstance(value, dict):
        raise DataError(f"{path} holds JSON but not an object; not a receipt")
    return value


# --- the body's shape --------------------------------------------------------------------


def _want(cond: bool, field: str, what: str) -> None:
    if not cond:
        raise DataError(f"receipt field {field}: {what}")


def _match(value: Any, pattern: re.Pattern[str], field: str, what: str) -> None:
    _want(isinstance(value, str) and bool(pattern.fullmatch(value)), field, what)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_body(body: Any) -> None:
    """Raise :class:`DataError` naming the first field that is missing or malformed."""
    _want(isinstance(body, Mapping), "body", "must be an object")
    expected = {
        "job",
        "bundle_digest",
        "policy_digests",
        "view_digest",
        "records",
        "settlement",
        "outbox",
        "metrics_sha256",
        "attestation",
        "audit_head",
        "node_id",
        "hub_id",
        "times",
        "dp",
    }
    missing, extra = expected - set(body), set(body) - expected
    _want(not missing, "body", f"missing {', '.join(sorted(missing))}")
    _want(not extra, "body", f"unknown {', '.join(sorted(extra))}")
    job = body["job"]
    _want(
        isinstance(job, Mapping) and set(job) == {"id", "kind", "chain_job_id"},
        "job",
        "must hold id, kind and chain_job_id",
    )
    _want(isinstance(job["id"], str) and 0 < len(job["id"]) <= 128, "job.id", "a short string")
    _want(job["kind"] in ("train", "evaluate"), "job.kind", "train or evaluate")
    _match(job["chain_job_id"], _HEX32B, "job.chain_job_id", "0x and 64 lowercase hex digits")
    for name in ("bundle_digest", "view_digest", "metrics_sha256", "audit_head"):
        value = body[name]
        _match(value, _HEX64, name, "a SHA-256 hex")
    policies = body["policy_digests"]
    _want(
        isinstance(policies, Mapping) and {"hospital", "job"} <= set(policies),
        "policy_digests",
        "must name the hospital and job policies",
    )
    for name, value in policies.items():
        _match(value, _HEX64, f"policy_digests.{name}", "a SHA-256 hex")
    _want(
        _is_int(body["records"]) and 0 <= body["records"] < 2**53,
        "records",
        "a non-negative integer",
    )
    _check_settlement(body["settlement"])
    _check_outbox(body["outbox"])
    _want(isinstance(body["attestation"], Mapping), "attestation", "must be an object")
    for name in ("node_id", "hub_id"):
        _want(isinstance(body[name], str) and 0 < len(body[name]) <= 256, name, "a string")
    times = body["times"]
    _want(
        isinstance(times, Mapping) and set(times) == {"started", "finished"},
        "times",
        "must hold started and finished",
    )
    parsed = {}
    for name in ("started", "finished"):
        try:
            parsed[name] = datetime.strptime(str(times[name]), "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            _want(False, f"times.{name}", "a UTC time like 2026-12-01T20:00:00.000000Z")
    _want(parsed["started"] <= parsed["finished"], "times", "finished before it started")
    dp = body["dp"]
    if dp is not None:
        _want(
            isinstance(dp, Mapping) and set(dp) == {"epsilon", "delta"},
            "dp",
            "null or epsilon and delta",
        )
        for name in ("epsilon", "delta"):
            value = dp[name]
            _want(
                isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                f"dp.{name}",
                "a non-negative number",
            )


def _check_settlement(settlement: Any) -> None:
    keys = {
        "chain_id",
        "vault",
        "token",
        "hospital_id",
        "payout",
        "budget",
        "price_per_record",
        "amount_due",
    }
    _want(
        isinstance(settlement, Mapping) and set(settlement) == keys,
        "settlement",
        f"must hold exactly {', '.join(sorted(keys))}",
    )
    _want(
        _is_int(settlement["chain_id"]) and settlement["chain_id"] > 0,
        "settlement.chain_id",
        "a positive integer",
    )
    for name in ("vault", "token", "payout"):
        value = settlement[name]
        _match(value, _ADDRESS, f"settlement.{name}", "a 0x-prefixed address")
    _match(
        settlement["hospital_id"],
        _HEX32B,
        "settlement.hospital_id",
        "0x and 64 lowercase hex digits",
    )
    for name in ("budget", "price_per_record", "amount_due"):
        value = settlement[name]
        _match(value, _DECIMAL, f"settlement.{name}", "a decimal string of base units")


def _check_outbox(files: Any) -> None:
    _want(isinstance(files, list), "outbox", "must be a list of files")
    names = []
    for i, entry in enumerate(files):
        where = f"outbox[{i}]"
        _want(
            isinstance(entry, Mapping) and set(entry) == {"name", "size", "sha256"},
            where,
            "must hold name, size and sha256",
        )
        _want(
            isinstance(entry["name"], str)
            and bool(_FILE_NAME.fullmatch(entry["name"]))
            and entry["name"] != RECEIPT_FILE,
            f"{where}.name",
            "a plain file name",
        )
        _want(_is_int(entry["size"]) and entry["size"] >= 0, f"{where}.size", "a byte count")
        _match(entry["sha256"], _HEX64, f"{where}.sha256", "a SHA-256 hex")
        names.append(entry["name"])
    _want(names == sorted(set(names)), "outbox", "names must be unique and sorted")


def _inconsistencies(body: Mapping[str, Any]) -> list[str]:
    """What a well-formed body states that contradicts itself (empty when consistent)."""
    problems = []
    settlement = body["settlement"]
    budget, price = int(settlement["budget"]), int(settlement["price_per_record"])
    if int(settlement["amount_due"]) != min(budget, body["records"] * price):
        problems.append("settlement.amount_due is not min(budget, records x price_per_record)")
    metrics = [f for f in body["outbox"] if f["name"] == METRICS_FILE]
    if len(metrics) != 1 or metrics[0]["sha256"] != body["metrics_sha256"]:
        problems.append(f"metrics_sha256 is not the digest of the listed {METRICS_FILE}")
    return problems


def _figures(body: Mapping[str, Any]) -> dict[str, Any]:
    """The settlement digest's inputs (all but the receipt hash) from a checked body."""
    settlement = body["settlement"]
    return {
        "chain_id": settlement["chain_id"],
        "vault": settlement["vault"],
        "job_id": bytes.fromhex(body["job"]["chain_job_id"][2:]),
        "records": body["records"],
        "price_per_record": int(settlement["price_per_record"]),
    }


# --- verification ------------------------------------------------------------------------


def verify_result(
    result_dir: Path,
    *,
    node_key: Ed25519PublicKey | None,
    hub_key: Ed25519PublicKey | None,
    chain: Chain | None = None,
) -> list[Check]:
    """Check a result directory (its ``receipt.json`` and every file beside it).

    ``node_key`` and ``hub_key`` are the pinned keys; a signature with no key to check it
    against fails (a key carried in the receipt itself proves nothing). ``chain`` is the
    chain the receipt names; without one the on-chain check is reported as not run.
    Every check is run that can be; the result is failed if any ``ok`` is ``False``.
    """
    checks: list[Check] = []
    try:
        receipt = load_receipt(result_dir / RECEIPT_FILE)
        _want(receipt.get("schema") == SCHEMA, "schema", f"expected {SCHEMA}")
        _want(
            set(receipt) == {"schema", "body", "receipt_hash", "signatures"},
            "receipt",
            "must hold schema, body, receipt_hash and signatures",
        )
        _check_body(receipt["body"])
    except DataError as exc:
        return [Check("receipt format", False, str(exc))]
    body: dict[str, Any] = receipt["body"]
    checks.append(Check("receipt format", True, SCHEMA))

    digest = receipt_hash(body)
    stated = receipt["receipt_hash"]
    hash_ok = stated == digest.hex()
    problems = _inconsistencies(body)
    checks.append(Check("receipt figures", not problems, "; ".join(problems) or "consistent"))
    checks.append(
        Check(
            "receipt hash",
            hash_ok,
            digest.hex()
            if hash_ok
            else "the body does not hash to receipt_hash: it was changed after signing",
        )
    )
    signatures = receipt["signatures"]
    if not isinstance(signatures, Mapping):
        signatures = {}
    node_sig = _ed25519_check(
        checks, "node signature", signatures.get("node"), node_key, NODE_TAG + digest, "--node-key"
    )
    _settlement_check(checks, signatures.get("settlement"), body, digest)
    _ed25519_check(
        checks,
        "hub countersignature",
        signatures.get("hub"),
        hub_key,
        HUB_TAG + digest + (node_sig or b""),
        "--hub-key",
    )
    checks.extend(_file_checks(result_dir, body))
    checks.append(_chain_check(chain, body, digest))
    return checks


def _ed25519_check(
    checks: list[Check],
    name: str,
    entry: Any,
    key: Ed25519PublicKey | None,
    message: bytes,
    option: str,
) -> bytes | None:
    """Append the check; return the raw signature when it was well-formed."""
    try:
        _want(
            isinstance(entry, Mapping) and entry.get("alg") == "ed25519",
            name,
            "missing, or not an ed25519 signature",
        )
        signature = bytes.fromhex(str(entry["signature"]))
        carried = crypto.public_key_from_bytes(bytes.fromhex(str(entry["public_key"])))
    except (DataError, KeyError, ValueError, RaphaError) as exc:
        checks.append(Check(name, False, f"malformed: {exc}"))
        return None
    if key is None:
        checks.append(Check(name, False, f"no pinned key to check it against: pass {option}"))
        return signature
    if crypto.public_key_bytes(carried) != crypto.public_key_bytes(key):
        checks.append(Check(name, False, "signed by a different key than the pinned one"))
        return signature
    try:
        key.verify(signature, message)
    except InvalidSignature:
        checks.append(Check(name, False, "invalid: the signature does not match the receipt"))
        return signature
    fingerprint = hashlib.sha256(crypto.public_key_bytes(key)).hexdigest()[:16]
    checks.append(Check(name, True, f"valid, key {fingerprint}"))
    return signature


def _settlement_check(
    checks: list[Check], entry: Any, body: Mapping[str, Any], digest: bytes
) -> None:
    from rapha.ledger import settlement_digest, settlement_signer

    name = "settlement signature"
    try:
        _want(
            isinstance(entry, Mapping) and entry.get("alg") == "secp256k1-eip191",
            name,
            "missing, or not a secp256k1-eip191 signature",
        )
        raw = str(entry["signature"])
        _want(raw.startswith("0x"), name, "must be 0x-prefixed hex")
        signed = settlement_digest(receipt_hash=digest, **_figures(body))
        signer = settlement_signer(bytes.fromhex(raw[2:]), signed)
        stated = str(entry["address"])
    except (DataError, KeyError, ValueError, UsageError) as exc:
        checks.append(Check(name, False, f"malformed: {exc}"))
        return
    if signer.lower() != stated.lower():
        checks.append(Check(name, False, f"recovers to {signer}, not the stated signer {stated}"))
        return
    checks.append(Check(name, True, f"signed by {signer} (the vault checks it is registered)"))


def _file_checks(result_dir: Path, body: Mapping[str, Any]) -> list[Check]:
    checks = []
    listed = {f["name"]: f for f in body["outbox"]}
    present = sorted(p.name for p in result_dir.iterdir() if p.name != RECEIPT_FILE)
    for name in sorted(set(present) - set(listed)):
        checks.append(Check(f"file {name}", False, "present but not in the receipt"))
    for name, entry in listed.items():
        path = result_dir / name
        if path.is_symlink() or not path.is_file():
            checks.append(Check(f"file {name}", False, "listed in the receipt but missing"))
            continue
        size, actual = path.stat().st_size, crypto.digest_file(path)
        if size != entry["size"] or actual != entry["sha256"]:
            checks.append(
                Check(f"file {name}", False, f"changed: SHA-256 {actual[:16]}…, size {size}")
            )
        else:
            checks.append(Check(f"file {name}", True, f"{size} bytes, SHA-256 {actual[:16]}…"))
    return checks


def _chain_check(chain: Chain | None, body: Mapping[str, Any], digest: bytes) -> Check:
    name = "on-chain settlement"
    if chain is None:
        return Check(name, None, "not checked: pass --rpc URL to check the chain")
    from rapha.ledger import ClearingVault, JobStatus

    settlement = body["settlement"]
    if chain.chain_id != settlement["chain_id"]:
        return Check(
            name, False, f"chain id {chain.chain_id}, receipt names {settlement['chain_id']}"
        )
    try:
        vault = ClearingVault(chain, chain.contract("ClearingVault", settlement["vault"]))
        job = vault.job(bytes.fromhex(body["job"]["chain_job_id"][2:]))
        if job.status is not JobStatus.SETTLED:
            return Check(name, False, f"the vault reports the job as {job.status.name.lower()}")
        split = vault.split(bytes.fromhex(body["job"]["chain_job_id"][2:]))
        bps = vault.hospital_share_bps()
        token = str(chain.call(vault.contract.functions.token()))
        payout = vault.settled_payout(bytes.fromhex(body["job"]["chain_job_id"][2:])) or ""
    except RaphaError as exc:
        return Check(name, False, f"cannot read the vault: {exc}")
    amount_due = int(settlement["amount_due"])
    hospital_amount = amount_due * bps // 10_000
    expected = {
        "receipt hash": (job.receipt_hash, digest),
        "records": (job.records, body["records"]),
        "price per record": (job.price_per_record, int(settlement["price_per_record"])),
        "budget": (job.budget, int(settlement["budget"])),
        "amount due": (job.amount_due, amount_due),
        "hospital id": ("0x" + job.hospital_id.hex(), settlement["hospital_id"]),
        "token": (token.lower(), settlement["token"].lower()),
        "payout address": (payout.lower(), settlement["payout"].lower()),
        "hospital share": (split.hospital_amount, hospital_amount),
        "treasury share": (split.treasury_amount, amount_due - hospital_amount),
        "payer refund": (split.payer_refund, int(settlement["budget"]) - amount_due),
    }
    wrong = [field for field, (held, stated) in expected.items() if held != stated]
    if wrong:
        return Check(name, False, "the vault holds a different " + ", ".join(wrong))
    return Check(
        name,
        True,
        f"settled: {amount_due} due, {hospital_amount} to the hospital "
        f"({bps / 100:g}%), {amount_due - hospital_amount} to the treasury, "
        f"{split.payer_refund} back to the payer",
    )


def failed(checks: Sequence[Check]) -> list[Check]:
    """The checks that failed (a check not run is not a failure)."""
    return [c for c in checks if c.ok is False]
