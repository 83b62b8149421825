"""The hub's service layer: every rule about who may do what lives here, not in routes.

Routes (``rapha.hub.app``) and the operator CLI (``rapha hub admin``) call these functions
with a :class:`Principal`; each function checks the principal's role before it touches
anything, and every operator action is written to ``operator_actions``.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from rapha import crypto
from rapha.attest.evidence import Environment, EvidenceKind, Verdict
from rapha.attest.verifier import Verifier
from rapha.errors import ConfigError, KeyFileError, RaphaError, UsageError
from rapha.hub.auth import NewKey, hash_secret, new_api_key, parse_api_key
from rapha.hub.db import ApiKey, Database, Node, OperatorAction, Org, Role, utcnow
from rapha.hub.stores import DatabaseAllowlist, DatabaseEnrollmentStore

if TYPE_CHECKING:
    from rapha.hub.profiles import NodeFit

__all__ = [
    "SYSTEM",
    "AuthError",
    "ForbiddenError",
    "Hub",
    "NodeView",
    "Principal",
]


class AuthError(RaphaError):
    """No valid credentials (HTTP 401)."""


class ForbiddenError(RaphaError):
    """Valid credentials, not allowed to do this (HTTP 403)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an organisation with a role, through a key bound to an environment."""

    org_id: str
    org_name: str
    role: Role
    environment: Environment
    key_id: str

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR


#: How recent a node's last verified attestation must be for it to be given a job.
ATTESTATION_FRESHNESS_SECONDS = 3600.0

#: The operator acting on the hub's own host (``rapha hub admin`` with database access).
SYSTEM = Principal("system", "system", Role.OPERATOR, "production", "cli")


class NodeView(BaseModel):
    """A node as the operator sees it (also the API's response schema)."""

    model_config = ConfigDict(frozen=True)

    id: str
    org: str
    environment: str
    kind: str
    activated: bool
    public_key: str

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


class Hub:
    """The hub's operations over one database (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        *,
        pepper: str,
        verifier: Verifier | None = None,
        eligible: Callable[[str, dict[str, Any]], bool] | None = None,
        attestation_freshness: float = ATTESTATION_FRESHNESS_SECONDS,
    ) -> None:
        self.db = db
        self.pepper = pepper
        self.verifier = verifier or Verifier(DatabaseEnrollmentStore(db), DatabaseAllowlist(db))
        self._eligible = eligible
        self.attestation_freshness = attestation_freshness

    def eligible(self, node_id: str, requirements: dict[str, Any]) -> bool:
        """Whether ``node_id`` may take a job needing ``requirements``.

        By default the matcher decides (:meth:`rapha.hub.profiles.ProfileService.is_eligible`):
        the node's published profile, its price, its environment, and an attestation that
        verified within :attr:`attestation_freshness` seconds.
        """
        if self._eligible is not None:
            return self._eligible(node_id, requirements)
        from rapha.hub.profiles import ProfileService

        with self.db.session() as session:
            node = session.get(Node, node_id)
            environment = node.environment if node is not None else ""
        fresh_after = utcnow() - timedelta(seconds=self.attestation_freshness)
        return ProfileService(self.db).is_eligible(
            node_id, requirements, environment=environment, fresh_after=fresh_after
        )

    def explain(self, requirements: dict[str, Any], environment: str) -> str:
        """Why no node takes a job needing ``requirements`` (or how many could)."""
        from rapha.hub.profiles import JobRequirements, ProfileService

        fresh_after = utcnow() - timedelta(seconds=self.attestation_freshness)
        return ProfileService(self.db).explain_no_match(
            JobRequirements.parse(requirements), environment=environment, fresh_after=fresh_after
        )

    def route_table(self, requirements: dict[str, Any], environment: str) -> list[NodeFit]:
        """Each node of ``environment`` against a job needing ``requirements``: the first
        requirement it fails, or none (:meth:`ProfileService.route_table`)."""
        from rapha.hub.profiles import JobRequirements, ProfileService

        fresh_after = utcnow() - timedelta(seconds=self.attestation_freshness)
        return ProfileService(self.db).route_table(
            JobRequirements.parse(requirements), environment=environment, fresh_after=fresh_after
        )

    # --- identities -----------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        """The principal behind an API key; unknown, malformed and revoked keys all fail."""
        parsed = parse_api_key(token or "")
        if parsed is None:
            raise AuthError("missing or malformed API key: send 'Authorization: Bearer rk_…'")
        with self.db.session() as session:
            key = session.get(ApiKey, parsed.key_id)
            expected = key.secret_hmac if key is not None else b"\0" * 32
            matches = hmac.compare_digest(expected, hash_secret(self.pepper, parsed.secret))
            if key is None or not matches or key.revoked_at is not None:
                raise AuthError("unknown or revoked API key")
            if key.environment != parsed.environment:
                raise AuthError("unknown or revoked API key")
            org = session.get(Org, key.org_id)
            if org is None:  # pragma: no cover - foreign key
                raise AuthError("unknown or revoked API key")
            return Principal(org.id, org.name, Role(org.role), parsed.environment, key.id)

    def _operator(self, principal: Principal, action: str, target: str, **detail: Any) -> None:
        if not principal.is_operator:
            raise ForbiddenError(f"only the operator may {action.replace('_', ' ')}")
        with self.db.session() as session:
            session.add(
                OperatorAction(
                    actor=f"{principal.org_name}/{principal.key_id}",
                    action=action,
                    target=target,
                    detail=detail,
                )
            )

    def create_org(
        self, principal: Principal, name: str, role: Role, *, wallet: str | None = None
    ) -> str:
        """Create an organisation; returns its id."""
        if not 0 < len(name) <= 128:
            raise UsageError("an organisation name is 1 to 128 characters")
        self._operator(principal, "create_org", name, role=role.value)
        with self.db.session() as session:
            if session.execute(select(Org).where(Org.name == name)).first() is not None:
                raise UsageError(f"an organisation named {name!r} exists already")
            org_id = secrets.token_hex(8)
            session.add(Org(id=org_id, name=name, role=role.value, wallet=wallet))
        return org_id

    def set_wallet(self, principal: Principal, name: str, wallet: str) -> None:
        """Set an organisation's registered wallet (a company's payer, a hospital's payout)."""
        if not re.fullmatch(r"0x[0-9a-fA-F]{40}", wallet):
            raise UsageError("a wallet is an 0x-prefixed 20-byte hex address")
        org_id = self.org_id(name)
        self._operator(principal, "set_wallet", name, wallet=wallet)
        with self.db.session() as session:
            org = session.get(Org, org_id)
            if org is not None:
                org.wallet = wallet

    def org_id(self, name: str) -> str:
        with self.db.session() as session:
            org = session.execute(select(Org).where(Org.name == name)).scalar_one_or_none()
            if org is None:
                raise UsageError(f"no organisation named {name!r}: create it with create-org")
            return org.id

    def create_key(
        self, principal: Principal, org_name: str, environment: Environment, *, label: str = ""
    ) -> NewKey:
        """A new API key for ``org_name``; the token is returned once and never stored."""
        org_id = self.org_id(org_name)
        key = new_api_key(environment, self.pepper)
        self._operator(principal, "create_key", org_name, key_id=key.key_id, env=environment)
        with self.db.session() as session:
            session.add(
                ApiKey(
                    id=key.key_id,
                    org_id=org_id,
                    environment=environment,
                    secret_hmac=key.secret_hmac,
                    label=label,
                )
            )
        return key

    def revoke_key(self, principal: Principal, key_id: str) -> None:
        self._operator(principal, "revoke_key", key_id)
        with self.db.session() as session:
            key = session.get(ApiKey, key_id)
            if key is None:
                raise UsageError(f"no API key {key_id}")
            if key.revoked_at is None:
                key.revoked_at = utcnow()

    # --- nodes and attestation ------------------------------------------------------------

    def enroll_node(
        self,
        principal: Principal,
        *,
        node_id: str,
        org_name: str,
        public_key_pem: bytes,
        environment: Environment,
        kind: EvidenceKind,
        tpm: Any = None,
    ) -> tuple[bytes, bytes] | None:
        """Enrol a hospital's node. For ``tpm2`` returns the credential challenge the node
        must answer (:meth:`complete_tpm2`); ``tpm`` is its ``Tpm2Enrollment``."""
        org_id = self.org_id(org_name)
        self.verifier.check_kind(kind, environment)  # before the node row exists
        try:
            public = crypto.public_key_bytes(crypto.load_public_key_pem(public_key_pem))
        except KeyFileError as exc:
            raise UsageError(f"the node public key is not an Ed25519 PEM key: {exc}") from exc
        self._operator(principal, "enroll_node", node_id, org=org_name, env=environment, kind=kind)
        with self.db.session() as session:
            org = session.get(Org, org_id)
            if org is None or org.role != Role.HOSPITAL.value:
                raise UsageError(f"{org_name} is not a hospital organisation")
            if session.get(Node, node_id) is None:
                session.add(
                    Node(
                        id=node_id,
                        org_id=org_id,
                        public_key=public,
                        environment=environment,
                        kind=kind,
                    )
                )
        if kind == "tpm2":
            if tpm is None:
                raise UsageError("a tpm2 node enrols with its TPM enrolment (EK certificate, AK)")
            return self.verifier.begin_tpm2_enrollment(
                node_id, public, environment=environment, tpm=tpm
            )
        self.verifier.enroll(node_id, public, environment=environment, kind=kind)
        return None

    def attest(self, evidence: Any, *, environment: Environment) -> Verdict:
        """Verify a node's evidence and, when it passes, record when and what it attested.

        A node is given jobs only while this is recent (:attr:`attestation_freshness`).
        """
        verdict = self.verifier.verify(evidence, environment=environment)
        with self.db.session() as session:
            node = session.get(Node, verdict.node_id)
            if node is not None:
                node.last_attested_at = utcnow()
                node.last_measurement = verdict.measurement
        return verdict

    def complete_tpm2(self, node_id: str, secret: bytes) -> None:
        self.verifier.complete_tpm2_enrollment(node_id, secret)

    def allow_measurement(
        self, principal: Principal, environment: Environment, measurement: str, note: str = ""
    ) -> None:
        if len(measurement) != 64 or any(c not in "0123456789abcdef" for c in measurement):
            raise UsageError("a measurement is a SHA-256 hex digest (rapha node measure)")
        self._operator(principal, "allow_measurement", measurement, env=environment)
        allowlist = self.verifier.allowlist
        if not isinstance(allowlist, DatabaseAllowlist):  # pragma: no cover - wiring
            raise ConfigError("the hub's allowlist is not the database one")
        allowlist.allow(environment, measurement, note)

    def list_nodes(self, principal: Principal) -> list[NodeView]:
        """Every enrolled node (operator only; reads are audited like writes)."""
        self._operator(principal, "list_nodes", "nodes")
        with self.db.session() as session:
            rows = session.execute(
                select(Node, Org.name).join(Org, Org.id == Node.org_id).order_by(Node.id)
            ).all()
            return [
                NodeView(
                    id=n.id,
                    org=name,
                    environment=n.environment,
                    kind=n.kind,
                    activated=n.activated,
                    public_key=n.public_key.hex(),
                )
                for n, name in rows
            ]

    def operator_actions(self) -> list[dict[str, Any]]:
        with self.db.session() as session:
            rows = session.execute(select(OperatorAction).order_by(OperatorAction.id)).scalars()
            return [
                {"actor": a.actor, "action": a.action, "target": a.target, "detail": a.detail}
                for a in rows
            ]
