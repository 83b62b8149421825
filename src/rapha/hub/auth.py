"""API keys and node request signatures: who is calling the hub.

**API keys** (companies, hospitals' admins, the operator) look like
``rk_demo_3f9c2a7b1d4e5f60_<43 characters>``: a prefix, the environment the key is bound
to (``demo`` or ``production``), a public key id and a 256-bit secret. The hub stores only
``HMAC-SHA256(pepper, secret)`` and compares it in constant time; a key is revocable, and
a revoked key is refused like an unknown one. A demo key can only reach demo nodes and
jobs, a production key only production ones.

**Node requests** are signed with the node's enrolled Ed25519 key over
:func:`node_request_message`: the method, the path, the query string, the SHA-256 of the
body, a timestamp and a random request id. The hub refuses a timestamp outside
:data:`CLOCK_SKEW_SECONDS` and a request id it has seen (replay protection).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from rapha import crypto
from rapha.attest.evidence import Environment
from rapha.errors import SignatureError, UsageError

__all__ = [
    "CLOCK_SKEW_SECONDS",
    "KEY_PREFIX",
    "NewKey",
    "ParsedKey",
    "ReplayGuard",
    "hash_secret",
    "new_api_key",
    "node_request_message",
    "parse_api_key",
    "sign_node_request",
    "verify_node_request",
]

KEY_PREFIX: Final = "rk"
CLOCK_SKEW_SECONDS: Final = 300
_KEY = re.compile(r"rk_(demo|production)_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
NODE_REQUEST_TAG: Final = b"rapha.hub.node-request.v1"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    environment: Environment
    key_id: str
    secret: str


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly made key: ``token`` is shown once; ``secret_hmac`` is what is stored."""

    token: str
    key_id: str
    environment: Environment
    secret_hmac: bytes


def hash_secret(pepper: str, secret: str) -> bytes:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).digest()


def new_api_key(environment: Environment, pepper: str) -> NewKey:
    """A new random key bound to ``environment``."""
    if environment not in ("demo", "production"):
        raise UsageError("an API key is bound to demo or production")
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    token = f"{KEY_PREFIX}_{environment}_{key_id}_{secret}"
    return NewKey(token, key_id, environment, hash_secret(pepper, secret))


def parse_api_key(token: str) -> ParsedKey | None:
    """The parts of a well-formed key, or ``None`` (never an exception: it is untrusted)."""
    match = _KEY.fullmatch(token.strip())
    if match is None:
        return None
    environment: Environment = "demo" if match.group(1) == "demo" else "production"
    return ParsedKey(environment, match.group(2), match.group(3))


def node_request_message(
    *, method: str, path: str, query: str, body: bytes, timestamp: int, request_id: str
) -> bytes:
    """The bytes a node signs for one request (and the hub re-derives to check it)."""
    return b"\n".join(
        [
            NODE_REQUEST_TAG,
            method.upper().encode(),
            path.encode(),
            query.encode(),
            hashlib.sha256(body).hexdigest().encode(),
            str(timestamp).encode(),
            request_id.encode(),
        ]
    )


def sign_node_request(
    key: crypto.Ed25519PrivateKey,
    *,
    node_id: str,
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    now: float | None = None,
) -> dict[str, str]:
    """The headers a node sends: ``X-Rapha-Node``, ``-Timestamp``, ``-Request-Id`` and
    ``-Signature``."""
    timestamp = int(now if now is not None else time.time())
    request_id = secrets.token_hex(16)
    message = node_request_message(
        method=method, path=path, query=query, body=body, timestamp=timestamp, request_id=request_id
    )
    return {
        "X-Rapha-Node": node_id,
        "X-Rapha-Timestamp": str(timestamp),
        "X-Rapha-Request-Id": request_id,
        "X-Rapha-Signature": crypto.sign(key, message).hex(),
    }


class ReplayGuard:
    """Remembers request ids for twice the clock-skew window (one hub process).

    Several hub processes share the database's table instead (hub issue); this is the
    single-process implementation.
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_time(self, request_id: str, now: float) -> bool:
        with self._lock:
            horizon = now - 2 * CLOCK_SKEW_SECONDS
            if len(self._seen) > 100_000:
                self._seen = {k: t for k, t in self._seen.items() if t > horizon}
            if request_id in self._seen:
                return False
            self._seen[request_id] = now
            return True


def verify_node_request(
    public_key: crypto.Ed25519PublicKey,
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    query: str,
    body: bytes,
    replay: ReplayGuard,
    now: float | None = None,
) -> None:
    """Check a node request's signature, freshness and uniqueness.

    Raises:
        SignatureError: naming what is wrong (never which part of the key is).
    """
    current = time.time() if now is None else now
    lowered = {k.lower(): v for k, v in headers.items()}  # HTTP header names ignore case
    try:
        timestamp = int(lowered["x-rapha-timestamp"])
        request_id = lowered["x-rapha-request-id"]
        signature = bytes.fromhex(lowered["x-rapha-signature"])
    except (KeyError, ValueError) as exc:
        raise SignatureError("the node request is not signed (X-Rapha-* headers)") from exc
    if not re.fullmatch(r"[0-9a-f]{32}", request_id):
        raise SignatureError("the node request id is malformed")
    if abs(current - timestamp) > CLOCK_SKEW_SECONDS:
        raise SignatureError("the node request's timestamp is too far from the hub's clock")
    message = node_request_message(
        method=method, path=path, query=query, body=body, timestamp=timestamp, request_id=request_id
    )
    crypto.verify(public_key, signature, message)
    if not replay.first_time(request_id, current):
        raise SignatureError("the node request was replayed")
