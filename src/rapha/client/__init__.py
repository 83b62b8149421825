"""The Python SDK for the hub's API: :class:`RaphaClient` (companies, the operator) and
:class:`NodeClient` (a hospital node, signing every request with its key).

Errors from the hub come back as typed exceptions with the hub's own message: 401
:class:`AuthenticationError`, 403 :class:`PermissionDeniedError`, 409
:class:`ConflictError`, any other :class:`HubError` (all :class:`rapha.errors.RemoteError`);
400 and 422 (a request the hub cannot use) :class:`rapha.errors.UsageError`; an
unreachable hub :class:`rapha.errors.RemoteError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from rapha import crypto
from rapha.errors import RemoteError, UsageError

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "HubError",
    "NodeClient",
    "PermissionDeniedError",
    "RaphaClient",
]


class HubError(RemoteError):
    """The hub answered with an error; ``status`` is its HTTP status."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(HubError):
    """401: the key or the node signature was refused."""


class PermissionDeniedError(HubError):
    """403: valid credentials, not allowed to do this."""


class ConflictError(HubError):
    """409: the job's state does not allow this, or the lease was handed on."""


_BY_STATUS: dict[int, type[HubError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    409: ConflictError,
}


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        detail = response.text[:500]
    if response.status_code in (400, 422):
        raise UsageError(f"the hub refused the request: {detail}")
    cls = _BY_STATUS.get(response.status_code, HubError)
    raise cls(f"hub {response.status_code}: {detail}", status=response.status_code)


def _encode(body: Any) -> bytes:
    return b"" if body is None else json.dumps(body).encode()


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        verify: bool | str | Path = True,
        proxy: str | None = None,
    ) -> None:
        verify_arg: Any = str(verify) if isinstance(verify, Path) else verify
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, verify=verify_arg, proxy=proxy
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, method: str, path: str, *, content: bytes, headers: Mapping[str, str]) -> Any:
        try:
            response = self._http.request(
                method,
                path,
                content=content,
                headers={**headers, "Content-Type": "application/json"},
            )
        except httpx.TransportError as exc:
            raise RemoteError(
                f"the hub at {self._http.base_url} cannot be reached ({type(exc).__name__}); "
                "check the URL, the proxy and the network"
            ) from exc
        _raise_for(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()


class RaphaClient(_Base):
    """A company's (or the operator's) client, authenticated with an API key."""

    def __init__(self, base_url: str, api_key: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._auth = {"Authorization": f"Bearer {api_key}"}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self._send(method, path, content=_encode(body), headers=self._auth)

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/whoami")
        return result

    def submit(self, **job: Any) -> dict[str, Any]:
        """Submit a job (see ``SubmitJob`` in the hub's OpenAPI document)."""
        result: dict[str, Any] = self.request("POST", "/v1/jobs", job)
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}")
        return result

    def jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/v1/jobs")
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/cancel")
        return result


class NodeClient(_Base):
    """A hospital node's client: every request is signed with the node key."""

    def __init__(
        self, base_url: str, node_id: str, key: crypto.Ed25519PrivateKey, **kwargs: Any
    ) -> None:
        super().__init__(base_url, **kwargs)
        self.node_id = node_id
        self._key = key

    def request(self, method: str, path: str, body: Any = None) -> Any:
        from rapha.hub.auth import sign_node_request

        content = _encode(body)
        parts = urlsplit(path)
        headers = sign_node_request(
            self._key,
            node_id=self.node_id,
            method=method,
            path=parts.path,
            query=parts.query,
            body=content,
        )
        return self._send(method, path, content=content, headers=headers)

    def claim(self) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.request("POST", "/v1/node/claim")
        return result

    def heartbeat(self, job_id: str, token: int, audit_head: str | None = None) -> dict[str, Any]:
        body = {"fencing_token": token, "audit_head": audit_head}
        result: dict[str, Any] = self.request("POST", f"/v1/node/jobs/{job_id}/heartbeat", body)
        return result

    def fail(self, job_id: str, token: int, reason: str) -> dict[str, Any]:
        body = {"fencing_token": token, "reason": reason}
        result: dict[str, Any] = self.request("POST", f"/v1/node/jobs/{job_id}/fail", body)
        return result
