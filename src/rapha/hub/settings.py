"""The hub's typed settings (``hub.toml`` + ``RAPHA_HUB_*`` environment variables).

Secrets are refused when unset or left at a placeholder: the API-key pepper (an HMAC key
every stored API-key hash depends on) must be a real random value, and the hub's signing
key must be a private key file only its owner can read.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from rapha.config import Settings, refuse_default_secret

__all__ = ["DEFAULT_DATABASE_URL", "HubSettings"]

DEFAULT_DATABASE_URL = "sqlite:///rapha-hub.db"


class HubSettings(Settings):
    """Everything ``rapha hub serve`` needs; see ``docs/operator.md``."""

    env_prefix: ClassVar[str] = "RAPHA_HUB"

    #: Listen address; the default is loopback (put a TLS proxy in front for the network).
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)
    #: SQLAlchemy URL: SQLite by default, ``postgresql+psycopg://…`` in production.
    database_url: str = DEFAULT_DATABASE_URL
    #: ``embedded`` (in-process EVM, demo and tests) or a JSON-RPC URL.
    chain: str = "embedded"
    #: The hub's id in receipts.
    hub_id: str = Field(default="rapha-hub", min_length=1, max_length=128)
    #: HMAC key for API-key hashes; at least 32 characters of randomness.
    api_key_pepper: str = Field(min_length=32)
    #: The hub's Ed25519 key (countersigns receipts), PKCS#8 PEM, mode 0600.
    signing_key: Path
    #: Where bundles and outboxes are stored, content-addressed.
    artifacts: Path = Path("rapha-hub-artifacts")
    #: With a JSON-RPC ``chain``: the deployed vault's address. Unset, the chain is taken
    #: for a local dev node (anvil) and the demo contracts are deployed on it at start.
    vault: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{40}$")
    #: With ``vault``: the chain id the RPC must report, and the operator's secp256k1 key
    #: (hex, mode 0600) that settles and marks jobs failed.
    chain_id: int | None = Field(default=None, ge=1)
    operator_key: Path | None = None
    #: Blocks a settlement must be buried under before the job is ``settled``.
    confirmations: int = Field(default=1, ge=1, le=1000)
    #: A node's lease on a job, seconds: heartbeats extend it; when it runs out the job is
    #: requeued to another node (the vault's refund delay must exceed lease times attempts).
    lease_seconds: float = Field(default=900.0, ge=5, le=7 * 24 * 3600)
    #: Leases per job before it fails.
    max_attempts: int = Field(default=3, ge=1, le=100)
    #: How often the background loop funds, requeues, settles and releases refunds, seconds.
    loop_interval: float = Field(default=2.0, gt=0, le=600)
    #: PEM files of the TPM vendors' EK root CAs a ``tpm2`` node's EK certificate must
    #: chain to, and of their intermediates (no root: no ``tpm2`` node can enrol).
    ek_ca_certificates: list[Path] = Field(default_factory=list)
    ek_intermediates: list[Path] = Field(default_factory=list)

    @field_validator("api_key_pepper")
    @classmethod
    def _real_pepper(cls, value: str) -> str:
        return refuse_default_secret("api_key_pepper", value)
