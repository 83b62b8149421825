"""A recording HTTP reverse proxy on loopback, for tests about what reaches a server.

:class:`RecordingProxy` listens on a free 127.0.0.1 port and forwards every request to an
upstream base URL, recording each one *as it arrived* (method, path, query) before doing
anything else, so an empty :attr:`RecordingProxy.requests` proves nothing was sent. It can
also stand in for server behaviour a test needs:

* ``require_bearer``: answer 401 unless ``Authorization: Bearer <token>`` is present (the
  header is not forwarded), like a PACS behind an OAuth gateway;
* ``strip_params``: drop query parameters before forwarding (``{"offset"}`` makes the
  upstream a server that ignores ``offset``);
* ``tls``: serve HTTPS with a server certificate, and require a client certificate signed
  by ``tls.client_ca`` when given, like a PACS behind a TLS-terminating gateway. (Debian
  bookworm's Orthanc cannot serve HTTPS itself: its civetweb calls an OpenSSL 1.1
  function missing from OpenSSL 3 and crashes on the first handshake.)

It uses :mod:`http.client` upstream, not ``requests``, so it adds no log records of its own.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["ProxyTls", "RecordedRequest", "RecordingProxy"]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}
)


@dataclass(frozen=True)
class ProxyTls:
    """The proxy's server certificate and key (PEM), and the CA its clients must present
    a certificate from (``None``: no client certificate is asked for)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    raw_query: str
    query: tuple[tuple[str, str], ...]
    authorization: str | None


class RecordingProxy:
    """Forward loopback HTTP to ``upstream``; record every request. Use as a context manager."""

    def __init__(
        self,
        upstream: str,
        *,
        require_bearer: str | None = None,
        strip_params: frozenset[str] = frozenset(),
        upstream_ca: Path | None = None,
        upstream_cert: tuple[Path, Path] | None = None,
        tls: ProxyTls | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._base_path = parts.path.rstrip("/")
        self._require_bearer = require_bearer
        self._strip = strip_params
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._context = ssl.create_default_context(
                cafile=None if upstream_ca is None else str(upstream_ca)
            )
            if upstream_cert is not None:
                self._context.load_cert_chain(str(upstream_cert[0]), str(upstream_cert[1]))
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            served.load_cert_chain(str(tls.cert), str(tls.key))
            if tls.client_ca is not None:
                served.verify_mode = ssl.CERT_REQUIRED
                served.load_verify_locations(cafile=str(tls.client_ca))
            self._server.socket = served.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}{self._base_path}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn: http.client.HTTPConnection
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(self._netloc, timeout=60, context=self._context)
        else:
            conn = http.client.HTTPConnection(self._netloc, timeout=60)
        try:
            # One upstream connection per request: without "close", reading a body that
            # has no length waits for the server's keep-alive timeout.
            conn.request(method, target, body=body, headers={**headers, "Connection": "close"})
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: object) -> None:
                pass  # requests carry UIDs; tests read the record instead

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                query = tuple(parse_qsl(parts.query, keep_blank_values=True))
                auth = self.headers.get("Authorization")
                proxy._record(RecordedRequest(self.command, parts.path, parts.query, query, auth))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._require_bearer is not None and auth != (
                    f"Bearer {proxy._require_bearer}"
                ):
                    self._reply(401, [("WWW-Authenticate", "Bearer")], b"")
                    return
                kept = [(k, v) for k, v in query if k not in proxy._strip]
                target = parts.path + ("?" + urlencode(kept) if kept else "")
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP_BY_HOP
                    and not (k.lower() == "authorization" and proxy._require_bearer is not None)
                }
                try:
                    status, reply_headers, reply = proxy._forward(
                        self.command, target, headers, body
                    )
                except OSError:
                    self._reply(502, [], b"")
                    return
                kept_headers = [(k, v) for k, v in reply_headers if k.lower() not in _HOP_BY_HOP]
                self._reply(status, kept_headers, reply)

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _handle  # noqa: N815
            do_POST = _handle  # noqa: N815
            do_DELETE = _handle  # noqa: N815

        return Handler
