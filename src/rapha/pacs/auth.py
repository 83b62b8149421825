"""How the node authenticates to a DICOMweb PACS, and the HTTP session that carries it.

Three modes, each a frozen value parsed from the node's settings: HTTP Basic
(:class:`BasicAuth`, RFC 7617), a bearer token (:class:`BearerToken`, RFC 6750), or a client
TLS certificate (:class:`ClientCert`). A custom CA bundle verifies the PACS's certificate.
:func:`configure_session` applies them to a :class:`requests.Session` and refuses unsafe
combinations: credentials over plain HTTP to anything but loopback, a client certificate
without HTTPS. Secrets never appear in a ``repr``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from rapha.errors import ConfigError

__all__ = [
    "BasicAuth",
    "BearerToken",
    "ClientCert",
    "PacsAuth",
    "configure_session",
    "is_loopback_host",
]


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic credentials (RFC 7617). Sent only over https or to a loopback host."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BearerToken:
    """An OAuth 2.0 bearer token (RFC 6750), sent as ``Authorization: Bearer …``."""

    token: str = field(repr=False)


@dataclass(frozen=True)
class ClientCert:
    """A client TLS certificate and key (PEM); ``ca`` verifies the PACS's certificate."""

    cert: Path
    key: Path
    ca: Path | None = None


PacsAuth = BasicAuth | BearerToken | ClientCert


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


class _VerifyWith(requests.adapters.HTTPAdapter):
    """Verify servers against one CA bundle, whatever the environment says.

    ``requests`` lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` override a session's
    ``verify`` (psf/requests#3829); hospital hosts often set them for their proxies, which
    would silently replace the PACS's CA with the system bundle.
    """

    def __init__(self, ca_bundle: str) -> None:
        super().__init__()
        self._ca_bundle = ca_bundle

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        return super().send(
            request,
            stream=stream,
            timeout=timeout,
            verify=self._ca_bundle,
            cert=cert,
            proxies=proxies,
        )


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP literals: the only hosts plain http may reach."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configure_session(
    session: requests.Session, url: str, auth: PacsAuth | None, ca_bundle: Path | None
) -> None:
    """Set up ``session`` to reach the PACS at ``url`` with ``auth``, verifying its
    certificate against ``ca_bundle`` (or ``ClientCert.ca``) when given. Raises
    :class:`ConfigError` for unsafe or inconsistent settings."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("the DICOMweb URL must be an http:// or https:// URL with a host")
    secure = parts.scheme == "https"
    if isinstance(auth, ClientCert):
        if not secure:
            raise ConfigError("a client certificate needs an https:// DICOMweb URL")
        for path in (auth.cert, auth.key):
            if not Path(path).is_file():
                raise ConfigError(f"the client certificate file {path} does not exist")
        session.cert = (str(auth.cert), str(auth.key))
        if auth.ca is not None and ca_bundle is not None and auth.ca != ca_bundle:
            raise ConfigError("give the PACS CA either as ca_bundle or as ClientCert.ca, not both")
        ca_bundle = auth.ca if auth.ca is not None else ca_bundle
    elif (
        isinstance(auth, BasicAuth | BearerToken)
        and not secure
        and not is_loopback_host(parts.hostname)
    ):
        raise ConfigError("PACS credentials would travel unencrypted: use an https:// DICOMweb URL")
    if isinstance(auth, BasicAuth):
        if not auth.username or not auth.password:
            raise ConfigError("PACS Basic authentication needs a username and a password")
        session.auth = (auth.username, auth.password)
    elif isinstance(auth, BearerToken):
        if not auth.token.strip():
            raise ConfigError("the PACS bearer token is empty")
        session.auth = _Bearer(auth.token)
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise ConfigError(f"the PACS CA bundle {ca_bundle} does not exist")
        session.verify = str(ca_bundle)
        session.mount("https://", _VerifyWith(str(ca_bundle)))
