"""One exception tree for Rapha, and the exit codes the ``rapha`` command returns.

Every error a caller or user can see is a :class:`RaphaError`. Third-party errors
(cryptography, pydicom, httpx, sqlalchemy, web3 …) are converted where they are caught,
with ``raise … from exc``, so they never reach a user.

Messages say what went wrong and what to do next. They never contain a patient
identifier or free text from a DICOM header (STYLE.md rule 4).

The tree::

    RaphaError                      exit 1
    ├── ConfigError                 exit 2   bad or missing settings, unsafe defaults
    ├── UsageError                  exit 2   a command was called with arguments it cannot use
    ├── KeyFileError                exit 3   a key file is missing, malformed or readable by others
    ├── IntegrityError              exit 4   a signature, digest or hash chain does not verify
    │   ├── SignatureError          exit 4   an Ed25519 signature is invalid
    │   │   └── BundleSignatureError         bundle.sig is missing, bad, or from an untrusted key
    │   └── BundleError             exit 4   a submitted bundle cannot be used as it is
    │       ├── BundleFileError              a file was changed, is missing, extra or not plain
    │       ├── BundleSignatureError         (also a SignatureError, above)
    │       ├── ManifestError                bundle.toml fails validation
    │       ├── UnsafeArchiveError           a bundle .tar holds links, devices, ``..`` or too much
    │       └── WeightsFormatError           weights.safetensors is not valid safetensors
    ├── ScopeError                  exit 5   a PACS query falls outside the hospital's scope
    ├── DataError                   exit 6   input data (DICOM, CSV, archive) cannot be used
    ├── PolicyError                 exit 7   a policy refused a bundle, job or output
    ├── SandboxError                exit 8   untrusted code failed, timed out or was killed
    ├── RemoteError                 exit 9   a server (PACS, hub, chain) failed or is unreachable
    │   └── SettlementError                  a chain call reverted; carries the reason
    └── DependencyError             exit 10  a required system package or server is missing
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BundleError",
    "BundleFileError",
    "BundleSignatureError",
    "ConfigError",
    "DataError",
    "DependencyError",
    "ExitCode",
    "IntegrityError",
    "KeyFileError",
    "ManifestError",
    "PolicyError",
    "RaphaError",
    "RemoteError",
    "SandboxError",
    "ScopeError",
    "SettlementError",
    "SignatureError",
    "UnsafeArchiveError",
    "UsageError",
    "WeightsFormatError",
]


class ExitCode(IntEnum):
    """Stable exit codes of the ``rapha`` command. Scripts may rely on these."""

    OK = 0
    ERROR = 1
    CONFIG = 2
    KEY_FILE = 3
    INTEGRITY = 4
    SCOPE = 5
    DATA = 6
    POLICY = 7
    SANDBOX = 8
    REMOTE = 9
    DEPENDENCY = 10
    INTERRUPTED = 130


class RaphaError(Exception):
    """Base of every error Rapha raises on purpose."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(RaphaError):
    """Settings are missing, malformed, or unsafe (for example a default secret)."""

    exit_code = ExitCode.CONFIG


class UsageError(RaphaError):
    """A function or command was called with arguments it cannot use."""

    exit_code = ExitCode.CONFIG


class KeyFileError(RaphaError):
    """A key file is missing, malformed, of the wrong length, or readable by other users."""

    exit_code = ExitCode.KEY_FILE


class IntegrityError(RaphaError):
    """A digest, hash chain or signature does not match what was expected."""

    exit_code = ExitCode.INTEGRITY


class SignatureError(IntegrityError):
    """An Ed25519 signature does not verify under the given public key."""


class BundleError(IntegrityError):
    """A submitted bundle (DESIGN.md, "Formats: Bundle") cannot be accepted as it is.

    Exit code 4 like every integrity failure: a bundle is either exactly what its signer
    signed and well-formed, or it is refused before any of its code or weights are used.
    """


class BundleFileError(BundleError):
    """A bundle file was changed after signing, is missing, is extra, or is not a plain file.

    ``kind`` is one of ``"changed"``, ``"missing"``, ``"extra"``, ``"not-a-file"``,
    ``"too-large"`` or ``"invalid"``; ``path`` is the bundle-relative file name (chosen by the
    company, so safe to show).
    """

    def __init__(self, message: str, *, kind: str, path: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


class BundleSignatureError(SignatureError, BundleError):
    """``bundle.sig`` is missing or malformed, does not verify, or names an untrusted key."""


class ManifestError(BundleError):
    """``bundle.toml`` is not valid TOML or fails validation; the message names the field."""


class UnsafeArchiveError(BundleError):
    """A bundle ``.tar`` holds something we refuse to extract (links, devices, ``..``, size)."""


class WeightsFormatError(BundleError):
    """A weights file is not a well-formed safetensors file (a pickle, truncated, lying header)."""


class ScopeError(RaphaError):
    """A PACS query would leave the hospital's scope; it was refused before being sent."""

    exit_code = ExitCode.SCOPE


class DataError(RaphaError):
    """Input data (DICOM, label CSV, archive) is corrupt or cannot be used."""

    exit_code = ExitCode.DATA


class PolicyError(RaphaError):
    """A hospital or hub policy refused a bundle, a job or an output."""

    exit_code = ExitCode.POLICY


class SandboxError(RaphaError):
    """Untrusted model code failed, exceeded a limit, or was killed."""

    exit_code = ExitCode.SANDBOX


class RemoteError(RaphaError):
    """A remote server (PACS, hub, chain node) failed or could not be reached."""

    exit_code = ExitCode.REMOTE


class SettlementError(RemoteError):
    """A chain transaction or call reverted (escrow, settlement, refund, withdrawal).

    ``reason`` is the contract's revert reason (for example ``"job already settled"``); it
    is chosen by our own contract, so it is safe to show.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the chain refused the transaction: {reason}")
        self.reason = reason


class DependencyError(RaphaError):
    """A required system package, binary or server is not available on this machine."""

    exit_code = ExitCode.DEPENDENCY
