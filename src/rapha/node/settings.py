"""The node's settings: one ``node.toml`` (written by ``rapha node init``) parsed once.

Environment overrides use the prefix ``RAPHA_NODE`` (``RAPHA_NODE_SCOPE__MAX_STUDIES=500``,
see :mod:`rapha.config`). Relative paths, whether from the file or the environment, are
resolved against the directory of the config file (the working directory when there is
none); command-line flags are made absolute by the CLI before they get here.

The tables::

    name = "st-elsewhere-radiology"     # how the hub knows this node
    opt_out = "opt-out.txt"             # patients who opted out (required, may be empty)
    labels = "labels.csv"               # optional label table (AccessionNumber/StudyInstanceUID)
    state_dir = "state"                 # the node's own records (jobs, views, lookups)
    audit_log = "state/audit.jsonl"     # the hash-chained audit log
    [source]                            # kind = "folder" (path) or "dicomweb" (url, [source.auth])
    [scope]                             # rapha.pacs.scope.ScopeSettings
    [keys]                              # hmac_key, split_key, signing_key: three distinct files
    [ocr.disabled]                      # MODALITY = "written justification"
    [view]                              # size, dtype, ratios
    [policy]                            # admission/output Rego files, k_anonymity, dp_*, quotas,
                                        # pinned company keys, allowed orgs/kinds, min price
    [hub]                               # rapha node run: the hub, attestation, price, payout

Validation refuses unsafe values with a message naming the field, never the value: PACS
credentials in a URL, plain HTTP to a remote PACS (unless explicitly allowed), TLS client
auth over HTTP, one file used as two keys, OCR switched off without a justification.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from rapha import crypto
from rapha.config import Settings, load_settings
from rapha.crypto import Ed25519PrivateKey, Ed25519PublicKey
from rapha.errors import ConfigError, KeyFileError
from rapha.pacs.auth import is_loopback_host
from rapha.pacs.scope import ScopeSettings

__all__ = [
    "BasicAuth",
    "BearerAuth",
    "DicomWebSource",
    "FolderSource",
    "HubLinkSettings",
    "KeySettings",
    "NoAuth",
    "NodeKeys",
    "NodeSettings",
    "OcrSettings",
    "PolicySettings",
    "SandboxSettings",
    "TlsAuth",
    "ViewSettings",
    "load_node_settings",
]

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# DICOM Modality (0008,0060) is a CS value: upper-case letters, digits, space, '_' (PS3.5 §6.2).
_MODALITY_RE = re.compile(r"[A-Z0-9_]{1,16}")
_MIN_JUSTIFICATION = 20
_MAX_SIDE = 4096
_MIN_SIDE = 8


def _read_secret_text(path: Path, what: str) -> str:
    """Read a credential file (0600 enforced), stripped of its trailing newline."""
    crypto.check_private_file(path)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{what} file {path} cannot be read as UTF-8 text") from exc
    if not value:
        raise KeyFileError(f"{what} file {path} is empty")
    return value


# --- source ------------------------------------------------------------------------------


class FolderSource(Settings):
    """A read-only PACS mount: a directory tree of DICOM files."""

    kind: Literal["folder"]
    path: Path


class NoAuth(Settings):
    """No PACS authentication (a PACS on loopback, or one behind a hospital proxy)."""

    kind: Literal["none"] = "none"


class BasicAuth(Settings):
    """HTTP Basic authentication (RFC 7617); the password is read from a 0600 file."""

    kind: Literal["basic"]
    username: str = Field(min_length=1)
    password_file: Path

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("an HTTP Basic user name cannot contain ':' (RFC 7617 §2)")
        return value

    def password(self) -> str:
        """The password; :class:`KeyFileError` when the file is missing or readable by others."""
        return _read_secret_text(self.password_file, "PACS password")


class BearerAuth(Settings):
    """A bearer token (RFC 6750) read from a 0600 file."""

    kind: Literal["bearer"]
    token_file: Path

    def token(self) -> str:
        """The token; :class:`KeyFileError` when the file is missing or readable by others."""
        return _read_secret_text(self.token_file, "PACS token")


class TlsAuth(Settings):
    """A TLS client certificate, with an optional custom CA bundle for the PACS server."""

    kind: Literal["tls"]
    cert: Path
    key: Path
    ca: Path | None = None


PacsAuth = Annotated[NoAuth | BasicAuth | BearerAuth | TlsAuth, Field(discriminator="kind")]


class DicomWebSource(Settings):
    """Any DICOMweb PACS: QIDO-RS to search, WADO-RS to retrieve."""

    kind: Literal["dicomweb"]
    url: str
    auth: PacsAuth = NoAuth()
    timeout: float = Field(default=60.0, gt=0, le=3600)
    #: Plain HTTP to a PACS that is not on this machine sends PHI in clear; off by default.
    allow_insecure_http: bool = False

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not contain credentials; put them in [source.auth]")
        if parts.query or parts.fragment:
            raise ValueError("must be the DICOMweb base URL, without a query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _transport_is_safe(self) -> Self:
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            return self
        if isinstance(self.auth, TlsAuth):
            raise ValueError("url: a TLS client certificate needs an https:// URL")
        if not is_loopback_host(parts.hostname) and not self.allow_insecure_http:
            raise ValueError(
                "url: plain http:// to a PACS on another host sends PHI (and credentials) in "
                "clear; use https://, or set allow_insecure_http = true if the network is "
                "trusted"
            )
        return self


Source = Annotated[FolderSource | DicomWebSource, Field(discriminator="kind")]


# --- keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeKeys:
    """The node's loaded keys. Never logged; ``repr`` shows no key material."""

    hmac_key: bytes = field(repr=False)
    split_key: bytes = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)


class KeySettings(Settings):
    """Paths of the node's three keys: three different files, all 0600."""

    #: 32-byte HMAC-SHA256 key for pseudonyms (rotating it changes every pseudonym).
    hmac_key: Path
    #: 32-byte key assigning patients to train/val/test, separate so rotation is independent.
    split_key: Path
    #: Ed25519 PKCS#8 PEM key signing the audit log and receipts.
    signing_key: Path

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        paths = [os.path.normpath(p) for p in (self.hmac_key, self.split_key, self.signing_key)]
        if len(set(paths)) != 3:
            raise ValueError("hmac_key, split_key and signing_key must be three different files")
        return self

    def load(self) -> NodeKeys:
        """Load and check all three keys (:class:`KeyFileError` naming the file at fault)."""
        hmac_key = crypto.load_secret(self.hmac_key, length=32)
        split_key = crypto.load_secret(self.split_key, length=32)
        if hmac_key == split_key:
            raise KeyFileError(
                f"{self.split_key} holds the same bytes as {self.hmac_key}; the split key "
                "must be a separate secret (`rapha node init` makes both)"
            )
        return NodeKeys(hmac_key, split_key, crypto.load_private_key(self.signing_key))


# --- OCR and view defaults ---------------------------------------------------------------


class OcrSettings(Settings):
    """Burned-in text OCR: on for every in-scope modality unless switched off in writing."""

    #: Modality code → why OCR is not needed for it (at least 20 characters).
    disabled: dict[str, str] = Field(default_factory=dict)

    @field_validator("disabled")
    @classmethod
    def _justified(cls, value: dict[str, str]) -> dict[str, str]:
        for modality, why in value.items():
            if not _MODALITY_RE.fullmatch(modality):
                raise ValueError(
                    "keys must be upper-case DICOM modality codes such as DX (PS3.3 C.7.3.1.1.1)"
                )
            if len(why.strip()) < _MIN_JUSTIFICATION:
                raise ValueError(
                    f"switching OCR off for {modality} needs a written justification of at "
                    f"least {_MIN_JUSTIFICATION} characters"
                )
        return value


class ViewSettings(Settings):
    """Defaults for the view a job gets; a job may ask for another size or dtype."""

    size: tuple[int, int] = (224, 224)
    dtype: Literal["uint8", "uint16", "float16"] = "uint8"
    #: train, val, test shares of patients; they sum to 1.
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)

    @field_validator("size")
    @classmethod
    def _size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not all(_MIN_SIDE <= side <= _MAX_SIDE for side in value):
            raise ValueError(f"each side must be between {_MIN_SIDE} and {_MAX_SIDE} pixels")
        return value

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("train, val and test ratios must be non-negative and sum to 1")
        if value[0] <= 0 or value[2] <= 0:
            raise ValueError("the train and test ratios must be above 0")
        return value


# --- policies ----------------------------------------------------------------------------


class PolicySettings(Settings):
    """The hospital's rules for jobs and outputs (``[policy]``), seen by both Rego policies.

    ``admission`` and ``output`` are the hospital's Rego files (``rapha node init`` writes
    copies of the defaults); ``None``, as in configs written before they existed, means the
    default policies shipped with Rapha (:func:`rapha.runtime.policy.default_policy_text`).
    The other values are given to the policies as ``input.hospital``.
    """

    admission: Path | None = None
    output: Path | None = None
    #: Smallest cohort a result may be computed on (and the profile's small-cell floor).
    k_anonymity: int = Field(default=10, ge=2, le=1000)
    #: Whether bundles may carry their own model code (``model.py``).
    allow_custom_code: bool = True
    #: Whether training must be differentially private.
    dp_required: bool = False
    #: Largest privacy budget epsilon a job may declare or spend.
    dp_epsilon: float = Field(default=8.0, gt=0, le=100)
    #: Largest delta a job may declare or spend.
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    #: Largest total size of what one job may send out, in bytes.
    max_output_bytes: int = Field(default=512 << 20, ge=1 << 10, le=16 << 30)
    #: Evaluate jobs one company may run on this node (each one probes the test split).
    evaluation_quota: int = Field(default=20, ge=1)
    #: Company signing keys the hospital pinned: organisation name -> public key PEM
    #: files. A bundle runs only when signed by a key pinned for the submitting company;
    #: a key the hub hands over is never trusted by itself.
    trusted_keys: dict[str, list[Path]] = Field(default_factory=dict)
    #: Organisations whose jobs this node takes (empty: any with a pinned key).
    allowed_orgs: list[str] = Field(default_factory=list)
    #: Job kinds this node takes.
    allowed_kinds: tuple[Literal["train", "evaluate"], ...] = ("train", "evaluate")
    #: Smallest price per record (token base units) this node accepts.
    min_price_per_record: int = Field(default=0, ge=0)
    #: Total differential-privacy epsilon all DP jobs together may spend on one dataset
    #: (0: no cumulative cap beyond dp_epsilon per job).
    epsilon_budget: float = Field(default=0.0, ge=0)

    def policy_input(self) -> dict[str, Any]:
        """The values the Rego policies see as ``input.hospital`` (paths left out)."""
        return self.model_dump(mode="json", exclude={"admission", "output", "trusted_keys"})

    def pinned_keys(self, org: str) -> list[Ed25519PublicKey]:
        """The public keys pinned for ``org`` (:class:`KeyFileError` naming a bad file)."""
        return [crypto.load_public_key(path) for path in self.trusted_keys.get(org, [])]


class SandboxSettings(Settings):
    """How model code is sandboxed (``[sandbox]``); see :mod:`rapha.runtime.sandbox`.

    The rules themselves (namespaces, binds, seccomp) are fixed; these are the binary, the
    dedicated uids and the limits. There is no setting that turns the sandbox off.
    """

    #: The bubblewrap binary; if it is missing, the node refuses to run any bundle.
    bwrap: Path = Path("/usr/bin/bwrap")
    #: The first of the dedicated unprivileged uids sandboxes run as (one per concurrent run).
    uid: int = Field(default=61000, ge=1000, le=(1 << 31) - 2)
    #: Wall-clock limit of one sandboxed step, seconds.
    wall_seconds: float = Field(default=6 * 3600.0, gt=0, le=7 * 24 * 3600)
    #: CPU-time limit of one step, seconds.
    cpu_seconds: int = Field(default=24 * 3600, ge=1)
    #: Address space of each process, bytes.
    address_space: int = Field(default=32 << 30, ge=1 << 30)
    #: Memory of the whole tree (cgroup, where the host allows), bytes.
    memory: int = Field(default=12 << 30, ge=256 << 20)
    #: Processes (and threads) of the tree.
    processes: int = Field(default=512, ge=16, le=65536)
    #: Open files of each process.
    open_files: int = Field(default=512, ge=64, le=1 << 20)
    #: Size of the sandbox's /tmp, bytes.
    tmp_bytes: int = Field(default=1 << 30, ge=1 << 20)
    #: Size of the output directory, bytes.
    output_bytes: int = Field(default=2 << 30, ge=1 << 20)


# --- the hub -----------------------------------------------------------------------------

_HEX32_RE = r"^0x[0-9a-f]{64}$"


class HubLinkSettings(Settings):
    """How ``rapha node run`` reaches the hub and what it offers there (``[hub]``).

    The node only ever connects out. ``proxy`` (or the ``HTTPS_PROXY`` environment) and
    ``ca_bundle`` are for hospital networks that inspect TLS.
    """

    #: The hub's base URL; plain http:// only to this machine.
    url: str
    #: The id the hub operator enrolled this node under.
    node_id: str = Field(min_length=1, max_length=128)
    #: ``demo`` or ``production``; it must be the environment the node was enrolled in.
    environment: Literal["demo", "production"] = "demo"
    #: A CA bundle (PEM) to verify the hub's TLS certificate with, instead of the system's.
    ca_bundle: Path | None = None
    #: An HTTP(S) proxy URL for the connection to the hub.
    proxy: str | None = None
    #: How long one claim waits at the hub for a job (long poll), seconds.
    poll_wait: float = Field(default=20.0, ge=0, le=300)
    #: The first and the largest pause after a failed call to the hub, seconds (with jitter).
    backoff_initial: float = Field(default=1.0, gt=0, le=60)
    backoff_max: float = Field(default=60.0, gt=0, le=3600)
    #: How often a running job heartbeats (keep it well under the hub's lease), seconds.
    heartbeat_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: ``dev`` (demo only: the node key signs its own measurement) or ``tpm2``.
    attestation: Literal["dev", "tpm2"] = "dev"
    #: The TPM's TCTI for ``tpm2``: ``device:/dev/tpmrm0`` or ``swtpm:host=…,port=…``.
    tpm_tcti: str | None = None
    #: The PCR the measurement is extended into (never 16 or 23).
    tpm_pcr: int = Field(default=15, ge=0, le=23)
    #: The persistent handle of the enrolled attestation key.
    tpm_ak_handle: int = 0x81010002
    #: The hospital's id in the vault's registry (``0x`` + 64 hex).
    hospital_id: str = Field(pattern=_HEX32_RE)
    #: The hospital's secp256k1 settlement key (hex, mode 0600): it signs what it is owed.
    settlement_key: Path
    #: The hospital's payout address, as registered in the vault (receipts name it).
    payout: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    #: Price per record this node asks, token base units (USDC: 6 decimals).
    price_per_record: int = Field(ge=0)
    #: A person approves each job (``rapha node approvals``) before it runs.
    approvals: bool = False
    #: Jobs run side by side (each gets its own sandbox uid).
    concurrency: int = Field(default=1, ge=1, le=16)
    #: Keep each job's view, the node's evaluation (test labels, predictions) and a copy of
    #: its outbox under the state directory after the job (an explicit opt-in; off deletes
    #: them).
    keep_views: bool = False

    @field_validator("url")
    @classmethod
    def _hub_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not contain credentials")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError("plain http:// is allowed only to this machine; use https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tpm_named(self) -> Self:
        if self.attestation == "tpm2" and not self.tpm_tcti:
            raise ValueError('attestation = "tpm2" needs tpm_tcti, e.g. "device:/dev/tpmrm0"')
        if self.attestation == "dev" and self.environment == "production":
            raise ValueError("a production node attests with tpm2; dev evidence is demo-only")
        if self.tpm_pcr in (16, 23):
            raise ValueError("tpm_pcr: PCRs 16 and 23 can be reset by software")
        if self.backoff_initial > self.backoff_max:
            raise ValueError("backoff_initial is larger than backoff_max")
        return self

    def load_settlement_key(self) -> bytes:
        """The 32-byte settlement key (:class:`KeyFileError` when missing or not 0600)."""
        return crypto.load_secret_hex(self.settlement_key, length=32, what="settlement key")


# --- the node ----------------------------------------------------------------------------


class NodeSettings(Settings):
    """Everything a hospital node needs, from ``node.toml`` and ``RAPHA_NODE_*``."""

    env_prefix: ClassVar[str] = "RAPHA_NODE"

    name: str
    source: Source
    scope: ScopeSettings
    keys: KeySettings
    opt_out: Path
    labels: Path | None = None
    ocr: OcrSettings = OcrSettings()
    view: ViewSettings = ViewSettings()
    policy: PolicySettings = PolicySettings()
    sandbox: SandboxSettings = SandboxSettings()
    hub: HubLinkSettings | None = None
    state_dir: Path
    audit_log: Path

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(
                "must be 1-63 lower-case letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _ocr_names_scoped_modalities(self) -> Self:
        unknown = sorted(set(self.ocr.disabled) - set(self.scope.modalities))
        if unknown:
            raise ValueError(
                f"ocr.disabled names {', '.join(unknown)}, not in scope.modalities "
                "(a typo would leave OCR on where you meant it off, or the reverse)"
            )
        return self

    def ocr_modalities(self) -> frozenset[str]:
        """In-scope modalities OCR runs on: all of them but those disabled in writing."""
        return frozenset(self.scope.modalities) - frozenset(self.ocr.disabled)


def _resolve_paths(model: BaseModel, base: Path) -> BaseModel:
    """Return ``model`` with every relative :class:`Path` (nested too) joined to ``base``."""

    def resolve(value: Any) -> Any:
        if isinstance(value, Path):
            value = value.expanduser()
            return value if value.is_absolute() else base / value
        if isinstance(value, BaseModel):
            return _resolve_paths(value, base)
        if isinstance(value, list):
            return [resolve(item) for item in value]
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        return value

    changes = {name: resolve(getattr(model, name)) for name in type(model).model_fields}
    return model.model_copy(update=changes)


def load_node_settings(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeSettings:
    """Load ``node.toml`` (plus environment and overrides) with paths made absolute.

    Raises :class:`ConfigError` listing every bad field.
    """
    settings = load_settings(NodeSettings, path, env=env, overrides=overrides)
    base = path.resolve().parent if path is not None else Path.cwd()
    resolved = _resolve_paths(settings, base)
    if not isinstance(resolved, NodeSettings):  # pragma: no cover - model_copy keeps the type
        raise ConfigError("internal error: settings changed type while resolving paths")
    return resolved
