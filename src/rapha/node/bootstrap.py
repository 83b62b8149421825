"""``rapha node init``: lay out a new node directory (issue 3, point 12).

:func:`init_node` writes, under one directory::

    node.toml            commented settings (every key explained), loadable as NodeSettings
    opt-out.txt          the empty opt-out list (0600: once filled in, it names patients)
    keys/hmac.key        32 random bytes: the pseudonym key (0600)
    keys/split.key       32 random bytes: the train/val/test split key (0600)
    keys/node.key        the node's Ed25519 signing key, PKCS#8 PEM (0600)
    keys/node.key.pub    its public key, for `rapha node audit verify --public-key`
    policies/admission.rego  the default admission policy (which jobs may run), now the hospital's
    policies/output.rego     the default output policy (what may leave), now the hospital's
    state/audit.jsonl    the audit log, started with its genesis entry and a `node.init` entry

Keys are never replaced. ``force`` rewrites ``node.toml`` and creates whatever is missing,
keeping existing keys, the opt-out list, the policies (the hospital may have edited them)
and the audit log; to rotate a key, move it aside
first (rotating the HMAC key changes every pseudonym and breaks `rapha node lookup` for
earlier views).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from rapha import __version__, crypto
from rapha.audit import AuditLog
from rapha.errors import KeyFileError, UsageError
from rapha.node.settings import NodeSettings, load_node_settings
from rapha.runtime.policy import default_policy_text

__all__ = ["InitReport", "init_node", "render_config"]

CONFIG_NAME: Final = "node.toml"
OPT_OUT_NAME: Final = "opt-out.txt"
HMAC_KEY: Final = "keys/hmac.key"
SPLIT_KEY: Final = "keys/split.key"
SIGNING_KEY: Final = "keys/node.key"
PUBLIC_KEY: Final = "keys/node.key.pub"
AUDIT_LOG: Final = "state/audit.jsonl"
ADMISSION_POLICY: Final = "policies/admission.rego"
OUTPUT_POLICY: Final = "policies/output.rego"
_KEYS: Final = (HMAC_KEY, SPLIT_KEY, SIGNING_KEY)
_POLICIES: Final[dict[str, Literal["admission", "output"]]] = {
    ADMISSION_POLICY: "admission",
    OUTPUT_POLICY: "output",
}
_ALL: Final = (CONFIG_NAME, OPT_OUT_NAME, *_KEYS, PUBLIC_KEY, *_POLICIES, AUDIT_LOG)
_DIR_MODE: Final = 0o700
_SCOPE_YEARS: Final = 5

_OPT_OUT_HEADER = """\
# Patients who opted out of research use: one PatientID (0010,0020) per line.
# Lines starting with '#' and blank lines are ignored. The node applies this list before
# anything else, so these patients never reach a view. This file names patients: keep it
# readable by the node's user only (chmod 600).
"""


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_node` did: files created and kept (paths relative to ``directory``)."""

    directory: Path
    config: Path
    created: tuple[str, ...]
    kept: tuple[str, ...]
    public_key_hex: str
    audit_head: str
    settings: NodeSettings


def _toml_string(value: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise UsageError("names and paths written to node.toml cannot hold control characters")
    return json.dumps(value, ensure_ascii=True)  # a JSON string is a valid TOML basic string


def _source_toml(source: str | None) -> str:
    if source is not None and source.startswith(("http://", "https://")):
        return (
            '[source]\nkind = "dicomweb"\n'
            f"url = {_toml_string(source)}             # DICOMweb base URL, no credentials\n"
            "timeout = 60                      # seconds per request\n"
            "allow_insecure_http = false       # true allows plain http:// to another host\n"
            "[source.auth]\n"
            'kind = "none"                     # "none", "basic", "bearer" or "tls"; see below\n'
        )
    path = "/mnt/pacs" if source is None else str(Path(source).expanduser().absolute())
    return (
        '[source]\nkind = "folder"\n'
        f"path = {_toml_string(path)}             # the read-only PACS mount\n"
    )


def render_config(name: str, source: str | None, today: datetime.date) -> str:
    """The commented ``node.toml`` ``init_node`` writes."""
    date_from = datetime.date(today.year - _SCOPE_YEARS, 1, 1)
    return f"""\
# Rapha hospital node, written by `rapha node init` (rapha {__version__}) on {today}.
#
# Relative paths are relative to this file's directory. Any value can be overridden by an
# environment variable RAPHA_NODE_<KEY>, with "__" between nested keys, for example
# RAPHA_NODE_SCOPE__MAX_STUDIES=500. An unknown key or an unsafe value stops the node at
# start-up with a message naming the key.

# How the hub and the audit log name this node: lower-case letters, digits, '.', '_', '-'.
name = {_toml_string(name)}

# Patients who opted out: one PatientID per line, '#' comments. Applied before anything
# else; those patients never reach a view. Required even when empty. Keep it chmod 600.
opt_out = "{OPT_OUT_NAME}"

# Optional label table: a CSV keyed by AccessionNumber or StudyInstanceUID, one column per
# finding, values 1 (present), 0 (absent), -1 (uncertain) or empty (unknown). It is joined
# on the node before pseudonymisation.
# labels = "labels.csv"

# The node's own records (views built, jobs run; what `rapha node lookup` answers from).
state_dir = "state"

# The append-only, hash-chained, signed audit log; check it with `rapha node audit verify`.
audit_log = "{AUDIT_LOG}"

# --- where the DICOM comes from -----------------------------------------------------------
# kind = "folder":   a read-only PACS mount, indexed by reading DICOM headers only.
# kind = "dicomweb": any DICOMweb PACS (QIDO-RS to search, WADO-RS to retrieve).
{_source_toml(source)}
# A DICOMweb PACS with authentication looks like this:
# [source]
# kind = "dicomweb"
# url = "https://pacs.example.org/dicom-web"
# [source.auth]
# kind = "basic"                     # HTTP Basic
# username = "rapha"
# password_file = "keys/pacs-password"   # a 0600 file holding only the password
# ... or kind = "bearer" with token_file = "keys/pacs-token" (a 0600 file),
# ... or kind = "tls" with cert = "keys/client.pem", key = "keys/client.key" and,
#     for a private CA, ca = "keys/pacs-ca.pem".

# --- what the node may ask the PACS for ---------------------------------------------------
# Every query is built from this scope and checked against it before it is sent; a query
# without modality and date bounds, with a wildcard, or above the cap is refused.
[scope]
modalities = ["DX", "CR"]          # DICOM Modality codes (0008,0060); one query each
body_parts = ["CHEST"]             # BodyPartExamined (0018,0015), checked per series/instance
date_from = {date_from.isoformat()}             # first StudyDate included
date_to = {today.isoformat()}               # last StudyDate included; move it on to add studies
max_studies = 1000                 # hard cap on studies per build; a larger match is refused
# study_uids = ["1.2.840.99999.1"]   # optional allow-list of StudyInstanceUIDs ...
# accessions = ["ACC0001"]           # ... or of AccessionNumbers (these lists are PHI)

# --- keys: all 0600, back them up somewhere safe, never share them -------------------------
[keys]
hmac_key = "{HMAC_KEY}"       # 32 bytes: pseudonyms; without it nothing can be looked up again
split_key = "{SPLIT_KEY}"     # 32 bytes: assigns each patient to train/val/test, separately
signing_key = "{SIGNING_KEY}"     # Ed25519: signs the audit log and receipts

# --- burned-in text screening -------------------------------------------------------------
# OCR looks for text burned into the pixels and excludes such images. It runs on every
# in-scope modality. To switch it off for one, write down why (at least 20 characters):
[ocr.disabled]
# CR = "All CR plates come from readers that cannot burn in text (DPO review 2025-01-15)."

# --- the view a job gets, unless the job asks for another size or dtype -------------------
[view]
size = [224, 224]                  # rows, columns after resampling
dtype = "uint8"                    # uint8, uint16 or float16
ratios = [0.7, 0.15, 0.15]         # train, val, test shares of patients; they sum to 1

# --- policies: which jobs run here, and what may leave -------------------------------------
# Both are Rego (OPA's language) files owned by the hospital: edit them to tighten the
# rules. The values below are what both policies see as `input.hospital`. A policy that
# fails to compile, crashes or times out refuses the job or the output.
[policy]
admission = "{ADMISSION_POLICY}"   # checked before any bundle code runs
output = "{OUTPUT_POLICY}"         # checked by the output guard before anything leaves
allow_custom_code = true                # false: only zoo models, no model.py from companies
dp_required = false                     # true: training must be differentially private
dp_epsilon = 8.0                        # largest privacy budget epsilon a job may use
dp_delta = 1e-5                         # largest delta a job may use
k_anonymity = 10                        # smallest cohort a result may be computed on
max_output_bytes = {512 << 20}            # largest total a job may send out (512 MiB)
evaluation_quota = 20                   # evaluate jobs per company (each probes the test split)

# --- the sandbox model code runs in (docs/security.md); it cannot be switched off ---------
[sandbox]
bwrap = "/usr/bin/bwrap"                # without it (or without user namespaces) nothing runs
uid = 61000                             # first of the dedicated uids (one per concurrent job)
wall_seconds = 21600                    # wall-clock limit of one sandboxed step
memory = {12 << 30}                   # memory of the whole process tree (cgroup), bytes
processes = 512                         # processes and threads of the tree
tmp_bytes = {1 << 30}                   # size of the sandbox's /tmp
output_bytes = {2 << 30}                # size of its output directory

# --- the hub: `rapha node run` connects out to it (docs/hospital.md) ----------------------
# Uncomment and fill in once the hub operator enrolled this node.
# [hub]
# url = "https://hub.example.org"        # plain http:// only to this machine
# node_id = "{name}-1"                   # the id the operator enrolled
# environment = "demo"                   # demo or production (production needs tpm2)
# attestation = "dev"                    # dev (demo only) or tpm2 (with tpm_tcti)
# hospital_id = "0x…"                    # the hospital's id in the vault registry
# settlement_key = "keys/settlement.key" # secp256k1 key (hex, 0600) that signs what is owed
# payout = "0x…"                         # the payout address registered in the vault
# price_per_record = 2500                # token base units (USDC: 6 decimals)
# approvals = false                      # true: a person approves each job first
# ca_bundle = "keys/hub-ca.pem"          # a private CA for the hub's TLS certificate
# proxy = "http://proxy.hospital:3128"   # an outbound proxy (or HTTPS_PROXY)
"""


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)


def init_node(
    directory: Path,
    *,
    name: str = "rapha-node",
    source: str | None = None,
    force: bool = False,
    today: datetime.date | None = None,
) -> InitReport:
    """Lay out a node in ``directory`` (see the module docstring); return what was done.

    Without ``force``, any existing node file is refused (:class:`KeyFileError` when a key
    exists, :class:`UsageError` otherwise) and nothing is written. ``source`` is a folder
    path or a DICOMweb URL.
    """
    directory = directory.expanduser().absolute()
    existing = [rel for rel in _ALL if (directory / rel).exists()]
    if existing and not force:
        what = KeyFileError if any(rel in _KEYS for rel in existing) else UsageError
        raise what(
            f"{directory} already holds node files ({', '.join(existing)}); refusing to "
            "overwrite them. Use --force to rewrite node.toml and create what is missing "
            "(keys, the opt-out list and the audit log are never replaced)"
        )
    if (directory / AUDIT_LOG).exists() and not (directory / SIGNING_KEY).exists():
        raise KeyFileError(
            f"{directory / AUDIT_LOG} exists but the key that signed it ({SIGNING_KEY}) does "
            "not; restore the key, or move the audit log aside to start a new one"
        )
    text = render_config(name, source, today or datetime.date.today())
    created: list[str] = []

    _mkdir_private(directory)
    _mkdir_private(directory / "keys")
    _mkdir_private(directory / "state")
    for rel in (HMAC_KEY, SPLIT_KEY):
        if not (directory / rel).exists():
            crypto.write_secret(directory / rel, secrets.token_bytes(32))
            created.append(rel)
    if (directory / SIGNING_KEY).exists():
        key = crypto.load_private_key(directory / SIGNING_KEY)
    else:
        key = crypto.generate_private_key()
        crypto.save_private_key(key, directory / SIGNING_KEY)
        created.append(SIGNING_KEY)
    if not (directory / PUBLIC_KEY).exists():
        crypto.save_public_key(key.public_key(), directory / PUBLIC_KEY)
        created.append(PUBLIC_KEY)
    if not (directory / OPT_OUT_NAME).exists():
        crypto.write_private_file(directory / OPT_OUT_NAME, _OPT_OUT_HEADER.encode())
        created.append(OPT_OUT_NAME)
    _mkdir_private(directory / "policies")
    for rel, policy in _POLICIES.items():
        if not (directory / rel).exists():
            crypto.write_private_file(directory / rel, default_policy_text(policy).encode())
            created.append(rel)
    config = directory / CONFIG_NAME
    tmp = config.with_name(f".{CONFIG_NAME}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, config)
    created.append(CONFIG_NAME)

    settings = load_node_settings(config, env={})
    settings.keys.load()  # every key, old or new, must load before the node is declared ready
    if (directory / AUDIT_LOG).exists():
        log = AuditLog(directory / AUDIT_LOG, key)
    else:
        log = AuditLog.create(directory / AUDIT_LOG, key)
        created.append(AUDIT_LOG)
    kept = tuple(rel for rel in _ALL if rel not in created)
    head = log.append(
        "node.init",
        {"rapha": __version__, "created": sorted(created), "kept": sorted(kept)},
    )
    return InitReport(
        directory=directory,
        config=config,
        created=tuple(created),
        kept=kept,
        public_key_hex=crypto.public_key_bytes(key.public_key()).hex(),
        audit_head=head,
        settings=settings,
    )
