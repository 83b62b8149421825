"""``rapha node check``: is this node ready to take jobs? Every check, never just the first.

:func:`run_checks` loads ``node.toml`` and runs, in order:

* ``config``: the file loads and validates (:func:`~rapha.node.settings.load_node_settings`);
* ``keys``: the HMAC, split and signing keys load and are 0600; the settlement key when
  ``[hub]`` is set; every company key pinned in ``[policy] trusted_keys``;
* ``pacs``: the source answers (a readable folder, or a DICOMweb PACS answering QIDO-RS
  with the configured authentication and TLS) and the scope yields at least one study;
* ``hub``: ``GET {url}/healthz`` answers ``{"ok": true}`` through the configured CA bundle
  and proxy (skipped without ``[hub]``);
* ``sandbox``: bubblewrap runs here with user and network namespaces;
* ``tpm``: the TPM at ``tpm_tcti`` answers a PCR read (skipped unless ``attestation =
  "tpm2"``);
* ``audit``: the audit log verifies (chain, hashes, signatures) under the signing key.

Each check is a function returning a :class:`CheckResult`; a check that cannot run
because an earlier one failed is ``skipped`` and says why. Details and fixes name files,
fields and counts, never a key, a password or a patient identifier: they are built from
:class:`~rapha.errors.RaphaError` messages, which carry none (STYLE.md rule 4). A
DICOMweb study query made here is written to the audit log like any other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import httpx

from rapha import crypto
from rapha.attest.tpm2 import Tpm2Provider
from rapha.audit import verify_log
from rapha.errors import ConfigError, DataError, KeyFileError, RaphaError, ScopeError
from rapha.node import settings as node_settings
from rapha.node.job import sandbox_from_settings
from rapha.node.settings import NodeKeys, NodeSettings, load_node_settings
from rapha.node.sources import FOLDER_INDEX, open_source
from rapha.pacs import DicomWebSource, FolderSource, Source

__all__ = [
    "CHECKS",
    "CheckResult",
    "CheckStatus",
    "check_audit",
    "check_hub",
    "check_keys",
    "check_pacs",
    "check_sandbox",
    "check_tpm",
    "run_checks",
]

#: The checks :func:`run_checks` runs, in order.
CHECKS: Final = ("config", "keys", "pacs", "hub", "sandbox", "tpm", "audit")
#: How long the hub has to answer ``/healthz``, seconds.
HUB_TIMEOUT: Final = 10.0


class CheckStatus(StrEnum):
    """How a check came out. ``skipped`` does not fail the node."""

    OK = "ok"
    FAIL = "FAIL"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, outcome, what it found, and for a failure what to do."""

    name: str
    status: CheckStatus
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        """Whether the check did not fail (``ok`` or ``skipped``)."""
        return self.status is not CheckStatus.FAIL

    def to_json(self) -> dict[str, str]:
        """``{"name", "status", "detail", "fix"}``."""
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


def _ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, CheckStatus.OK, detail)


def _fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, CheckStatus.FAIL, detail, fix)


def _skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, CheckStatus.SKIPPED, detail)


# --- config and keys ---------------------------------------------------------------------


def _check_config(
    path: Path, env: Mapping[str, str] | None
) -> tuple[CheckResult, NodeSettings | None]:
    try:
        settings = load_node_settings(path, env=env)
    except ConfigError as exc:
        fix = (
            f"edit {path}: fix the fields named above (`rapha node init --dir NEW` writes a "
            "fully commented example to compare with)"
        )
        return _fail("config", str(exc), fix), None
    kind = settings.source.kind
    hub = "with [hub]" if settings.hub is not None else "no [hub]"
    return _ok("config", f"node {settings.name}: {kind} source, {hub}"), settings


def check_keys(settings: NodeSettings) -> CheckResult:
    """The node's keys, the settlement key (with ``[hub]``) and pinned company keys.

    Every key file is tried, so one run lists every bad file.
    """
    problems: list[str] = []
    fixes: list[str] = []
    node_keys: list[tuple[Path, Callable[[Path], object]]] = [
        (settings.keys.hmac_key, _load_32),
        (settings.keys.split_key, _load_32),
        (settings.keys.signing_key, crypto.load_private_key),
    ]
    for path, load in node_keys:
        try:
            load(path)
        except KeyFileError as exc:
            problems.append(str(exc))
            fixes.append(_key_fix(str(exc), _NODE_KEY_FIX))
    if not problems:
        try:
            settings.keys.load()  # the checks across files: hmac and split keys differ
        except KeyFileError as exc:
            problems.append(str(exc))
            fixes.append(_NODE_KEY_FIX)
    loaded = [] if problems else ["hmac, split and signing keys"]
    if settings.hub is not None:
        try:
            settings.hub.load_settlement_key()
            loaded.append("settlement key")
        except KeyFileError as exc:
            problems.append(str(exc))
            fixes.append(
                _key_fix(str(exc), "[hub] settlement_key must name a 0600 file of 64 hex digits")
            )
    pinned = 0
    for org in sorted(settings.policy.trusted_keys):
        for path in settings.policy.trusted_keys[org]:
            try:
                crypto.load_public_key(path)
                pinned += 1
            except KeyFileError as exc:
                problems.append(f"pinned key of {org}: {exc}")
                fixes.append(
                    f"fix [policy] trusted_keys.{org}: each entry is the company's Ed25519 "
                    "public key PEM, as the company sent it to you"
                )
    if pinned:
        loaded.append(f"{pinned} pinned company key(s)")
    if problems:
        return _fail("keys", "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    return _ok("keys", ", ".join(loaded) + " load (private keys 0600)")


_NODE_KEY_FIX: Final = (
    "restore the node's keys from your backup; `rapha node init --dir DIR --force` "
    "creates missing ones (it never replaces a key), but new keys change every pseudonym"
)


def _load_32(path: Path) -> bytes:
    return crypto.load_secret(path, length=32)


def _node_keys(settings: NodeSettings) -> NodeKeys | None:
    try:
        return settings.keys.load()
    except KeyFileError:
        return None


def _key_fix(message: str, otherwise: str) -> str:
    # A KeyFileError for loose permissions ends with the command that fixes it.
    _, run, command = message.rpartition("run: ")
    return command if run else otherwise


# --- the PACS ----------------------------------------------------------------------------

_SCOPE_FIX: Final = (
    "widen [scope] in node.toml (modalities, body_parts, the date_from..date_to window, "
    "or the allow-lists) so it covers studies your PACS holds"
)


def _open_pacs(settings: NodeSettings, keys: NodeKeys | None) -> Source:
    config = settings.source
    if isinstance(config, node_settings.FolderSource):
        if config.path.is_dir() and not os.access(config.path, os.R_OK | os.X_OK):
            raise DataError(f"the DICOM folder {config.path} is not readable by this user")
        return FolderSource(config.path, cache=settings.state_dir / FOLDER_INDEX)
    if keys is None:  # the DICOMweb source audits each query: it needs the signing key
        raise KeyFileError("the node keys do not load (see keys)")
    return open_source(settings, keys)


def check_pacs(settings: NodeSettings, keys: NodeKeys | None) -> CheckResult:
    """The source answers and the scope yields studies (their count; zero fails).

    ``keys`` are needed for a DICOMweb source only (its queries are audited); without
    them that check is skipped.
    """
    config = settings.source
    where = str(config.path) if isinstance(config, node_settings.FolderSource) else config.url
    if keys is None and isinstance(config, node_settings.DicomWebSource):
        return _skip("pacs", "needs the node's signing key (its queries are audited): fix keys")
    try:
        source = _open_pacs(settings, keys)
    except RaphaError as exc:
        return _fail("pacs", str(exc), _pacs_fix(settings, exc))
    try:
        studies = source.studies(settings.scope.to_scope())
    except ScopeError as exc:
        return _fail("pacs", str(exc), "narrow [scope] or raise [scope] max_studies")
    except RaphaError as exc:
        return _fail("pacs", str(exc), _pacs_fix(settings, exc))
    finally:
        if isinstance(source, DicomWebSource):
            source.close()
    if not studies:
        return _fail("pacs", f"{where} answers, but no study is in scope (0 studies)", _SCOPE_FIX)
    unreadable = len(source.unreadable())
    extra = f"; {unreadable} unreadable file(s) skipped" if unreadable else ""
    count = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}"
    return _ok("pacs", f"{where}: {count} in scope{extra}")


def _pacs_fix(settings: NodeSettings, exc: RaphaError) -> str:
    config = settings.source
    if isinstance(config, node_settings.FolderSource):
        return (
            f"mount the PACS at {config.path}, or fix [source] path in node.toml; the node "
            "only needs read access"
        )
    if isinstance(exc, KeyFileError | ConfigError):
        return "fix the credential files of [source.auth] (they must exist and be 0600)"
    return (
        "check [source] url, that the PACS is up and reachable from this host, its TLS "
        "certificate ([source.auth] ca) and the credentials in [source.auth]"
    )


# --- the hub -----------------------------------------------------------------------------


def check_hub(settings: NodeSettings) -> CheckResult:
    """``GET {url}/healthz`` through the configured CA bundle and proxy answers ok."""
    hub = settings.hub
    if hub is None:
        return _skip("hub", "no [hub] table: this node does not take jobs from a hub")
    fix = (
        f"check [hub] url ({hub.url}), that this host may connect out to it (firewall, "
        "[hub] proxy or HTTPS_PROXY) and, behind a TLS-inspecting proxy, [hub] ca_bundle"
    )
    verify: Any = True
    if hub.ca_bundle is not None:
        if not hub.ca_bundle.is_file():
            return _fail(
                "hub",
                f"the CA bundle {hub.ca_bundle} does not exist",
                "fix [hub] ca_bundle: a PEM file of the CA that signs the hub's certificate",
            )
        verify = str(hub.ca_bundle)
    try:
        with httpx.Client(timeout=HUB_TIMEOUT, verify=verify, proxy=hub.proxy) as client:
            response = client.get(f"{hub.url}/healthz")
    except httpx.HTTPError as exc:
        return _fail("hub", f"{hub.url} does not answer: {_redact(exc, hub.proxy)}", fix)
    except (OSError, ValueError) as exc:  # an unreadable CA bundle, a malformed proxy URL
        return _fail("hub", f"cannot connect to {hub.url}: {_redact(exc, hub.proxy)}", fix)
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != httpx.codes.OK or not isinstance(body, dict):
        return _fail(
            "hub",
            f"{hub.url}/healthz answered HTTP {response.status_code}, not a health report",
            fix,
        )
    if body.get("ok") is not True:
        return _fail("hub", f"{hub.url} reports it is not healthy", "ask the hub operator")
    version = body.get("version")
    shown = f" (rapha {version})" if isinstance(version, str) and len(version) < 40 else ""
    return _ok("hub", f"{hub.url} is healthy{shown}")


def _redact(exc: BaseException, proxy: str | None) -> str:
    """An exception's text without the proxy URL (it may carry proxy credentials)."""
    text = str(exc) or type(exc).__name__
    return text.replace(proxy, "[proxy]") if proxy else text


# --- sandbox, TPM, audit log -------------------------------------------------------------


def check_sandbox(settings: NodeSettings) -> CheckResult:
    """Bubblewrap runs here with user and network namespaces."""
    binary = settings.sandbox.bwrap
    try:
        sandbox_from_settings(settings.sandbox).ensure_available()
    except RaphaError as exc:
        if not binary.is_file():
            fix = (
                f"install bubblewrap (apt-get install bubblewrap) or fix [sandbox] bwrap "
                f"({binary} does not exist)"
            )
        else:
            fix = (
                "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0); see docs/security.md"
            )
        return _fail("sandbox", str(exc), fix)
    return _ok("sandbox", f"{binary} creates the sandbox's user and network namespaces")


def check_tpm(settings: NodeSettings) -> CheckResult:
    """The TPM named by ``[hub] tpm_tcti`` answers a read of the configured PCR."""
    hub = settings.hub
    if hub is None or hub.attestation != "tpm2" or hub.tpm_tcti is None:
        return _skip("tpm", "attestation is not tpm2")
    try:
        provider = Tpm2Provider(hub.tpm_tcti, pcr=hub.tpm_pcr, ak_handle=hub.tpm_ak_handle)
        value = provider.read_pcr()
    except RaphaError as exc:
        fix = (
            "start the TPM resource manager (or swtpm), give this user access to it "
            "(the tss group for /dev/tpmrm0), or fix [hub] tpm_tcti"
        )
        return _fail("tpm", str(exc), fix)
    state = "not extended since boot" if not any(value) else "holds a measurement"
    return _ok("tpm", f"PCR {hub.tpm_pcr} read through {hub.tpm_tcti} ({state})")


def check_audit(settings: NodeSettings) -> CheckResult:
    """The audit log verifies under the node's signing key (skipped when there is none)."""
    path = settings.audit_log
    if not path.exists():
        detail = (
            f"no audit log at {path} yet (`rapha node init` starts one; if there was one "
            "before, it was removed: investigate)"
        )
        return _skip("audit", detail)
    try:
        public_key = crypto.load_private_key(settings.keys.signing_key).public_key()
    except KeyFileError:
        return _skip("audit", "needs the node's signing key: fix keys")
    try:
        verdict = verify_log(path, public_key)
    except RaphaError as exc:
        fix = (
            f"do not append to {path}; keep a copy and investigate with `rapha node audit "
            "verify` (the line named is the first that is wrong)"
        )
        return _fail("audit", str(exc), fix)
    return _ok("audit", f"{verdict.entries} entries verify; head {verdict.head}")


# --- all of them -------------------------------------------------------------------------


def run_checks(
    settings_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    on_check: Callable[[str], None] | None = None,
) -> list[CheckResult]:
    """Run every check of :data:`CHECKS` on the node configured by ``settings_path``.

    Never stops at a failure: a check that needs what failed is ``skipped`` with the
    reason. ``env`` replaces the environment overrides (``RAPHA_NODE_*``; default
    ``os.environ``); ``on_check`` is called with each check's name before it runs.
    """
    announce = on_check or (lambda _name: None)
    announce("config")
    config, settings = _check_config(settings_path, env)
    if settings is None:
        rest = [_skip(name, "node.toml does not load (see config)") for name in CHECKS[1:]]
        return [config, *rest]
    announce("keys")
    results = [config, check_keys(settings)]
    keys = _node_keys(settings)
    steps: list[tuple[str, Callable[[], CheckResult]]] = [
        ("pacs", lambda: check_pacs(settings, keys)),
        ("hub", lambda: check_hub(settings)),
        ("sandbox", lambda: check_sandbox(settings)),
        ("tpm", lambda: check_tpm(settings)),
        ("audit", lambda: check_audit(settings)),
    ]
    for name, step in steps:
        announce(name)
        results.append(step())
    return results
