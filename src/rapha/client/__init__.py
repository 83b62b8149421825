"""The Python SDK for the hub's API: :class:`RaphaClient` (companies, the operator) and
:class:`NodeClient` (a hospital node, signing every request with its key).

Errors from the hub come back as typed exceptions with the hub's own message: 401
:class:`AuthenticationError`, 403 :class:`PermissionDeniedError`, 409
:class:`ConflictError`, any other :class:`HubError` (all :class:`rapha.errors.RemoteError`);
400 and 422 (a request the hub cannot use) :class:`rapha.errors.UsageError`; an
unreachable hub :class:`rapha.errors.RemoteError`.
"""

from __future__ import annotations

import hashlib
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
    """The hub answered with an error; ``status`` is its HTTP status and ``error`` the
    hub's name for it (``StaleLeaseError``, ``TransitionError`` …; empty if it gave none)."""

    def __init__(self, message: str, *, status: int, error: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


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
        body = response.json()
        detail, error = str(body.get("detail", response.text)), str(body.get("error", ""))
    except (ValueError, AttributeError):
        detail, error = response.text[:500], ""
    if response.status_code in (400, 422):
        raise UsageError(f"the hub refused the request: {detail}")
    cls = _BY_STATUS.get(response.status_code, HubError)
    raise cls(f"hub {response.status_code}: {detail}", status=response.status_code, error=error)


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

    def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        timeout: float | None = None,
    ) -> Any:
        try:
            response = self._http.request(
                method,
                path,
                content=content,
                headers={**headers, "Content-Type": "application/json"},
                timeout=timeout if timeout is not None else self._http.timeout,
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

    def chain_terms(self) -> dict[str, Any]:
        """The chain id, vault and token the hub settles on (deposits go there)."""
        result: dict[str, Any] = self.request("GET", "/v1/chain")
        return result

    def upload(self, path: Path) -> dict[str, Any]:
        """Upload a file (a bundle .tar) to the hub's content-addressed store, streamed."""
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)

        def chunks() -> Any:
            with path.open("rb") as fh:
                yield from iter(lambda: fh.read(1 << 20), b"")

        sha256 = digest.hexdigest()
        try:
            response = self._http.put(
                f"/v1/artifacts/{sha256}",
                content=chunks(),
                headers={**self._auth, "Content-Type": "application/octet-stream",
                         "Content-Length": str(path.stat().st_size)},
                timeout=600.0,
            )  # fmt: skip
        except httpx.TransportError as exc:
            raise RemoteError(f"the upload to the hub broke off ({type(exc).__name__})") from exc
        _raise_for(response)
        result: dict[str, Any] = response.json()
        return result

    def result(self, job_id: str) -> dict[str, Any]:
        """The countersigned receipt and the outbox's digest (once the job is settled)."""
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}/result")
        return result

    def fetch(self, job_id: str, out: Path) -> Path:
        """Download a settled job's outbox and receipt into ``out`` (new or empty), for
        ``rapha job verify``; :class:`IntegrityError` if the outbox is not what the
        receipt's release names."""
        import tarfile
        import tempfile

        from rapha.errors import IntegrityError
        from rapha.receipt import write_receipt

        released = self.result(job_id)
        out.mkdir(parents=True, exist_ok=True)
        if any(out.iterdir()):
            raise UsageError(f"{out} is not empty; choose a new --out directory")
        with tempfile.TemporaryFile() as tar:
            digest = hashlib.sha256()
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/outbox",
                                       headers=self._auth, timeout=600.0) as response:  # fmt: skip
                    if not response.is_success:
                        response.read()
                        _raise_for(response)
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        tar.write(chunk)
            except httpx.TransportError as exc:
                raise RemoteError(f"the download broke off ({type(exc).__name__})") from exc
            if digest.hexdigest() != released["outbox_sha256"]:
                raise IntegrityError("the outbox the hub sent is not the one it released")
            tar.seek(0)
            with tarfile.open(fileobj=tar) as archive:
                archive.extractall(out, filter="data")
        write_receipt(out, released["receipt"])
        return out


class NodeClient(_Base):
    """A hospital node's client: every request is signed with the node key."""

    def __init__(
        self, base_url: str, node_id: str, key: crypto.Ed25519PrivateKey, **kwargs: Any
    ) -> None:
        super().__init__(base_url, **kwargs)
        self.node_id = node_id
        self._key = key

    def _signed(self, method: str, path: str, query: str, content: bytes) -> dict[str, str]:
        from rapha.hub.auth import sign_node_request

        return sign_node_request(self._key, node_id=self.node_id, method=method, path=path,
                                 query=query, body=content)  # fmt: skip

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        content = _encode(body)
        parts = urlsplit(path)
        headers = self._signed(method, parts.path, parts.query, content)
        return self._send(method, path, content=content, headers=headers, timeout=timeout)

    def claim(self, wait: float = 0.0) -> dict[str, Any] | None:
        """A lease on a job, or ``None``; ``wait`` seconds of long poll at the hub."""
        path = f"/v1/node/claim?wait={wait:g}" if wait else "/v1/node/claim"
        result: dict[str, Any] | None = self.request("POST", path, timeout=wait + 30.0)
        return result

    def heartbeat(
        self,
        job_id: str,
        token: int,
        audit_head: str | None = None,
        progress: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {"fencing_token": token, "audit_head": audit_head, "progress": progress}
        result: dict[str, Any] = self.request("POST", f"/v1/node/jobs/{job_id}/heartbeat", body)
        return result

    def challenge(self) -> bytes:
        """A fresh nonce for this node's next attestation."""
        result = self.request("POST", "/v1/node/attestation/challenge")
        return bytes.fromhex(result["nonce"])

    def attest(self, evidence: Mapping[str, Any]) -> dict[str, Any]:
        """Send attestation evidence; returns the hub's verdict."""
        result: dict[str, Any] = self.request("POST", "/v1/node/attestation",
                                              {"evidence": dict(evidence)})  # fmt: skip
        return result

    def publish_profile(self, profile: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("PUT", "/v1/node/me/profile", dict(profile))
        return result

    def job(self, job_id: str, token: int) -> dict[str, Any]:
        """The details of a job this node holds the lease of."""
        result: dict[str, Any] = self.request(
            "GET", f"/v1/node/jobs/{job_id}?fencing_token={token}"
        )
        return result

    def download_bundle(self, job_id: str, token: int, sha256: str, dest: Path,
                        *, limit: int) -> Path:  # fmt: skip
        """Stream the job's bundle to ``dest``; :class:`IntegrityError` unless it hashes
        to ``sha256``, :class:`PolicyError` past ``limit`` bytes."""
        from rapha.errors import IntegrityError, PolicyError

        path = f"/v1/node/jobs/{job_id}/bundle"
        query = f"fencing_token={token}"
        headers = self._signed("GET", path, query, b"")
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream("GET", f"{path}?{query}", headers=headers) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                with dest.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        size += len(chunk)
                        if size > limit:
                            raise PolicyError(f"the bundle is larger than {limit} bytes")
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.TransportError as exc:
            raise RemoteError(f"the bundle download from the hub broke off ({exc})") from exc
        if digest.hexdigest() != sha256:
            dest.unlink(missing_ok=True)
            raise IntegrityError("the bundle the hub sent does not hash to the job's bundle")
        return dest

    def delivery_nonce(self, job_id: str, token: int) -> bytes:
        result = self.request("POST", f"/v1/node/jobs/{job_id}/delivery-nonce",
                              {"fencing_token": token})  # fmt: skip
        return bytes.fromhex(result["nonce"])

    def deliver(self, job_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/node/jobs/{job_id}/deliver", dict(body), timeout=600.0
        )
        return result

    def fail(self, job_id: str, token: int, reason: str) -> dict[str, Any]:
        body = {"fencing_token": token, "reason": reason}
        result: dict[str, Any] = self.request("POST", f"/v1/node/jobs/{job_id}/fail", body)
        return result
